"""Frozen-backbone feature cache: same layers, same predictions, same training as the uncached path.

.venv/bin/python -m pytest tests/test_feature_cache.py -q
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from utilities.data import feature_cache
from utilities.data import pipeline as data
from utilities.model import build_model, compile_model
from utilities.run.config import Config, ModelConfig
from utilities.run.fields import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32  # px: DenseNet121's minimum keeps the backbone cheap
BATCH = 16


def _config(cache: str = "auto", fine_tune: bool = False, augment: bool = False, epochs: int = 10) -> Config:
    return Config().replace(
        data={"cache_features": cache, "augment": augment}, model={"fine_tune": fine_tune}, train={"epochs": epochs}
    )


@pytest.fixture(scope="module")
def model() -> tf_keras.Model:
    tf_keras.utils.set_random_seed(0)
    return build_model(ModelConfig(weights="none", fcnn_nodes=16, dropout=0.0, fine_tune=False), SIZE)


@pytest.fixture(scope="module")
def datasets(prepared) -> data.Datasets:
    shards = data.fetch_shards(data.load_manifest(prepared.manifest_path), prepared.root / "cache")
    return data.build_datasets(shards, image_size=SIZE, global_batch_size=BATCH, seed=0, augment=False)


def _index_cache(views: int, examples: int) -> feature_cache.FeatureCache:
    """Features, metadata and labels all encode (view, example) so alignment can be checked."""
    ids = np.arange(views * examples, dtype=np.float32).reshape(views, examples, 1)
    return feature_cache.FeatureCache(
        features=tf.constant(np.repeat(ids, 3, axis=2)),
        metadata=tf.constant(np.repeat(ids, 28, axis=2)),
        labels=tf.constant(np.repeat(ids, 8, axis=2)),
        batch_size=2,
    )


# ---------------------------------------------------------------- decision


@pytest.mark.parametrize(
    ("cache", "fine_tune", "augment", "expected"),
    [
        ("auto", False, False, True),  # frozen backbone, fixed inputs: features never change
        ("auto", False, True, False),  # augmentation changes the inputs every epoch
        ("auto", True, False, False),  # the backbone trains
        ("off", False, False, False),
        ("on", False, True, True),  # K augmented views
    ],
)
def test_caches_features_follows_the_config(cache, fine_tune, augment, expected):
    assert _config(cache, fine_tune, augment).caches_features is expected


def test_cache_on_with_fine_tune_is_refused():
    with pytest.raises(ConfigError, match="frozen backbone"):
        _config("on", fine_tune=True)
    forced = _config("on")  # a Config altered past its checks still cannot cache a backbone that trains
    object.__setattr__(forced, "model", ModelConfig(fine_tune=True))
    with pytest.raises(ConfigError, match="frozen backbone"):
        assert forced.caches_features


def test_view_count_is_one_without_augmentation_else_at_most_max_views():
    assert feature_cache.view_count(_config(augment=False, epochs=10)) == 1
    assert feature_cache.view_count(_config("on", augment=True, epochs=2)) == 2
    assert feature_cache.view_count(_config("on", augment=True, epochs=10)) == feature_cache.MAX_VIEWS


# ---------------------------------------------------------------- models from shared layers


@pytest.mark.slow
def test_head_and_extractor_reuse_the_full_models_layers_and_variables(model):
    head, extractor = feature_cache.head_model(model), feature_cache.feature_extractor(model)
    for name in feature_cache.HEAD_LAYERS:
        assert head.get_layer(name) is model.get_layer(name)
    assert extractor.get_layer("densenet121") is model.get_layer("densenet121")
    model_variables = {id(v) for v in model.weights}
    assert {id(v) for v in head.weights} <= model_variables
    assert {id(v) for v in extractor.weights} <= model_variables
    assert {id(v) for v in head.trainable_weights} == {id(v) for v in model.trainable_weights}


@pytest.mark.slow
def test_extractor_refuses_a_trainable_backbone(model):
    backbone = model.get_layer("densenet121")
    backbone.trainable = True
    try:
        with pytest.raises(feature_cache.FeatureCacheError, match="trainable"):
            feature_cache.feature_extractor(model)
    finally:
        backbone.trainable = False


def test_a_model_without_the_expected_layers_is_a_one_line_error():
    image = tf_keras.Input((SIZE, SIZE, 3), name="image")
    other = tf_keras.Model({"image": image}, tf_keras.layers.Flatten()(image))
    with pytest.raises(feature_cache.FeatureCacheError, match="has no layer 'image_dropout'"):
        feature_cache.head_model(other)


# ---------------------------------------------------------------- the cached datasets


def test_train_stream_cycles_views_with_a_new_order_every_epoch():
    views, examples = 2, 5  # batch 2 → 3 batches per epoch, the last one partial
    stream = feature_cache.train_dataset(_index_cache(views, examples), seed=3)
    batches = list(stream.take(3 * 6).as_numpy_iterator())  # 6 epochs
    orders = []
    for epoch in range(6):
        ids = np.concatenate([features["features"][:, 0] for features, _ in batches[3 * epoch : 3 * epoch + 3]])
        view = epoch % views
        assert sorted(ids) == list(range(view * examples, (view + 1) * examples))  # every example once, this view
        orders.append(tuple(ids - view * examples))
        for features, labels in batches[3 * epoch : 3 * epoch + 3]:
            np.testing.assert_array_equal(features["metadata"][:, 0], features["features"][:, 0])
            np.testing.assert_array_equal(labels[:, 0], features["features"][:, 0])
    assert len(set(orders)) > 1  # reshuffled
    again = list(feature_cache.train_dataset(_index_cache(views, examples), seed=3).take(6).as_numpy_iterator())
    for (a, _), (b, _) in zip(again, batches[:6], strict=True):
        np.testing.assert_array_equal(a["features"], b["features"])  # reproducible for a seed


def test_eval_dataset_is_one_pass_of_view_zero_in_order():
    batches = list(feature_cache.eval_dataset(_index_cache(2, 5)).as_numpy_iterator())
    assert [len(y) for _, y in batches] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate([f["features"][:, 0] for f, _ in batches]), np.arange(5))


def _pixels_extractor() -> tf_keras.Model:
    """Stand-in for the backbone: the first 16 pixel values of each image (cheap, position-sensitive)."""
    image = tf_keras.Input((SIZE, SIZE, 3), name="image")
    first = tf_keras.layers.Lambda(lambda x: tf.reshape(x, [-1, SIZE * SIZE * 3])[:, :16])(image)
    return tf_keras.Model({"image": image}, first)


def _image_batches(n: int = 10) -> tf.data.Dataset:
    rng = np.random.default_rng(0)
    features = {
        "image": rng.uniform(0, 255, (n, SIZE, SIZE, 3)).astype("float32"),
        "metadata": rng.integers(0, 2, (n, 28)).astype("float32"),
    }
    labels = tf_keras.utils.to_categorical(rng.integers(0, 8, n), 8)
    return tf.data.Dataset.from_tensor_slices((features, labels)).batch(4)


def test_augmented_views_differ_and_are_reproducible():
    extractor, batches = _pixels_extractor(), _image_batches()
    first = feature_cache.compute_features(extractor, batches, views=3, seed=7, augmentation=data.Augmentation())
    again = feature_cache.compute_features(extractor, batches, views=3, seed=7, augmentation=data.Augmentation())
    plain = feature_cache.compute_features(extractor, batches)
    assert (first.views, first.examples, first.batch_size) == (3, 10, 4)
    np.testing.assert_array_equal(first.features.numpy(), again.features.numpy())
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert not np.allclose(first.features[a], first.features[b])
    assert not np.allclose(first.features[0], plain.features[0])
    np.testing.assert_array_equal(first.labels[2], plain.labels[0])  # augmentation leaves labels alone


def test_an_empty_dataset_is_a_one_line_error():
    with pytest.raises(feature_cache.FeatureCacheError, match="empty dataset"):
        feature_cache.compute_features(_pixels_extractor(), _image_batches().take(0))


# ---------------------------------------------------------------- training through the cache


def _train(model: tf_keras.Model, train: tf.data.Dataset, class_weights: dict[int, float]) -> dict[str, list]:
    compile_model(model, 1e-3)  # a fresh Adam each time
    return model.fit(train, epochs=2, class_weight=class_weights, verbose=0).history


@pytest.mark.slow
def test_training_the_head_on_cached_features_equals_training_the_full_model(model, datasets):
    assert model.get_layer("image_dropout").rate == 0.0  # deterministic: both paths see the same activations
    start = model.get_weights()
    # The val split has a fixed order, so both paths see identical batches in identical order. Both
    # declare their length (else tf_keras' Adam counts one extra iteration at the end of epoch 1).
    assert int(datasets.val.cardinality()) == datasets.steps_per_epoch["val"]
    full = _train(model, datasets.val, datasets.class_weights)
    trained_uncached = model.get_weights()
    model.set_weights(start)
    extractor, head = feature_cache.feature_extractor(model), feature_cache.head_model(model)
    cached_val = feature_cache.cache_dataset(extractor, datasets.val)
    labels = np.concatenate([y for _, y in cached_val.as_numpy_iterator()])
    np.testing.assert_array_equal(labels, np.concatenate([y for _, y in datasets.val.as_numpy_iterator()]))
    fast = _train(head, cached_val, datasets.class_weights)
    for key in ("loss", "accuracy", "balanced_accuracy"):
        np.testing.assert_allclose(fast[key], full[key], rtol=1e-4, atol=1e-6)
    for cached, uncached in zip(model.get_weights(), trained_uncached, strict=True):
        np.testing.assert_allclose(cached, uncached, rtol=1e-5, atol=1e-7)
    assert any(not np.array_equal(a, b) for a, b in zip(trained_uncached, start, strict=True))  # it did train
    # The trained full model (image in) predicts exactly what the head predicts on cached features.
    np.testing.assert_allclose(
        model.predict(datasets.test, verbose=0),
        head.predict(feature_cache.cache_dataset(extractor, datasets.test), verbose=0),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.slow
def test_cache_datasets_follows_the_config(model, datasets):
    plain = feature_cache.cache_datasets(model, datasets, _config(augment=False))
    assert (plain.views, plain.steps_per_epoch) == (1, datasets.steps_per_epoch["train"])
    first_epoch = list(plain.train.take(plain.steps_per_epoch).as_numpy_iterator())
    assert sum(len(labels) for _, labels in first_epoch) == datasets.counts["train"]
    assert sum(len(labels) for _, labels in plain.val.as_numpy_iterator()) == datasets.counts["val"]
    views = feature_cache.cache_datasets(model, datasets, _config("on", augment=True, epochs=2))
    assert views.views == 2


_MIRRORED = """
import numpy as np, tensorflow as tf
import utilities
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from utilities.data import pipeline as data
from utilities.data import feature_cache
from utilities.run.config import ModelConfig
from utilities.model import build_model, compile_model
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    model = build_model(ModelConfig(weights="none", fcnn_nodes=16, fine_tune=False), 32)
    head = feature_cache.head_model(model)
    compile_model(head, 1e-2)
