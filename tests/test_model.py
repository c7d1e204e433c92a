"""The model builds, trains a step, saves and reloads without custom objects, and its fusion is convex."""

import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from utilities.model import (
    BalancedAccuracy,
    FusionLayer,
    ModelError,
    build_model,
    compile_model,
    float32_copy,
    fusion_weights,
    load_model,
    save_model,
    tta_model,
)
from utilities.run.config import ModelConfig


def _batch(n=8, size=32, seed=0):
    rng = np.random.default_rng(seed)
    features = {
        "image": rng.uniform(0, 255, (n, size, size, 3)).astype("float32"),
        "metadata": rng.integers(0, 2, (n, 28)).astype("float32"),
    }
    labels = tf_keras.utils.to_categorical(rng.integers(0, 8, n), 8)
    return features, labels


def test_fusion_is_convex_mix_of_branch_probabilities():
    layer = FusionLayer()
    a, b = tf.constant([[2.0, 0.0]]), tf.constant([[0.0, 2.0]])
    out = layer([a, b]).numpy()
    expected = 0.5 * tf.nn.softmax(a) + 0.5 * tf.nn.softmax(b)
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-6)
    layer.branch_logits.assign([np.log(3.0), 0.0])  # weights 0.75 / 0.25
    assert layer.branch_weights() == pytest.approx({"image": 0.75, "metadata": 0.25})
    assert FusionLayer.from_config(layer.get_config()).branch_names == ("image", "metadata")


def test_balanced_accuracy_metric_is_mean_recall_over_present_classes():
    metric = BalancedAccuracy()
    y_true = tf_keras.utils.to_categorical([0, 0, 0, 1], 8)
    y_pred = tf_keras.utils.to_categorical([0, 0, 1, 1], 8)
    metric.update_state(y_true, y_pred)
    assert metric.result().numpy() == pytest.approx((2 / 3 + 1) / 2)


def test_frozen_backbone_trains_only_heads_and_fusion(tmp_path):
    model = build_model(ModelConfig(weights="none", fcnn_nodes=16, fine_tune=False), image_size=32)
    compile_model(model, 1e-3)
    backbone = model.get_layer("densenet121")
    before = [w.numpy().copy() for w in backbone.weights]
    fusion_before = fusion_weights(model)
    features, labels = _batch()
    model.fit(features, labels, epochs=2, verbose=0)
    assert all(np.array_equal(b, w.numpy()) for b, w in zip(before, backbone.weights, strict=True))
    assert fusion_weights(model) != fusion_before
    assert sum(fusion_weights(model).values()) == pytest.approx(1.0)


@pytest.mark.slow
def test_saved_model_reloads_in_a_fresh_process_without_custom_objects(tmp_path):
    from utilities.model import save_model

    model = build_model(ModelConfig(weights="none", fcnn_nodes=16, fine_tune=True), image_size=32)
    compile_model(model, 1e-3)
    features, _ = _batch()
    expected = model.predict(features, verbose=0)
    save_model(model, tmp_path / "model")
    np.save(tmp_path / "image.npy", features["image"])
    np.save(tmp_path / "metadata.npy", features["metadata"])
    np.save(tmp_path / "expected.npy", expected)
    script = f"""
import numpy as np, utilities.model as m
model = m.load_model({str(tmp_path / "model")!r})
x = {{"image": np.load({str(tmp_path / "image.npy")!r}), "metadata": np.load({str(tmp_path / "metadata.npy")!r})}}
np.testing.assert_allclose(model.predict(x, verbose=0), np.load({str(tmp_path / "expected.npy")!r}), rtol=1e-4, atol=1e-5)
assert m.fusion_weights(model) is not None
"""
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=300)


