"""Reading side of the versioned data: manifest, shard cache, record parsing, tf.data pipeline.

Library module (no command line). Typical use, as in `training.run`:

    manifest = load_manifest("Versioning/versioned_paths.pickle")
    shards = fetch_shards(manifest, ".cache/shards")            # local paths, sha256-checked
    data = build_datasets(shards, image_size=64, global_batch_size=32, seed=42)
    model.fit(data.train, validation_data=data.val, class_weight=data.class_weights)

Tests: `.venv/bin/python -m pytest tests/test_data.py -q`.

Batches are `({"image": float32[B,S,S,3] in 0..255, "metadata": float32[B,28]}, float32[B,8] one-hot)`.
Pixels are NOT normalized here: DenseNet preprocessing lives inside the model, so an exported model
takes raw pixels.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from utilities import manifest as manifest_format
from utilities import storage
from utilities.errors import JobError, one_line
from utilities.manifest import Manifest
from utilities.progress import Progress
from utilities.schema import CLASS_NAMES, METADATA_NAMES, METADATA_SIZE, NUM_CLASSES, SPLITS

_CHUNK = 1 << 20  # bytes per read when hashing
_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "metadata": tf.io.FixedLenFeature([METADATA_SIZE], tf.int64),
    "label": tf.io.FixedLenFeature([NUM_CLASSES], tf.int64),
}
_LABEL_ONLY = {"label": _FEATURES["label"]}
_JPEG_MAGIC = b"\xff\xd8\xff"
_JPEG_END = b"\xff\xd9"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
AUTOTUNE = tf.data.AUTOTUNE
log = logging.getLogger(__name__)


class DataError(JobError, ValueError):
    """Bad manifest, shard or data argument; the message is one line naming the file."""


# ---------------------------------------------------------------- manifest


def load_manifest(path: str | Path) -> Manifest:
    """Load and validate `versioned_paths.pickle` (local path or gs:// URI); accepts the original three-key form."""
    name = str(path)
    try:
        # Local: refused past the loader's size cap before reading (`--manifest /dev/zero` must not hang).
        data = storage.read_bytes(name) if storage.is_gcs(name) else manifest_format.read_file(name)
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


def _check_metadata_columns(manifest: Manifest) -> None:
    """Records whose manifest names other metadata columns (or another order) would be read as wrong ages."""
    names = tuple((manifest.schema or {}).get("metadata_names") or METADATA_NAMES)
    if names != METADATA_NAMES:
        first = next(i for i, (a, b) in enumerate(zip(names, METADATA_NAMES, strict=False)) if a != b)
        raise DataError(
            f"manifest {manifest.path} has metadata column {first} = {names[first]!r} where this job reads "
            f"{METADATA_NAMES[first]!r} (the original DermAID order); re-run tools.prepare on the source images"
        )


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a local file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------- shard cache


def _verify_digest(path: Path, expected: str | None, uri: str) -> None:
    if expected is None:
        return
    actual = file_sha256(path)
    if actual != expected:
        raise DataError(
            f"shard {uri} fails its checksum: manifest says sha256 {expected[:12]}…, file has {actual[:12]}…"
        )


def _fetch_remote(uri: str, expected: str | None, cache: Path) -> tuple[Path, bool]:
    """`(local copy, downloaded?)`: a cached copy is reused while it is still the same object.

    With a sha256 in the manifest the copy is named and checked by it; without one (the original's
    three-key pickles) by the object's generation and crc32c in the bucket (`storage.fetch_to_cache`).
    """
    try:
        if expected is None:
            return storage.fetch_to_cache(uri, cache)
        target = cache / f"{expected}.tfrecords"
        if target.is_file() and file_sha256(target) == expected:
            return target, False
        storage.download_file(uri, target)  # atomic: temp file + rename
    except storage.StorageError as err:
        raise DataError(f"cannot fetch shard {uri}: {one_line(err)}") from None
    try:
        _verify_digest(target, expected, uri)
    except DataError:
        target.unlink(missing_ok=True)
        raise
    return target, True


def _fetch_local(uri: str, expected: str | None, split: str) -> Path:
    path = Path(uri[len("file://") :] if uri.startswith("file://") else uri)
    if not path.is_file():
        raise DataError(f"shard {uri} listed for {split} does not exist")
    _verify_digest(path, expected, uri)  # ~1 s per GB; catches shards changed after the manifest
    return path


def fetch_shards(manifest: Manifest, cache_dir: str | Path) -> dict[str, list[str]]:
    """Local paths of every split's shards; gs:// shards are downloaded into `cache_dir`, all checked by sha256."""
    cache = Path(cache_dir)
    local: dict[str, list[str]] = {}
    fetched = cached = 0
    progress = Progress(sum(len(uris) for uris in manifest.splits.values()), "fetch and check", "shard")
    for split, uris in manifest.splits.items():
        local[split] = []
        for uri in uris:
            expected = manifest.sha256.get(uri)
            if storage.is_gcs(uri):
                cache.mkdir(parents=True, exist_ok=True)
                path, downloaded = _fetch_remote(uri, expected, cache)
                fetched, cached = fetched + downloaded, cached + (not downloaded)
            else:
                path = _fetch_local(uri, expected, split)
            _check_framing(path)  # before any TFRecordDataset reads it (count_labels, the pipeline)
            local[split].append(str(path))
            progress.advance()
    progress.done()
    if fetched or cached:
        log.info("remote shards: %d downloaded, %d found in the cache %s", fetched, cached, cache)
    return local


def _check_record(data: bytes, path: str | Path, index: int) -> None:
    where = f"shard {path} record {index}"
    try:
        features = tf.train.Example.FromString(data).features.feature
    except Exception as err:
        raise DataError(f"{where} is not a tf.train.Example: {one_line(err)}") from None
    if len(features["image"].bytes_list.value) != 1:
        raise DataError(f"{where}: feature image must hold exactly one bytes value")
    for key, size in (("metadata", METADATA_SIZE), ("label", NUM_CLASSES)):
        values = features[key].int64_list.value
        if len(values) != size or not set(values) <= {0, 1}:
            raise DataError(f"{where}: feature {key} must hold {size} int64 values, each 0 or 1")
    if sum(features["label"].int64_list.value) != 1:
        raise DataError(f"{where}: feature label is not one-hot")


_HEADER = 12  # a TFRecord: uint64 length, uint32 masked crc32c of it, data, uint32 masked crc32c of the data


def _check_framing(path: str | Path) -> int:
    """Walk the record headers; return the count. TensorFlow trusts a length whose CRC matches: a
    crafted header announcing 2^40 bytes kills the process (SIGSEGV) instead of raising."""
    import google_crc32c  # a dependency of google-cloud-storage

    size = Path(path).stat().st_size
    offset = index = 0
    with open(path, "rb") as fh:
        while offset < size:
            header = fh.read(_HEADER)
            length = int.from_bytes(header[:8], "little")
            crc = google_crc32c.value(header[:8])
            masked = (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
            where = f"shard {path} is corrupt or truncated at record {index}"
            if len(header) < _HEADER or int.from_bytes(header[8:], "little") != masked:
                raise DataError(f"{where}: its header at byte {offset} is cut or fails its CRC")
            if offset + _HEADER + length + 4 > size:
                raise DataError(f"{where}: its header announces {length:,} bytes, the file has {size - offset:,} left")
            offset += _HEADER + length + 4
            fh.seek(offset)
            index += 1
    return index


def verify_shard(path: str | Path) -> int:
    """Read every record (length and data CRCs, Example structure); return the count. Bad → DataError naming the record."""
    if not Path(path).is_file():
        raise DataError(f"shard {path} does not exist")
    _check_framing(path)
    count = 0
    try:
        for record in tf.data.TFRecordDataset(str(path)):
            _check_record(record.numpy(), path, count)
            count += 1
    except tf.errors.OpError as err:  # DataLossError: truncated file or CRC mismatch
        message = one_line(re.sub(r"\{\{function_node [^}]*\}\}\s*|\s*\[Op:.*", "", err.message, flags=re.S))
        raise DataError(f"shard {path} is corrupt or truncated at record {count}: {message}") from None
    return count


# ---------------------------------------------------------------- parsing


def _has_prefix(data: tf.Tensor, prefix: bytes) -> tf.Tensor:
    return tf.equal(tf.strings.substr(data, 0, len(prefix)), prefix)


def _raw_side(data: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(side, is square raw uint8 RGB) of one image's bytes, from its length (side = sqrt(len / 3))."""
    length = tf.strings.length(data)
    side = tf.cast(tf.round(tf.sqrt(tf.cast(length // 3, tf.float64))), tf.int32)
    return side, tf.equal(side * side * 3, length)


def _is_encoded(data: tf.Tensor) -> tf.Tensor:
    """JPEG or PNG by magic number; a raw array whose first pixel looks like a JPEG header is told
    apart by its length and the JPEG end marker."""
    _, raw_ok = _raw_side(data)
    tail = tf.strings.substr(data, tf.maximum(tf.strings.length(data) - 2, 0), 2)
    jpeg = _has_prefix(data, _JPEG_MAGIC) & (tf.logical_not(raw_ok) | tf.equal(tail, _JPEG_END))
    return jpeg | _has_prefix(data, _PNG_MAGIC)


def decode_image(data: tf.Tensor, image_size: int) -> tf.Tensor:
    """Bytes → float32 [image_size, image_size, 3] in 0..255.

    Accepts raw uint8 RGB of any square side or JPEG/PNG (see `_is_encoded`); resized when needed.
    """
    side, raw_ok = _raw_side(data)

    def raw() -> tf.Tensor:
        check = tf.debugging.assert_equal(
            raw_ok, True, message="image bytes are neither JPEG/PNG nor square raw uint8 RGB"
        )
        with tf.control_dependencies([check]):
            return tf.reshape(tf.io.decode_raw(data, tf.uint8), [side, side, 3])

    def decoded() -> tf.Tensor:
        return tf.io.decode_image(data, channels=3, expand_animations=False)

    pixels = tf.cond(_is_encoded(data), decoded, raw)  # uint8 [h, w, 3]
    same = tf.reduce_all(tf.equal(tf.shape(pixels)[:2], image_size))
    image = tf.cond(
        same,
        lambda: tf.cast(pixels, tf.float32),
        lambda: tf.image.resize(pixels, [image_size, image_size], method="bilinear", antialias=True),
    )
    return tf.ensure_shape(image, [image_size, image_size, 3])


def parse_example(serialized: tf.Tensor, image_size: int) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
    """One serialized Example → ({"image": float32[S,S,3] 0..255, "metadata": float32[28]}, float32[8] one-hot)."""
    parsed = tf.io.parse_single_example(serialized, _FEATURES)
    features = {"image": decode_image(parsed["image"], image_size), "metadata": tf.cast(parsed["metadata"], tf.float32)}
    return features, tf.cast(parsed["label"], tf.float32)


def parse_raw_batch(serialized: tf.Tensor, image_size: int) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
    """Serialized Examples [B] whose images are raw uint8 at `image_size` (what tools.prepare writes) →
    the same structure as `parse_example`, batched: one parse, one decode_raw and one cast per batch,
    ~5× cheaper than parsing example by example. Any other image fails the step with a clear message.
    """
    parsed = tf.io.parse_example(serialized, _FEATURES)
    check = tf.debugging.assert_equal(
        tf.strings.length(parsed["image"]),
        image_size * image_size * 3,
        message=f"a record's image is not raw uint8 {image_size}x{image_size}x3 like the first record of its "
        "shard; a shard must hold one encoding and size (re-run tools.prepare)",
    )
    with tf.control_dependencies([check]):
        pixels = tf.reshape(tf.io.decode_raw(parsed["image"], tf.uint8), [-1, image_size, image_size, 3])
    features = {"image": tf.cast(pixels, tf.float32), "metadata": tf.cast(parsed["metadata"], tf.float32)}
    return features, tf.cast(parsed["label"], tf.float32)


def shards_are_raw(paths: list[str], image_size: int) -> bool:
    """True when the first record of every shard holds raw uint8 RGB at `image_size` (see `decode_image`).

    One record per shard: a shard is written by one tools.prepare run, so its records are alike,
    but a split may combine shards of different origins.
    """
    if not paths:
        return False
    for path in paths:
        for serialized in tf.data.TFRecordDataset(path).take(1):
            image = tf.io.parse_single_example(serialized, _FEATURES)["image"]
            if not bool(tf.strings.length(image) == image_size * image_size * 3) or bool(_is_encoded(image)):
                return False
    return True


def parse_batches(records: tf.data.Dataset, image_size: int, batch: int, raw: bool) -> tf.data.Dataset:
    """Serialized records → batches of ({"image", "metadata"}, labels), in record order.

    `raw` (see `shards_are_raw`): batch first, then `parse_raw_batch`; else each example is
    decoded on its own (JPEG/PNG, other sizes), then batched. drop_remainder=False: every example is
    seen each epoch; Keras and tf.distribute handle a short last batch (split unevenly across replicas).
    """
    if raw:
        batches = records.batch(batch, drop_remainder=False)
        return batches.map(lambda s: parse_raw_batch(s, image_size), num_parallel_calls=AUTOTUNE, deterministic=True)
    parsed = records.map(lambda s: parse_example(s, image_size), num_parallel_calls=AUTOTUNE, deterministic=True)
    return parsed.batch(batch, drop_remainder=False)


# ---------------------------------------------------------------- augmentation


@dataclass(frozen=True)
class Augmentation:
    """Random geometric changes of training images; lesions have no canonical orientation."""

    flip: bool = True  # horizontal and vertical, each with p = 0.5
    rotation: float = 0.1  # max |angle| as a fraction of a full turn (0.1 → ±36°)
    shift: float = 0.1  # max |translation| as a fraction of the side
    zoom: float = 0.1  # max relative change of scale (0.1 → 0.9×..1.1×)


def _affine(
    batch: tf.Tensor, height: tf.Tensor, width: tf.Tensor, aug: Augmentation, seeds: tf.Tensor, flips: tf.Tensor
) -> tf.Tensor:
    """Per-image transforms [B, 8] mapping output pixel → input pixel (ImageProjectiveTransformV3 convention).

    `flips` bool [B, 2] (left-right, up-down) mirror the input image first, folded into the same
    transform: x_in → (W-1) - x_in is a sign change plus an offset, so a flip costs nothing extra.
    """
    angle = tf.random.stateless_uniform([batch], seeds[0], -aug.rotation * 2 * math.pi, aug.rotation * 2 * math.pi)
    scale = tf.random.stateless_uniform([batch], seeds[1], 1 - aug.zoom, 1 + aug.zoom)  # > 1 zooms in
    tx = tf.random.stateless_uniform([batch], seeds[2], -aug.shift, aug.shift) * width
    ty = tf.random.stateless_uniform([batch], seeds[3], -aug.shift, aug.shift) * height
    cx, cy = (width - 1) / 2, (height - 1) / 2  # rotate and zoom about the image centre
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    sign = tf.where(flips, -1.0, 1.0)  # [B, 2]
    offset = tf.where(flips, tf.stack([width - 1, height - 1]), 0.0)  # [B, 2]
    sx, sy, ox, oy = sign[:, 0], sign[:, 1], offset[:, 0], offset[:, 1]
    zero = tf.zeros_like(angle)
    return tf.stack(
        [
            sx * cos,
            -sx * sin,
            sx * (cx - cos * cx + sin * cy - tx) + ox,
            sy * sin,
            sy * cos,
            sy * (cy - sin * cx - cos * cy - ty) + oy,
            zero,
            zero,
        ],
        axis=1,
    )


def augment_images(images: tf.Tensor, seed: tf.Tensor, aug: Augmentation = Augmentation()) -> tf.Tensor:
    """float32 [B,H,W,3] → same shape, randomly flipped/rotated/shifted/zoomed; `seed` int [2] (stateless ops).

    One bilinear resampling per batch does all of it: the flips are folded into the affine transform
    (mirroring with tf.reverse + tf.where cost as much as the whole transform).
    """
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 6)
    shape = tf.shape(images)
    batch, height, width = shape[0], tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
    if aug.flip:
        left_right = tf.random.stateless_uniform([batch], seeds[4]) < 0.5
        up_down = tf.random.stateless_uniform([batch], seeds[5]) < 0.5
        flips = tf.stack([left_right, up_down], axis=1)  # [B, 2]
    else:
        flips = tf.zeros([batch, 2], tf.bool)
    if not (aug.flip or aug.rotation or aug.shift or aug.zoom):
        return images
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=_affine(batch, height, width, aug, seeds, flips),
        output_shape=shape[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="REFLECT",  # no black corners: the skin continues
    )


def make_augmenter(aug: Augmentation = Augmentation()) -> Callable[..., tuple[dict[str, tf.Tensor], tf.Tensor]]:
    """A map function for `zip(batches, seeds)`: ((features, labels), seed[2]) → (features, labels), image augmented."""

    def augment_batch(
        batch: tuple[dict[str, tf.Tensor], tf.Tensor], seed: tf.Tensor
    ) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
        features, labels = batch
        return {**features, "image": augment_images(features["image"], seed, aug)}, labels

    return augment_batch


def batch_seeds(seed: int, first: int = 0) -> tf.data.Dataset:
    """Endless int64 [2] seeds `(seed, i)` for batches i = first, first + 1, …: batch i's augmentation
    depends on its position alone, so a run resumed mid-epoch augments the rest exactly as before."""
    return tf.data.Dataset.counter(first).map(lambda i: tf.stack([tf.constant(seed, tf.int64), i]))


def augment_dataset(
    batches: tf.data.Dataset, seeds: tf.data.Dataset, aug: Augmentation = Augmentation()
) -> tf.data.Dataset:
    """Augment a dataset of batches with one int64 [2] seed per batch (see `batch_seeds`)."""
    return tf.data.Dataset.zip((batches, seeds)).map(make_augmenter(aug), num_parallel_calls=AUTOTUNE)


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


def count_labels(paths: list[str]) -> np.ndarray:
    """Examples per class in these shards, int64 [8]; reads only the label feature."""
    if not paths:
        return np.zeros(NUM_CLASSES, np.int64)
    # 64 records a batch: at 256 px a record is ~197 KB, so 1,024 held 200 MB only to read 8 integers
    # each (bench.scale: +200 MB peak RSS vs +29 MB, same 1.6 s over 2,000 images).
    labels = tf.data.TFRecordDataset(paths, num_parallel_reads=min(len(paths), 8)).batch(64)
    labels = labels.map(lambda s: tf.io.parse_example(s, _LABEL_ONLY)["label"], num_parallel_calls=AUTOTUNE)
    total = np.zeros(NUM_CLASSES, np.int64)
    try:
        for batch in labels:
            total += batch.numpy().sum(axis=0)
    except tf.errors.OpError as err:
        for path in paths:  # name the bad shard when one is corrupt
            verify_shard(path)
        raise DataError(
            f"cannot read labels from {len(paths)} shard(s) starting with {paths[0]}: {one_line(err.message)}"
        ) from None
    return total


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


def _with_sharding_options(dataset: tf.data.Dataset) -> tf.data.Dataset:
    options = tf.data.Options()
    # Under MultiWorkerMirroredStrategy, FILE sharding would give workers different numbers of batches
    # when shards are few or uneven (and the job would hang); DATA sharding is correct because every
    # worker builds the identical, identically seeded pipeline.
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
    augment: bool
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
        if not self.augment:
            return batches
        if again:
            return augment_dataset(batches, tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2))
        return augment_dataset(batches, batch_seeds(seed, skip))

    def one_epoch(self) -> tf.data.Dataset:
        """One epoch, in a new order on every pass: Keras iterates it once per epoch."""
        return _with_sharding_options(_with_length(self.epoch(None), self.steps).prefetch(AUTOTUNE))

    def stream(self, epoch: int, step: int, epochs: int) -> tf.data.Dataset:
        """The rest of epoch `epoch` from batch `step`, then each epoch up to `epochs` (exclusive): what
        `fit(..., steps_per_epoch=steps, epochs=epochs)` started at (epoch, step) consumes, exactly."""
        parts = [self.epoch(e, skip=step if e == epoch else 0) for e in range(epoch, max(epochs, epoch + 1))]
        whole = functools.reduce(tf.data.Dataset.concatenate, parts)
        length = max(epochs - epoch, 1) * self.steps - step
        return _with_sharding_options(_with_length(whole, length).prefetch(AUTOTUNE))


def _eval_dataset(paths: list[str], image_size: int, batch: int, steps: int) -> tf.data.Dataset:
    # Sequential: file order = manifest order, stable. (An empty list needs an explicit string dtype.)
    records = tf.data.TFRecordDataset(tf.constant(paths, tf.string, shape=[len(paths)]))
    batches = parse_batches(records, image_size, batch, raw=shards_are_raw(paths, image_size))
    return _with_sharding_options(_with_length(batches, steps).prefetch(AUTOTUNE))


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


def build_datasets(
    shards: Mapping[str, list[str]],
    image_size: int,
    global_batch_size: int,
    seed: int,
    augment: bool = True,
    shuffle_buffer: int = 2048,
) -> Datasets:
    """Train/val/test pipelines from local shard paths (see `fetch_shards`), plus counts and class weights.

    Reads every shard's labels once (labels only) to count examples; touches nothing else.
    """
    _check_build_arguments(shards, image_size, global_batch_size, shuffle_buffer)
    class_counts = {split: tuple(int(c) for c in count_labels(list(shards[split]))) for split in SPLITS}
    counts = {split: sum(c) for split, c in class_counts.items()}
    steps = {split: math.ceil(n / global_batch_size) for split, n in counts.items()}
    paths = tuple(shards["train"])
    split = _TrainSplit(
        paths,
        image_size,
        global_batch_size,
        seed,
        augment,
        shuffle_buffer,
        steps["train"],
        shards_are_raw(list(paths), image_size),
    )
    return Datasets(
        train=split.one_epoch(),
        train_clean=dataclasses.replace(split, augment=False).one_epoch(),
        train_from=split.stream,
        val=_eval_dataset(list(shards["val"]), image_size, global_batch_size, steps["val"]),
        test=_eval_dataset(list(shards["test"]), image_size, global_batch_size, steps["test"]),
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