rng = np.random.default_rng(0)
x = {"image": rng.uniform(0, 255, (24, 32, 32, 3)).astype("float32"),
     "metadata": rng.integers(0, 2, (24, 28)).astype("float32")}
y = np.eye(8, dtype="float32")[rng.integers(0, 8, 24)]
batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
extractor = feature_cache.feature_extractor(model)
cache = feature_cache.compute_features(extractor, batches, views=2, augmentation=data.Augmentation())
before = model.get_layer("image_logits").get_weights()[0].copy()
head.fit(feature_cache.train_dataset(cache), steps_per_epoch=3, epochs=2,
         validation_data=feature_cache.eval_dataset(cache), verbose=0)
assert strategy.num_replicas_in_sync == 2
assert not np.allclose(before, model.get_layer("image_logits").get_weights()[0]), "head did not train"
probs = head.predict(feature_cache.cache_dataset(extractor, batches), verbose=0)
np.testing.assert_allclose(probs, model.predict(batches, verbose=0), rtol=1e-5, atol=1e-6)
print("ok")
"""


@pytest.mark.slow
def test_the_cache_trains_the_head_under_mirrored_strategy():
    # A fresh process: logical devices must be configured before TensorFlow runs its first op.
    out = subprocess.run(
        [sys.executable, "-c", _MIRRORED], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