def test_a_mixed_precision_model_trains_and_exports_a_float32_twin(mixed_precision, tmp_path):
    model = build_model(ModelConfig(weights="none", fcnn_nodes=16, fine_tune=False), image_size=32)
    compile_model(model, 1e-3)
    assert isinstance(model.optimizer, tf_keras.mixed_precision.LossScaleOptimizer)  # Keras scales the loss
    features, labels = _batch()
    model.train_on_batch(features, labels)
    backbone = model.get_layer("densenet121")
    conv = next(layer for layer in backbone.layers if isinstance(layer, tf_keras.layers.Conv2D))
    assert conv.compute_dtype == "float16" and conv.kernel.dtype == tf.float32  # float32 master weights
    probs = model(features, training=False)
    assert probs.dtype == tf.float32  # the fusion layer computes in float32

    twin = float32_copy(model)
    assert twin is not model and float32_copy(twin) is twin
    assert {layer.compute_dtype for layer in twin.get_layer("densenet121").layers} == {"float32"}
    for a, b in zip(model.get_weights(), twin.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(twin(features, training=False).numpy(), probs.numpy(), atol=2e-2)
    reloaded = load_model(save_model(model, tmp_path / "model"))  # exports are the float32 twin
    assert {layer.compute_dtype for layer in reloaded.get_layer("densenet121").layers} == {"float32"}
    np.testing.assert_allclose(reloaded.predict(features, verbose=0), twin(features).numpy(), rtol=1e-5, atol=1e-6)


def test_bad_weights_path_is_one_line_error(tmp_path):
    with pytest.raises(ModelError, match="neither"):
        build_model(ModelConfig(weights=str(tmp_path / "missing.h5")), image_size=32)


def test_batchnorm_recalibration_sets_moving_statistics_to_the_mean_of_batch_statistics():
    from utilities.model import recalibrate_batchnorm

    model = build_model(ModelConfig(weights="none", fcnn_nodes=16), image_size=32)  # fine-tuned: BN trainable
    backbone = model.get_layer("densenet121")
    bn = backbone.get_layer("conv1/bn")
    conv = tf_keras.Model(backbone.input, backbone.get_layer("conv1/conv").output)
    preprocess = tf_keras.Model(model.get_layer("scale_0_1").input, model.get_layer("imagenet_norm").output)
    batches = [_batch(seed=s) for s in (1, 2, 3)]
    means = [tf.reduce_mean(conv(preprocess(f["image"])), axis=(0, 1, 2)).numpy() for f, _ in batches]
    assert not np.allclose(bn.moving_mean.numpy(), np.mean(means, axis=0), atol=1e-3)  # the premise

    used = recalibrate_batchnorm(
        model,
        tf.data.Dataset.from_tensor_slices(batches[0])
        .batch(8)
        .concatenate(tf.data.Dataset.from_tensor_slices(batches[1]).batch(8))
        .concatenate(tf.data.Dataset.from_tensor_slices(batches[2]).batch(8)),
    )
    assert used == 3 and bn.momentum == 0.99  # momentum restored
    np.testing.assert_allclose(bn.moving_mean.numpy(), np.mean(means, axis=0), rtol=1e-3, atol=1e-4)
    frozen = build_model(ModelConfig(weights="none", fcnn_nodes=16, fine_tune=False), image_size=32)
    assert recalibrate_batchnorm(frozen, tf.data.Dataset.from_tensor_slices(batches[0]).batch(8)) == 0


def test_tta_averages_the_eight_symmetries_inside_one_model_that_reloads(tmp_path):
    tf_keras.utils.set_random_seed(0)
    inputs = {"image": tf_keras.Input((32, 32, 3), name="image"), "metadata": tf_keras.Input((28,), name="metadata")}
    x = tf_keras.layers.Rescaling(1 / 255)(inputs["image"])
    x = tf_keras.layers.Conv2D(4, 3, strides=4)(x)  # not symmetric: the views differ
    x = tf_keras.layers.Flatten()(x)
    x = tf_keras.layers.Concatenate()([x, inputs["metadata"]])
    model = tf_keras.Model(inputs, tf_keras.layers.Dense(8, activation="softmax")(x))
    features, _ = _batch(n=3)
    views = [
        np.rot90(im, k, axes=(1, 2)) for im in (features["image"], features["image"][:, :, ::-1]) for k in range(4)
    ]
    want = np.mean([model({**features, "image": v}, training=False).numpy() for v in views], axis=0)
    averaged = tta_model(model, 8)
    np.testing.assert_allclose(averaged(features, training=False).numpy(), want, atol=1e-5)
    save_model(averaged, tmp_path / "tta")
    reloaded = load_model(tmp_path / "tta")  # DihedralView is ours: the model-file check lets it through
    np.testing.assert_allclose(reloaded(features, training=False).numpy(), want, atol=1e-5)
    with pytest.raises(ValueError, match=r"2\.\.8 views"):
        tta_model(model, 9)
