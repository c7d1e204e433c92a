"""TFLite export: int8 is ≥ 3.5× smaller and agrees with the float model; every mode runs under LiteRT.

.venv/bin/python -m pytest tests/test_quantization.py -q
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf  # conftest.py set TF_USE_LEGACY_KERAS=1: tf_keras is Keras 2
import tf_keras

from tests.test_compression import SIZE, toy_datasets
from utilities import serving
from utilities.compression import distillation
from utilities.compression import quantization as mq
from utilities.data.schema import CLASS_NAMES, SEXES, SITES, encode_metadata
from utilities.evaluation import variants as variant_eval
from utilities.model import compile_model


@pytest.fixture(scope="module")
def trained():
    """A student-sized model trained to confident predictions on learnable toy data."""
    datasets = toy_datasets(n_train=192, n_eval=64)
    tf_keras.utils.set_random_seed(0)
    model = distillation.build_student(SIZE, filters=48, dropout=0.0)  # ~215k weights: TFLite graph overhead is small
    compile_model(model, 3e-3)
    model.fit(datasets.train, epochs=4, class_weight=datasets.class_weights, verbose=0)
    reference = variant_eval.evaluate_predict_fn(variant_eval.keras_predict_fn(model), datasets)
    return model, datasets, reference


def test_unknown_mode_and_int8_without_training_examples_fail_in_one_line():
    model = distillation.build_student(SIZE, filters=4)
    with pytest.raises(mq.QuantizationError, match="unknown quantization mode 'int4'"):
        mq.convert(model, "int4")
    empty = toy_datasets(n_train=16).train.take(0)
    for calibration in (None, empty):
        with pytest.raises(mq.QuantizationError, match="training split is empty") as info:
            mq.convert(model, "int8", calibration)
        assert "\n" not in str(info.value)


def test_representative_dataset_yields_single_examples_of_the_raw_fields():
    examples = list(mq.representative_dataset(toy_datasets(n_train=40).train, examples=25)())
    assert len(examples) == 25
    assert {name: (value.shape, value.dtype) for name, value in examples[0].items()} == {
        "image": ((1, SIZE, SIZE, 3), np.float32),
        "age_approx": ((1,), np.int32),
        "sex": ((1,), np.int32),
        "anatom_site_general": ((1,), np.int32),
    }


def test_lite_fields_read_the_multi_hot_back_into_years_and_indices():
    rows = [(45, "head/neck", "male"), (None, None, None), (0, "upper extremity", "female"), (85, None, "male")]
    fields = mq.lite_fields(
        {"image": np.zeros((4, 2, 2, 3)), "metadata": np.array([encode_metadata(*r) for r in rows])}
    )
    assert fields["age_approx"].tolist() == [45, -1, 0, 85]
    assert [SITES[i] if i >= 0 else None for i in fields["anatom_site_general"]] == [r[1] for r in rows]
    assert [SEXES[i] if i >= 0 else None for i in fields["sex"]] == [r[2] for r in rows]


@pytest.mark.slow
def test_int8_is_much_smaller_and_agrees_with_the_float_model(trained, tmp_path):
    model, datasets, reference = trained
    float_path = mq.export(model, "float32", tmp_path / "model_float32.tflite")
    int8_path = mq.export(model, "int8", tmp_path / "model_int8.tflite", datasets.train)
    keras_weight_bytes = 4 * model.count_params()

    ratio = float_path.stat().st_size / int8_path.stat().st_size
    assert ratio >= 3.5, f"int8 only {ratio:.2f}x smaller than float TFLite"
    assert keras_weight_bytes / int8_path.stat().st_size >= 3.5
    result = variant_eval.evaluate_variant(
        mq.tflite_predict_fn(int8_path), datasets, int8_path, None, reference
    ).metrics
    print(
        f"\nint8: {ratio:.2f}x smaller, agreement {result.agreement:.3f}, val bal acc {result.val.balanced_accuracy:.3f}"
    )
    assert result.agreement >= 0.95
    assert result.latency_ms.median > 0


@pytest.mark.slow
def test_float32_float16_and_dynamic_files_run_under_litert(trained, tmp_path):
    model, datasets, reference = trained
    features, _ = next(iter(datasets.val))
    sizes = {}
    for mode in ("float32", "float16", "dynamic"):
        path = mq.export(model, mode, tmp_path / f"model_{mode}.tflite")
        sizes[mode] = path.stat().st_size
        probs = mq.tflite_predict_fn(path)(features)
        assert probs.shape == (len(features["image"]), 8)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-3)
        if mode == "float32":  # the same graph as Keras: same probabilities
            np.testing.assert_allclose(probs, model(features, training=False).numpy(), atol=1e-5)
        agreement = variant_eval.evaluate_predict_fn(mq.tflite_predict_fn(path), datasets, reference).metrics.agreement
        assert agreement >= 0.95, (mode, agreement)
    assert sizes["float16"] < 0.6 * sizes["float32"]
    assert sizes["dynamic"] < 0.4 * sizes["float32"]
    assert not list(tmp_path.glob("*.tmp"))  # written atomically
    assert (tmp_path / mq.LABELS_TXT).read_text().split() == list(CLASS_NAMES)  # the output columns, beside it
    assert json.loads((tmp_path / serving.LITE_JSON).read_text())["sites"] == list(SITES)  # the inputs, beside it


@pytest.mark.slow
def test_litert_answers_from_raw_fields_as_keras_does_from_the_encoding(trained, tmp_path):
    """A phone app's call: LiteRT alone, pixels plus age in years and the vocabularies' indices."""
    from ai_edge_litert.interpreter import Interpreter

    model, datasets, _ = trained
    record = serving.lite_record()
    runner = Interpreter(model_path=str(mq.export(model, "float32", tmp_path / "m.tflite"))).get_signature_runner()
    assert set(runner.get_input_details()) == set(mq.LITE_INPUTS) == set(record["inputs"])
    image = next(iter(datasets.val))[0]["image"][:1].numpy()
    # (years, sex, site) → what tools.prepare would have written for that CSV row; −1 and odd ages included
    cases = [
        ((45, "male", "head/neck"), (45, "male", "head/neck")),
        ((-1, None, None), (None, None, None)),
        ((12, "female", "palms/soles"), (10, "female", "palms/soles")),
        ((13, None, "oral/genital"), (15, None, "oral/genital")),
        ((97, "female", None), (85, "female", None)),
        ((0, None, "upper extremity"), (0, None, "upper extremity")),
    ]
    for (years, sex, site), (age, want_sex, want_site) in cases:
        got = runner(
            image=image,
            age_approx=np.array([years], np.int32),
            sex=np.array([record["sexes"].index(sex) if sex else -1], np.int32),
            anatom_site_general=np.array([record["sites"].index(site) if site else -1], np.int32),
        )["probabilities"]
        metadata = np.array([encode_metadata(age, want_site, want_sex)], np.float32)
        want = model({"image": image, "metadata": metadata}, training=False).numpy()
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=str((years, sex, site)))


def test_a_mixed_precision_model_converts_through_its_float32_twin(mixed_precision, tmp_path):
    datasets = toy_datasets(n_train=32, n_eval=16)
    tf_keras.utils.set_random_seed(0)
    model = distillation.build_student(SIZE, filters=8, dropout=0.0)
    assert model.get_layer("block1_conv").compute_dtype == "float16"
    features, _ = next(iter(datasets.val))
    path = mq.export(model, "dynamic", tmp_path / "student_dynamic.tflite")  # float16 ops have no TFLite kernels
    np.testing.assert_allclose(mq.tflite_predict_fn(path)(features), model(features).numpy(), atol=2e-2)


@pytest.mark.slow
def test_a_model_with_an_unsupported_op_fails_with_one_line(tmp_path):
    inputs = {
        "image": tf_keras.Input((SIZE, SIZE, 3), name="image"),
        "metadata": tf_keras.Input((28,), name="metadata"),
    }
    outputs = tf_keras.layers.Lambda(lambda x: tf.strings.as_string(x))(inputs["metadata"])  # no TFLite string kernel
    model = tf_keras.Model(inputs, outputs)
    with pytest.raises(mq.QuantizationError, match="conversion of") as info:
        mq.export(model, "float32", tmp_path / "bad.tflite")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "bad.tflite").exists()
    with pytest.raises(mq.QuantizationError, match="has no 'image' input"):
        mq.convert(tf_keras.Sequential([tf_keras.Input((4,)), tf_keras.layers.Dense(2)]), "float32")
