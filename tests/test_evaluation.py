"""Tests of utilities/evaluation.py: metrics against hand-computed values, sizes, plots, report.

.venv/bin/python -m pytest tests/test_evaluation.py -q
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from utilities import evaluation as ev
from utilities import report as rp
from utilities.runs import DataRecord, RunRecord
from utilities.schema import CLASS_NAMES, NUM_CLASSES

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
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


def _assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 2000, path


def test_plots_write_pngs(tmp_path):
    cm = [[5, 1, 0, 0], [0, 3, 2, 0], [0, 0, 4, 0], [0, 0, 0, 0]]  # last class without support
    _assert_png(rp.plot_confusion_matrix(cm, NAMES, tmp_path / "cm.png"))
    history = {"loss": [1.0, 0.7], "val_loss": [1.1, 0.9], "accuracy": [0.5, 0.6], "balanced_accuracy": [0.3, None]}
    _assert_png(rp.plot_training_curves(history, tmp_path / "sub" / "curves.png"))
    _assert_png(rp.plot_training_curves({}, tmp_path / "empty.png"))  # resumed run without history


def _metrics() -> dict:
    y_true = np.array([0, 0, 0, 1, 1, 2])
    model = {
        "val": ev.compute_metrics(y_true, _probs_for([0, 0, 0, 1, 2, 2]), NAMES),
        "test": ev.compute_metrics(y_true, _probs_for([0, 0, 1, 1, 2, 2]), NAMES),
        "size_bytes": 28_500_000,
        "gzip_bytes": 26_000_000,
        "latency_ms": {"median": 41.5, "p90": 44.0},
        "params": 7_100_000,
    }
    tflite = {"test": ev.compute_metrics(y_true, _probs_for([0, 1, 1, 1, 2, 2]), NAMES), "latency_ms": 12.0}
    return {"variants": {"model": model, "int8": {**tflite, "agreement": 0.8333}}}


def test_comparison_rows_are_flat_and_tolerate_missing_keys():
    rows = rp.comparison_rows(_metrics())
    assert [r["variant"] for r in rows] == ["model", "int8"]
    assert rows[0]["test_balanced_accuracy"] == pytest.approx(13 / 18)
    assert rows[0]["latency_ms_median"] == 41.5 and rows[0]["latency_ms_p90"] == 44.0
    assert rows[1]["latency_ms_median"] == 12.0 and rows[1]["size_bytes"] is None
    assert rows[1]["val_balanced_accuracy"] is None
    assert all(not isinstance(v, dict | list) for row in rows for v in row.values())


def test_report_has_summary_tables_and_figures(tmp_path):
    record = RunRecord(
        run_id="20240101-abc",
        model_name="base_model",
        uri="",
        started="",
        data=DataRecord(tag="dataset_v01", manifest="", manifest_sha256="f" * 64),
        code={"git_commit": "b4d23f8"},
        devices=["/cpu:0", "/cpu:1"],
    )
    history = {"loss": [1.0, 0.8], "val_loss": [1.2, 1.0], "fusion/image": [0.5, 0.62], "fusion/metadata": [0.5, 0.38]}
    path = rp.write_report(tmp_path / "run", _metrics(), record, history)

    text = path.read_text()
    assert path.name == "report.md"
    for expected in ("base_model", "20240101-abc", "dataset_v01", "f" * 64, "b4d23f8", "/cpu:0, /cpu:1"):
        assert expected in text, expected
    assert "| variant | test bal. acc. |" in text
    assert "| model | 0.7222 | 0.6667 |" in text  # balanced accuracy 13/18, accuracy 4/6
    assert "| int8 | 0.6111 |" in text and "| 12.00 | — | 0.8333 |" in text  # missing params → —
    assert "| A | 3 | 0.6667 | 0.3333 |" in text  # per-class recall: class, support, model, int8
    assert "| image | 0.6200 |" in text  # fusion weights from the last epoch of the history
    assert "![confusion matrix](confusion_matrix.png)" in text
    assert "![training curves](training_curves.png)" in text
    _assert_png(tmp_path / "run" / "confusion_matrix.png")
    _assert_png(tmp_path / "run" / "training_curves.png")


def test_report_without_test_metrics_or_history(tmp_path):
    path = rp.write_report(tmp_path, {"variants": {"student": {"size_bytes": 1000}}}, None, {})
    text = path.read_text()
    assert "| student | — |" in text
    assert "confusion_matrix.png" not in text and (tmp_path / "training_curves.png").exists()


def test_a_variant_answering_one_class_is_flagged_with_its_agreement(tmp_path):
    y_true = np.array([0, 0, 0, 1, 1, 2, 2, 3, 3, 3])
    constant = ev.compute_metrics(y_true, _probs_for([1] * 10), NAMES)
    assert (constant["top_class"], constant["top_class_share"]) == ("B", 1.0)
    metrics = _metrics()
    metrics["variants"]["int8"] = {"val": constant, "agreement": 1.0}  # "agreement" with a constant model
    (line,) = rp.collapse_warnings(metrics)
    assert (
        line
        == "int8 predicts B for 100% of val (balanced accuracy 0.250); its agreement 1.000 with the float model means as little"
    )
    text = rp.write_report(tmp_path, metrics, None, {}).read_text()
    assert f"> **Warning:** {line}." in text
    assert rp.collapse_warnings(_metrics()) == []  # mixed predictions: nothing to flag
