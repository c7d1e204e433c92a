"""Frozen-backbone feature cache: run the backbone once per image (per view), then train only the head.

With a frozen backbone (the default teacher), the backbone runs in inference mode with fixed weights,
so its pooled features for a given input image are the same every epoch. Caching them turns an epoch
into a few small Dense layers over (B, F) vectors (F: 1024 for DenseNet121, 576 for MobileNetV3Small),
tens of times faster (`python -m bench.cache`).

    from utilities.data import feature_cache
    if config.caches_features:
        with strategy.scope():                            # fit uses the scope a model was built in
            head = feature_cache.head_model(model)        # {"features", "metadata"} → probs
            compile_model(head, config.train.learning_rate)
        cached = feature_cache.cache_datasets(model, datasets, config)
        head.fit(cached.train, validation_data=cached.val, steps_per_epoch=cached.steps_per_epoch, ...)
        model.save(...)                                   # the full image-in model, trained

The head is built from the very layer objects of the full model (image_dropout, image_logits,
metadata_dense, metadata_dropout, metadata_logits, fusion), so training it updates the full model's
weights in place; nothing is copied back and the exported model is still the full model.

Augmentation. With `augment` on and the cache forced on, the train split is cached as K augmented
views (K = min(epochs, MAX_VIEWS)) and epoch e trains on view e % K. The views are K passes of the
augmenting train pipeline, which draws new augmentation seeds on every pass (`data.augment_dataset`);
`compute_features(..., augmentation=...)` instead augments an un-augmented split with seeds
seed + v. With K < epochs each augmented image is seen more than once: augmentation diversity traded
for speed. A resumed run continues the cycle where it stopped (same view, order and batch).

Memory: 4 KiB per image per view (float32 × 1024, DenseNet121's width) plus 144 bytes of metadata and labels, held in
host memory; ISIC 2019's ~25k training images × 4 views ≈ 0.4 GB.

Tests: `.venv/bin/python -m pytest tests/test_feature_cache.py -q`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import tensorflow as tf  # utilities/__init__.py (run first, as our package) selected Keras 2
import tf_keras

from utilities.backbones import backbone_of
from utilities.data import pipeline as data
from utilities.data import records
from utilities.errors import JobError
from utilities.model_trust import ModelError
from utilities.progress import Progress
from utilities.run.config import Config

MAX_VIEWS = 4  # augmented views cached at most; each costs one inference pass over the train split
HEAD_LAYERS = ("image_dropout", "image_logits", "metadata_dense", "metadata_dropout", "metadata_logits", "fusion")


class FeatureCacheError(JobError, ValueError):
    """A model or dataset the cache cannot handle; the message is one line."""


# ---------------------------------------------------------------- decision (whether to cache: Config.caches_features)


def view_count(config: Config) -> int:
    """Cached train views K: 1 without augmentation, else min(epochs, MAX_VIEWS) augmented views."""
    return min(config.train.epochs, MAX_VIEWS) if config.data.augment else 1


# ---------------------------------------------------------------- models from the full model's layers


def _layer(model: tf_keras.Model, name: str) -> tf_keras.layers.Layer:
    try:
        return model.get_layer(name)
    except ValueError:
        raise FeatureCacheError(
            f"model {model.name!r} has no layer {name!r}; the cache needs build_model's layout"
        ) from None


def _backbone(model: tf_keras.Model) -> tf_keras.Model:
    try:
        return backbone_of(model)
    except ModelError as exc:
        raise FeatureCacheError(f"{exc}; the cache needs build_model's layout") from None


def feature_extractor(model: tf_keras.Model) -> tf_keras.Model:
    """{"image": (B,S,S,3) 0..255} → pooled backbone features (B, F), inference mode, shared layers.

    The model's own graph from its image input to what its image head reads: the backbone's preprocessing
    and the backbone, called in inference mode (build_model's `training=False` for a frozen backbone).
    """
    if _backbone(model).trainable:
        raise FeatureCacheError("the backbone is trainable (no --freeze-backbone); cached features would go stale")
    features = _layer(model, HEAD_LAYERS[0]).input
    return tf_keras.Model({"image": model.input["image"]}, features, name="feature_extractor")


def head_model(model: tf_keras.Model) -> tf_keras.Model:
    """{"features": (B, F), "metadata": (B, 28)} → probs (B, 8) through the full model's head layers.

    Creates no variables (every layer is already built), but build and compile it inside
    `strategy.scope()`: a Keras model remembers the strategy it was created under, and `fit` runs
    replicas only for a model built in the scope.
    """
    dropout, image_dense, meta_dense, meta_dropout, meta_logits, fusion = (_layer(model, n) for n in HEAD_LAYERS)
    width = _backbone(model).outputs[0].shape[-1]
    features = tf_keras.Input((width,), name="features")
    metadata = tf_keras.Input(model.input["metadata"].shape[1:], name="metadata")
    image_logits = image_dense(dropout(features))
    metadata_logits = meta_logits(meta_dropout(meta_dense(metadata)))
    probs = fusion([image_logits, metadata_logits])
    return tf_keras.Model({"features": features, "metadata": metadata}, probs, name="dermaid_head")


# ---------------------------------------------------------------- the cache


@dataclass(frozen=True)
class FeatureCache:
    """Materialized features of K views of one split; every view keeps its own example order."""

    features: tf.Tensor  # float32 (K, N, F)
    metadata: tf.Tensor  # float32 (K, N, 28)
    labels: tf.Tensor  # float32 (K, N, 8) one-hot
    batch_size: int  # the input dataset's (global) batch size

    @property
    def views(self) -> int:
        return int(self.features.shape[0])

    @property
    def examples(self) -> int:
        return int(self.features.shape[1])


def _view(dataset: tf.data.Dataset, view: int, seed: int, augmentation: data.Augmentation | None) -> tf.data.Dataset:
    return (
        dataset if augmentation is None else data.augment_dataset(dataset, data.batch_seeds(seed + view), augmentation)
    )


def _extract(extract, dataset: tf.data.Dataset, what: str) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    steps = int(dataset.cardinality())
    progress = Progress(steps if steps > 0 else None, what, "batch")
    try:
        for features, labels in dataset:
            yield extract(features["image"]).numpy().astype(np.float32), features["metadata"].numpy(), labels.numpy()
            progress.advance()
    except tf.errors.InvalidArgumentError as err:  # a record that changed after the label pass checked it
        raise records.unchecked_record(err) or err from None
    progress.done()


def compute_features(
    extractor: tf_keras.Model,
    dataset: tf.data.Dataset,
    views: int = 1,
    seed: int = 0,
    augmentation: data.Augmentation | None = None,
) -> FeatureCache:
    """Run `extractor` over K passes of a batched ({"image", "metadata"}, labels) dataset.

    `augmentation` given: view v = `dataset` augmented with `data.batch_seeds(seed + v)` (pass the
    un-augmented split). None: each view is one more iteration of `dataset` as it is (an augmenting
    pipeline re-randomizes on every pass). Runs outside any `strategy.run` (inference only), also
    under MirroredStrategy: mirrored variables are read in cross-replica context.
    """
    if views < 1:
        raise FeatureCacheError(f"views must be at least 1, got {views}")
    # One trace for every batch size (the last batch is usually short).
    spec = tf.TensorSpec([None, *extractor.input["image"].shape[1:]], tf.float32)
    extract = tf.function(lambda image: extractor({"image": image}, training=False), input_signature=[spec])
    parts: list[tuple[np.ndarray, ...]] = []
    batch_size = 0
    for view in range(views):
        what = f"backbone features, view {view + 1}/{views}"
        batches = list(_extract(extract, _view(dataset, view, seed, augmentation), what))
        if not batches:
            raise FeatureCacheError("cannot cache features of an empty dataset")
        batch_size = max(batch_size, max(len(b[2]) for b in batches))
        parts.append(tuple(np.concatenate(column) for column in zip(*batches, strict=True)))
    sizes = {len(p[0]) for p in parts}
    if len(sizes) != 1:
        raise FeatureCacheError(f"the dataset yields a different number of examples per pass: {sorted(sizes)}")
    stacked = [tf.constant(np.stack([p[i] for p in parts]), tf.float32) for i in range(3)]
    return FeatureCache(*stacked, batch_size=batch_size)


def _flat(tensor: tf.Tensor) -> tf.Tensor:
    """(K, N, …) → (K·N, …): row view·N + i is example i of a view (a reshape, no copy)."""
    return tf.reshape(tensor, [-1, *tensor.shape[2:]])


def _batches(cache: FeatureCache, view: tf.Tensor, order: tf.Tensor, batch_size: int) -> tf.data.Dataset:
    """Batches of view `view` (int scalar) in `order` (int (N,)): ({"features", "metadata"}, labels)."""
    features, metadata, labels = _flat(cache.features), _flat(cache.metadata), _flat(cache.labels)
    rows = tf.cast(order, tf.int64) + tf.cast(view, tf.int64) * cache.examples  # (N,) into the flat tensors

    def gather(indices: tf.Tensor) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
        # Gathers only this batch's rows (b, …); never copies a whole view.
        return {"features": tf.gather(features, indices), "metadata": tf.gather(metadata, indices)}, tf.gather(
            labels, indices
        )

    return tf.data.Dataset.from_tensor_slices(rows).batch(batch_size).map(gather)


def train_dataset(
    cache: FeatureCache, seed: int = 0, batch_size: int | None = None, epoch: int = 0, step: int = 0
) -> tf.data.Dataset:
    """Endless batches from (epoch, step): epoch e = view e % K in an order drawn from (seed, e) alone;
    fit it with `steps_per_epoch`. A run resumed at (e, s) sees the very batches it would have seen.

    Each epoch is exactly ceil(N / batch) batches (the last one may be partial, as in the uncached
    pipeline), so with `steps_per_epoch` Keras keeps one iterator and epochs align with views.
    """
    batch = batch_size or cache.batch_size
    n = cache.examples

    def one_epoch(number: tf.Tensor) -> tf.data.Dataset:
        pair = tf.stack([tf.constant(seed, tf.int64), number])
        order = tf.random.experimental.stateless_shuffle(tf.range(n), seed=pair)
        return _batches(cache, number % cache.views, order, batch)

    stream = tf.data.Dataset.counter(epoch).flat_map(one_epoch).skip(step)  # skipped batches: a gather each
    return data.with_sharding_options(stream.prefetch(data.AUTOTUNE))


def eval_dataset(cache: FeatureCache, batch_size: int | None = None) -> tf.data.Dataset:
    """View 0 once, in the input order (a finite dataset, like utilities.data.pipeline's val/test)."""
    order = tf.range(cache.examples)
    batches = _batches(cache, tf.constant(0, tf.int64), order, batch_size or cache.batch_size)
    return data.with_sharding_options(batches.prefetch(data.AUTOTUNE))


def cache_dataset(
    extractor: tf_keras.Model,
    dataset: tf.data.Dataset,
    views: int = 1,
    seed: int = 0,
    *,
    shuffle: bool = False,
    augmentation: data.Augmentation | None = None,
) -> tf.data.Dataset:
    """Features computed once, served from memory as ({"features", "metadata"}, labels) batches.

    shuffle=False: one finite pass over view 0 in input order (val/test). shuffle=True: the endless
    train stream of `train_dataset` (fit it with `steps_per_epoch`). See `compute_features` for
    `views`, `seed` and `augmentation`.
    """
    cache = compute_features(extractor, dataset, views, seed, augmentation)
    return train_dataset(cache, seed) if shuffle else eval_dataset(cache)


@dataclass(frozen=True)
class CachedData:
    """What `fit` needs to train the head on cached features."""

    train: tf.data.Dataset  # endless from the start position (epoch e = view e % K): fit it with steps_per_epoch
    val: tf.data.Dataset  # one pass, input order
    steps_per_epoch: int  # ceil(train examples / global batch), as the uncached pipeline
    views: int


def cache_datasets(
    model: tf_keras.Model, datasets: data.Datasets, config: Config, epoch: int = 0, step: int = 0
) -> CachedData:
    """Train (K views, see `view_count`) and val features of the job's datasets; one inference pass per view.

    The train stream starts at (epoch, step), where a resumed run continues (see `train_dataset`).
    """
    extractor = feature_extractor(model)
    train = compute_features(extractor, datasets.train, view_count(config), config.train.seed)
    return CachedData(
        train=train_dataset(train, config.train.seed, epoch=epoch, step=step),
        val=cache_dataset(extractor, datasets.val),
        steps_per_epoch=data.batches_per_epoch(train.examples, train.batch_size),
        views=train.views,
    )


__all__ = [
    "MAX_VIEWS",
    "CachedData",
    "FeatureCache",
    "FeatureCacheError",
    "cache_dataset",
    "cache_datasets",
    "compute_features",
    "eval_dataset",
    "feature_extractor",
    "head_model",
    "train_dataset",
    "view_count",
]
