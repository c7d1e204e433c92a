"""Tests of utilities/evaluation/metrics.py: metrics against hand-computed values, agreement, sizes, latency (report: test_report.py).

.venv/bin/python -m pytest tests/test_evaluation.py -q
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from utilities.data.schema import CLASS_NAMES, NUM_CLASSES
from utilities.evaluation import metrics as ev

NAMES = ("A", "B", "C", "D")  # D never occurs in y_true nor in the predictions


def _probs_for(predicted: list[int], num_classes: int = len(NAMES)) -> np.ndarray:
    """Rows with 0.7 on the predicted class and the rest spread evenly (rows sum to 1)."""
    probs = np.full((len(predicted), num_classes), 0.3 / (num_classes - 1))
    probs[np.arange(len(predicted)), predicted] = 0.7
    return probs


def test_metrics_match_hand_computed_values():
    y_true = np.array([0, 0, 0, 1, 1, 2])
    probs = _probs_for([0, 0, 1, 1, 2, 2])
    m = ev.compute_metrics(y_true, probs, NAMES)

    assert m["n"] == 6
    assert m["confusion_matrix"] == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)  # D has no support
    assert m["per_class_recall"] == pytest.approx({"A": 2 / 3, "B": 0.5, "C": 1.0, "D": 0.0})
    assert m["per_class_precision"] == pytest.approx({"A": 1.0, "B": 0.5, "C": 0.5, "D": 0.0})
    assert m["support"] == {"A": 3, "B": 2, "C": 1, "D": 0}
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    # One-vs-rest AUCs by pair counting (ties count 1/2): A 7.5/9, B 5/8, C 4.5/5; D is skipped.
    assert m["macro_auc"] == pytest.approx((7.5 / 9 + 5 / 8 + 4.5 / 5) / 3)
    json.dumps(m, allow_nan=False)  # JSON-serialisable, no NaN


def test_perfect_predictions_score_one():
    y_true = np.repeat(np.arange(NUM_CLASSES), 3)
    m = ev.compute_metrics(y_true, np.eye(NUM_CLASSES)[y_true])
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc"):
        assert m[key] == pytest.approx(1.0), key
    assert list(m["per_class_recall"]) == list(CLASS_NAMES)


def test_constant_prediction_has_balanced_accuracy_one_over_c():
    y_true = np.repeat(np.arange(NUM_CLASSES), [50, 30, 10, 5, 5, 3, 2, 1])  # imbalanced, all present
    probs = np.tile(np.linspace(1.0, 0.1, NUM_CLASSES), (len(y_true), 1))  # always predicts MEL
    m = ev.compute_metrics(y_true, probs)
    assert m["balanced_accuracy"] == pytest.approx(1 / NUM_CLASSES)
    assert m["accuracy"] == pytest.approx(50 / len(y_true))
    assert m["macro_auc"] == pytest.approx(0.5)  # identical scores for everyone


def test_random_predictions_agree_with_sklearn():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, NUM_CLASSES, 400)
    probs = rng.dirichlet(np.ones(NUM_CLASSES), 400)
    m = ev.compute_metrics(y_true, probs)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, probs.argmax(1)))
    assert abs(m["balanced_accuracy"] - 1 / NUM_CLASSES) < 0.08
    assert 0.4 < m["macro_auc"] < 0.6


def test_auc_is_none_when_only_one_class_occurs():
    assert ev.compute_metrics(np.zeros(4, int), _probs_for([0, 1, 0, 2]), NAMES)["macro_auc"] is None


@pytest.mark.parametrize(
    ("y_true", "probs", "message"),
    [
        (np.array([0, 1]), np.ones((3, 4)) / 4, "same non-zero length"),
        (np.array([0, 1]), np.ones((2, 3)) / 3, "3 columns"),
        (np.array([0, 4]), np.ones((2, 4)) / 4, "class ids"),
        (np.array([0, 1]), np.array([[np.nan, 0, 0, 0], [1, 0, 0, 0]]), "NaN"),
    ],
)
def test_bad_inputs_are_one_line_errors(y_true, probs, message):
    with pytest.raises(ValueError, match=message):
        ev.compute_metrics(y_true, probs, NAMES)


def test_predict_over_a_tf_data_dataset():
    import tensorflow as tf

    labels = np.eye(NUM_CLASSES, dtype=np.float32)[[3, 1, 4, 1, 5]]
    scores = np.random.default_rng(1).random((5, NUM_CLASSES)).astype(np.float32)
    dataset = tf.data.Dataset.from_tensor_slices(({"scores": scores}, labels)).batch(2)  # 3 batches
    y_true, probs = ev.predict(lambda features: tf.nn.softmax(features["scores"]), dataset)
    assert y_true.tolist() == [3, 1, 4, 1, 5]
    np.testing.assert_allclose(probs, tf.nn.softmax(scores).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="empty"):
        ev.predict(lambda f: f, dataset.take(0))


def test_agreement():
    a = _probs_for([0, 1, 2, 3])
    assert ev.agreement(a, a) == 1.0
    assert ev.agreement(a, _probs_for([0, 1, 3, 2])) == 0.5
    with pytest.raises(ValueError, match="shape"):
        ev.agreement(a, a[:2])


def test_artifact_size_of_a_file_and_a_folder(tmp_path):
    model = tmp_path / "model.tflite"
    model.write_bytes(b"\0" * 10_000)
    size = ev.artifact_size(model)
    assert size["size_bytes"] == 10_000
    assert 0 < size["gzip_bytes"] < 200  # zeros compress to almost nothing

    saved = tmp_path / "saved_model"
    (saved / "variables").mkdir(parents=True)
    (saved / "saved_model.pb").write_bytes(np.random.default_rng(0).bytes(3000))  # incompressible
    (saved / "variables" / "variables.data").write_bytes(b"ab" * 2000)
    first = ev.artifact_size(saved)
    assert first["size_bytes"] == 7000
    assert 3000 < first["gzip_bytes"] < 7000
    (saved / "saved_model.pb").touch()
    time.sleep(0.01)
    assert ev.artifact_size(saved) == first  # reproducible: mtimes do not matter

    with pytest.raises(FileNotFoundError, match="no such file"):
        ev.artifact_size(tmp_path / "missing")


def test_latency_discards_warmup_and_reports_milliseconds():
    calls = []

    def predict_one():
        calls.append(1)
        time.sleep(0.002)

    result = ev.latency_ms(predict_one, warmup=2, repeats=5)
    assert len(calls) == 7
    assert 2.0 <= result["median"] <= result["p90"] < 1000
    with pytest.raises(ValueError, match="repeats"):
        ev.latency_ms(predict_one, repeats=0)
