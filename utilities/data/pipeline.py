"""The training job's data entry points: the manifest loaded, its shards fetched, the train/val/test tf.data pipelines built.

Library module (no command line). Typical use, as in `training.run`:

    manifest = load_manifest("Versioning/versioned_paths.pickle")
    shards = fetch_shards(manifest, ".cache/shards")            # local paths, sha256-checked
    data = build_datasets(shards, image_size=64, global_batch_size=32, seed=42)
    model.fit(data.train, validation_data=data.val, class_weight=data.class_weights)

Tests: `.venv/bin/python -m pytest tests/test_data.py -q`.

Batches are `({"image": float32[B,S,S,3] in 0..255, "metadata": float32[B,28]}, float32[B,8] one-hot)`.
Pixels are NOT normalized here: DenseNet preprocessing lives inside the model, so an exported model
takes raw pixels. The parts live in `utilities.data.shards` (fetching and checking one shard),
`utilities.data.records` (decoding records, counting labels) and `utilities.data.augmentation`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from utilities import storage
from utilities.data import manifest as manifest_format
from utilities.data import shards as shard_files
from utilities.data.augmentation import Augmentation, augment_dataset, batch_seeds
from utilities.data.manifest import Manifest
from utilities.data.records import Identities, count_labels, parse_batches, read_identities, shards_are_raw
from utilities.data.schema import CLASS_NAMES, METADATA_NAMES, NUM_CLASSES, SPLITS
from utilities.data.shards import DataError
from utilities.errors import one_line
from utilities.progress import Progress

AUTOTUNE = tf.data.AUTOTUNE
log = logging.getLogger(__name__)

__all__ = [
    "AUTOTUNE",
    "Augmentation",
    "DataError",
    "Datasets",
    "EvalData",
    "augment_dataset",
    "batch_seeds",
    "build_datasets",
    "build_eval_data",
    "class_weights_from_counts",
    "fetch_shards",
    "labels_of",
    "load_manifest",
]


# ---------------------------------------------------------------- manifest and shards


def load_manifest(path: str | Path) -> Manifest:
    """Load and validate `versioned_paths.pickle` (local path or gs:// URI); accepts the original three-key form."""
    name = str(path)
    try:
        data = _read_manifest(name)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise DataError(
            f"manifest {name} not found; fetch it with `sh dvc_pull.sh -t TAG` (or pass --manifest PATH)"
        ) from None
    except (OSError, storage.StorageError) as err:
        raise DataError(f"cannot read manifest {name}: {one_line(err)}") from None
    except manifest_format.ManifestError as err:  # over the size cap
        raise DataError(str(err)) from None
    try:
        manifest = manifest_format.parse(data, name)
    except manifest_format.ManifestError as err:
        raise DataError(str(err)) from None
    _check_metadata_columns(manifest)
    return manifest


def _read_manifest(name: str) -> bytes:
    """The manifest's bytes, refused past the loader's size cap before reading: a local `--manifest
    /dev/zero` must not hang, and a gs:// one is sized from its metadata, never downloaded."""
    if not storage.is_gcs(name):
        return manifest_format.read_file(name)
    try:
        return storage.read_bytes(name, max_bytes=manifest_format.MAX_BYTES)
    except storage.TooLarge as err:
        manifest_format.check_size(err.size, name)  # raises the local file's refusal, word for word
        raise


def _check_metadata_columns(manifest: Manifest) -> None:
    """Records whose manifest names other metadata columns (or another order) would be read as wrong ages."""
    names = tuple((manifest.schema or {}).get("metadata_names") or METADATA_NAMES)
    if names != METADATA_NAMES:
        first = next(i for i, (a, b) in enumerate(zip(names, METADATA_NAMES, strict=False)) if a != b)
        raise DataError(
            f"manifest {manifest.path} has metadata column {first} = {names[first]!r} where this job reads "
            f"{METADATA_NAMES[first]!r} (the original DermAID order); re-run tools.prepare on the source images"
        )


def fetch_shards(manifest: Manifest, cache_dir: str | Path) -> dict[str, list[str]]:
    """Local paths of every split's shards; gs:// shards are downloaded into `cache_dir`, all checked by sha256."""
    cache = Path(cache_dir)
    local: dict[str, list[str]] = {}
    fetched = cached = 0
    progress = Progress(sum(len(uris) for uris in manifest.splits.values()), "fetch and check", "shard")
    files: dict[tuple[int, int], str] = {}  # (device, inode) → "split[i] URI": one file under two names
    for split, uris in manifest.splits.items():
        local[split] = []
        for index, uri in enumerate(uris):
            path, downloaded = shard_files.fetch(uri, manifest.sha256_of(uri), split, cache)
            if downloaded is not None:
                fetched, cached = fetched + downloaded, cached + (not downloaded)
            if not storage.is_gcs(uri):  # a cached copy is named by its digest, already compared
                _check_one_listing(files, path, f"{split}[{index}] {uri}", manifest.path)
            local[split].append(str(path))
            progress.advance()
    progress.done()
    if fetched or cached:
        log.info("remote shards: %d downloaded, %d found in the cache %s", fetched, cached, cache)
    return local


def _check_one_listing(files: dict[tuple[int, int], str], path: Path, where: str, manifest: str) -> None:
    """The manifest refused two URIs of one shard (`manifest.shard_key`); a symbolic or hard link still
    names one file twice, and only the file system can tell. Local shards only: the shard cache is shared
    by processes that replace its files, so an inode seen there may be reused by another shard's copy."""
    stat = path.stat()
    first = files.setdefault((stat.st_dev, stat.st_ino), where)
    if first != where:
        raise DataError(
            f"manifest {manifest}: {where} is the same file as {first} (a link); each shard must be listed once, "
            "in one split"
        )


# ---------------------------------------------------------------- pipeline


@dataclass(frozen=True)
class Datasets:
    train: tf.data.Dataset  # one epoch, shuffled (a new order on every pass), augmented; last batch may be partial
    val: tf.data.Dataset  # file order, not augmented
    test: tf.data.Dataset  # file order, not augmented
    class_weights: dict[int, float]  # balanced, from the train split only
    counts: dict[str, int]  # examples per split
    class_counts: dict[str, tuple[int, ...]]  # examples per split per class, CLASS_NAMES order
    steps_per_epoch: dict[str, int]  # batches per split, ceil(count / global_batch_size)
    train_clean: tf.data.Dataset | None = None  # train, shuffled but not augmented (BatchNorm re-estimation)
    # `train_from(epoch, step, epochs)`: the train batches of epochs `epoch`..`epochs` - 1 from batch `step`;
    # epoch e's order and augmentation depend on (seed, e) alone, so a run resumed at (e, s) sees the very
    # batches it would have seen. Fit it with steps_per_epoch.
    train_from: Callable[[int, int, int], tf.data.Dataset] | None = None
    identities: Mapping[str, Identities] = dataclasses.field(default_factory=dict)  # val/test: names, metadata, labels


@dataclass(frozen=True)
class EvalData:
    """The evaluated splits alone (tools.evaluate): val/test batches in file order and who each row is."""

    val: tf.data.Dataset
    test: tf.data.Dataset
    identities: Mapping[str, Identities]  # "val"/"test" → names, metadata, labels in the datasets' order
    steps_per_epoch: dict[str, int]


def build_eval_data(shards: Mapping[str, list[str]], image_size: int, batch: int) -> EvalData:
    """Val and test pipelines (file order, not augmented) and their records' identities (one label pass)."""
    identities = {split: read_identities(list(shards.get(split, [])), split) for split in ("val", "test")}
    steps = {split: batches_per_epoch(len(who.labels), batch) for split, who in identities.items()}
    datasets = {split: _eval_dataset(list(shards.get(split, [])), image_size, batch, steps[split]) for split in steps}
    return EvalData(datasets["val"], datasets["test"], identities, steps)


def class_weights_from_counts(counts: Iterable[int]) -> dict[int, float]:
    """Balanced weights n_total / (n_classes * n_c); every class must be present."""
    counts = [int(c) for c in counts]
    for index, count in enumerate(counts):
        if count == 0:
            raise DataError(
                f"class {CLASS_NAMES[index]} has no training examples; class weights need every class in train"
            )
    total = sum(counts)
    return {i: total / (len(counts) * c) for i, c in enumerate(counts)}


def batches_per_epoch(examples: int, batch_size: int) -> int:
    """An epoch's batches: every example once, the last batch possibly partial (never dropped)."""
    return math.ceil(examples / batch_size)


def with_sharding_options(dataset: tf.data.Dataset) -> tf.data.Dataset:
    options = tf.data.Options()
    # Under MultiWorkerMirroredStrategy, FILE sharding would give workers different numbers of batches
    # when shards are few or uneven (and the job would hang); DATA sharding is correct because every
    # worker builds the identical, identically seeded pipeline (and holds the identical feature cache).
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def _with_length(batches: tf.data.Dataset, steps: int) -> tf.data.Dataset:
    """Declare the number of batches (counted when the labels were read). Keras then knows an epoch's
    length from the start: progress totals, and no end-of-data probe step (with an unknown length
    tf_keras' Adam counts one extra iteration at the end of the first epoch)."""
    return batches.apply(tf.data.experimental.assert_cardinality(steps))


@dataclass(frozen=True)
class _TrainSplit:
    """How the train split is read; `epoch(e, skip)` gives epoch e's batches, the first `skip` left out."""

    paths: tuple[str, ...]
    image_size: int
    batch: int
    seed: int
    augmentation: Augmentation | None  # None: not augmented
    buffer: int
    steps: int
    raw: bool

    def epoch(self, epoch: int | None, skip: int = 0) -> tf.data.Dataset:
        """Epoch `epoch`'s batches, the first `skip` left out: order and augmentation depend on (seed, epoch)
        alone. None: a new order and new augmentation on every pass (seeded by the run's seed)."""
        seed = self.seed if epoch is None else (self.seed * 1_000_003 + epoch) % (2**31 - 1)
        again = epoch is None  # reshuffle on every pass
        files = tf.data.Dataset.from_tensor_slices(list(self.paths)).shuffle(
            len(self.paths), seed=seed, reshuffle_each_iteration=again
        )
        records = files.interleave(
            tf.data.TFRecordDataset,
            cycle_length=min(len(self.paths), 8),
            num_parallel_calls=AUTOTUNE,
            deterministic=True,
        )
        # Shuffle serialized records (before decoding: cheaper to hold), then decode in parallel.
        records = records.shuffle(self.buffer, seed=seed, reshuffle_each_iteration=again)
        batches = parse_batches(records.skip(skip * self.batch), self.image_size, self.batch, raw=self.raw)
        if self.augmentation is None:
            return batches
        if again:
            seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
            return augment_dataset(batches, seeds, self.augmentation)
        return augment_dataset(batches, batch_seeds(seed, skip), self.augmentation)

    def one_epoch(self) -> tf.data.Dataset:
        """One epoch, in a new order on every pass: Keras iterates it once per epoch."""
        return with_sharding_options(_with_length(self.epoch(None), self.steps).prefetch(AUTOTUNE))

    def stream(self, epoch: int, step: int, epochs: int) -> tf.data.Dataset:
        """The rest of epoch `epoch` from batch `step`, then each epoch up to `epochs` (exclusive): what
        `fit(..., steps_per_epoch=steps, epochs=epochs)` started at (epoch, step) consumes, exactly."""
        parts = [self.epoch(e, skip=step if e == epoch else 0) for e in range(epoch, max(epochs, epoch + 1))]
        whole = functools.reduce(tf.data.Dataset.concatenate, parts)
        length = max(epochs - epoch, 1) * self.steps - step
        return with_sharding_options(_with_length(whole, length).prefetch(AUTOTUNE))


def _eval_dataset(paths: list[str], image_size: int, batch: int, steps: int) -> tf.data.Dataset:
    # Sequential: file order = manifest order, stable. (An empty list needs an explicit string dtype.)
    records = tf.data.TFRecordDataset(tf.constant(paths, tf.string, shape=[len(paths)]))
    batches = parse_batches(records, image_size, batch, raw=shards_are_raw(paths, image_size))
    return with_sharding_options(_with_length(batches, steps).prefetch(AUTOTUNE))


def _check_build_arguments(
    shards: Mapping[str, list[str]], image_size: int, global_batch_size: int, shuffle_buffer: int
) -> None:
    missing = [s for s in SPLITS if s not in shards]
    if missing:
        raise DataError(f"shards have no {', '.join(missing)} split(s)")
    if not shards["train"]:
        raise DataError("there are no train shards")
    if image_size < 1 or global_batch_size < 1 or shuffle_buffer < 1:
        raise DataError("image_size, global_batch_size and shuffle_buffer must be at least 1")


def shuffle_records(paths: Iterable[str], records: int, most: int, memory_mb: float | None) -> int:
    """Records in the train shuffle buffer: `most`, or as many as fit in `memory_mb` of serialized records
    (their mean size, from the shard files): at 256 px a record is ~197 KB, 16× one at 64 px, so a count
    chosen at one size would hold 16× the memory at the other."""
    if memory_mb is None or records == 0:
        return most
    record_bytes = sum(Path(p).stat().st_size for p in paths) / records
    fits = max(1, int(memory_mb * 2**20 // record_bytes))
    if fits < most:
        log.info(
            "shuffle buffer: %d records (%.0f MB of %.0f KB records; --shuffle-buffer %d would hold %.0f MB)",
            fits,
            memory_mb,
            record_bytes / 1024,
            most,
            most * record_bytes / 2**20,
        )
    return min(most, fits)


def build_datasets(
    shards: Mapping[str, list[str]],
    image_size: int,
    global_batch_size: int,
    seed: int,
    augment: bool = True,
    shuffle_buffer: int = 2048,
    shuffle_memory_mb: float | None = None,
    augmentation: Augmentation | None = None,
) -> Datasets:
    """Train/val/test pipelines from local shard paths (see `fetch_shards`), plus counts and class weights.

    Reads every shard's labels and metadata once (no images) to count examples and to refuse, before any
    batch, the first record whose label is not one-hot or whose metadata is not 0/1, naming its shard and
    index (`records.count_labels`, `records.read_identities`); touches nothing else. The train
    shuffle buffer holds `shuffle_buffer` records, or fewer when that many would hold more than
    `shuffle_memory_mb` of serialized records (None: no memory bound); see `shuffle_records`. The train
    split is augmented with `augmentation` (None: `Augmentation()`'s defaults) unless `augment` is off.
    """
    _check_build_arguments(shards, image_size, global_batch_size, shuffle_buffer)
    # The label passes check every record of every split (`records.count_labels`); train's first.
    class_counts = {"train": tuple(int(c) for c in count_labels(list(shards["train"])))}
    evaluated = build_eval_data(shards, image_size, global_batch_size)
    class_counts |= {split: who.class_counts for split, who in evaluated.identities.items()}
    counts = {split: sum(c) for split, c in class_counts.items()}
    steps = {split: batches_per_epoch(n, global_batch_size) for split, n in counts.items()}
    paths = tuple(shards["train"])
    buffer = shuffle_records(paths, counts["train"], shuffle_buffer, shuffle_memory_mb)
    split = _TrainSplit(
        paths,
        image_size,
        global_batch_size,
        seed,
        (augmentation or Augmentation()) if augment else None,
        buffer,
        steps["train"],
        shards_are_raw(list(paths), image_size),
    )
    return Datasets(
        train=split.one_epoch(),
        train_clean=dataclasses.replace(split, augmentation=None).one_epoch(),
        train_from=split.stream,
        val=evaluated.val,
        test=evaluated.test,
        identities=evaluated.identities,
        class_weights=class_weights_from_counts(class_counts["train"]),
        counts=counts,
        class_counts=class_counts,
        steps_per_epoch=steps,
    )


def labels_of(dataset: tf.data.Dataset) -> np.ndarray:
    """Class ids (int64) of a dataset of (features, one-hot labels), batched or not, in dataset order."""
    labels_only = dataset.map(lambda features, labels: labels)
    ids = [np.argmax(np.reshape(labels.numpy(), (-1, NUM_CLASSES)), axis=1) for labels in labels_only]
    return np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, np.int64)
