"""Reading the records: the Example features, image bytes decoded to pixels, serialized records to batches, label counts.

Library module (no command line); `utilities.data.pipeline` builds its pipelines from these:

    features, label = parse_example(serialized, image_size=64)      # one record
    batches = parse_batches(records, 64, 32, raw=shards_are_raw(paths, 64))
    count_labels(paths)                                             # int64 [8], no images read
    who = read_identities(paths, "val")                             # names, metadata, labels in record order

Those two label passes read every record's label and metadata (build_datasets runs them over every split
before any batch) and refuse the first record whose label is not one-hot or whose metadata is not 0/1, or
of the wrong length, naming its shard and index. The pipelines' parse asserts the same (`_checked_values`).

Images are raw uint8 RGB of any square side, JPEG or PNG, resized when needed; pixels stay float32
in 0..255 (DenseNet preprocessing lives inside the model).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from utilities.data.schema import METADATA_SIZE, NUM_CLASSES
from utilities.data.shards import DataError, verify_shard
from utilities.errors import one_line

_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "metadata": tf.io.FixedLenFeature([METADATA_SIZE], tf.int64),
    "label": tf.io.FixedLenFeature([NUM_CLASSES], tf.int64),
}
_IMAGE_ONLY = {"image": _FEATURES["image"]}
# The label pass's view of a record: label and metadata of any length, checked before they are trusted
# (a FixedLenFeature of the wrong length fails with TensorFlow's text, naming no shard).
_CHECKED = {"metadata": tf.io.RaggedFeature(tf.int64), "label": tf.io.RaggedFeature(tf.int64)}
# Evaluation's view of a record: who it is and what is known about it, without its pixels.
_IDENTITY = {
    "image_name": tf.io.FixedLenFeature([], tf.string, default_value=""),  # optional: the original's records lack it
    **_CHECKED,
}
_LABEL_BATCH = 64  # records per batch of the label pass (see count_labels)
_JPEG_MAGIC = b"\xff\xd8\xff"
_JPEG_END = b"\xff\xd9"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
AUTOTUNE = tf.data.AUTOTUNE


# ---------------------------------------------------------------- image bytes


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


# ---------------------------------------------------------------- records


UNCHECKED_RECORD = "a record whose label is not one-hot or whose metadata is not 0/1"


def _valid_rows(metadata: tf.Tensor, label: tf.Tensor) -> tf.Tensor:
    """bool [B]: the record's label (int64 [B, 8]) is one-hot and its metadata (int64 [B, 28]) 0/1."""
    label_ok = tf.reduce_all((label == 0) | (label == 1), axis=-1) & tf.equal(tf.reduce_sum(label, axis=-1), 1)
    return label_ok & tf.reduce_all((metadata == 0) | (metadata == 1), axis=-1)


def _checked_values(parsed: dict[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
    """(metadata, label) as float32, asserted valid. The label pass (`count_labels`, `read_identities`) has
    named any bad record by shard and index before training; this catches one changed since, in a few
    integer ops per batch (measured CPU per pass: 2,000 records at 256 px 1.70 → 1.78 s, within noise;
    400 at 64 px 0.14 → 0.18 s; a DenseNet121 epoch over them takes seconds to minutes)."""
    check = tf.debugging.Assert(
        tf.reduce_all(_valid_rows(parsed["metadata"], parsed["label"])),
        [f"{UNCHECKED_RECORD} (was the shard changed after the datasets were built?)"],
    )
    with tf.control_dependencies([check]):
        return tf.cast(parsed["metadata"], tf.float32), tf.cast(parsed["label"], tf.float32)


def unchecked_record(err: BaseException) -> DataError | None:
    """The one-line DataError for a pipeline failure raised by `_checked_values` (a record that changed
    after the label pass checked it), else None: `except tf.errors.InvalidArgumentError as err: raise
    unchecked_record(err) or err`."""
    if not (isinstance(err, tf.errors.InvalidArgumentError) and UNCHECKED_RECORD in (err.message or "")):
        return None
    return DataError(
        f"{UNCHECKED_RECORD} in a batch: the shards were checked when the datasets were built and one has "
        "changed since; rebuild the datasets (rerun) to have the record named"
    )


def parse_example(serialized: tf.Tensor, image_size: int) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
    """One serialized Example → ({"image": float32[S,S,3] 0..255, "metadata": float32[28]}, float32[8] one-hot)."""
    parsed = tf.io.parse_single_example(serialized, _FEATURES)
    metadata, label = _checked_values(parsed)
    return {"image": decode_image(parsed["image"], image_size), "metadata": metadata}, label


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
    metadata, label = _checked_values(parsed)
    return {"image": tf.cast(pixels, tf.float32), "metadata": metadata}, label


def shards_are_raw(paths: list[str], image_size: int) -> bool:
    """True when the first record of every shard holds raw uint8 RGB at `image_size` (see `decode_image`).

    One record per shard: a shard is written by one tools.prepare run, so its records are alike,
    but a split may combine shards of different origins.
    """
    if not paths:
        return False
    for path in paths:
        for serialized in tf.data.TFRecordDataset(path).take(1):
            image = tf.io.parse_single_example(serialized, _IMAGE_ONLY)["image"]
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


def _label_pass(paths: list[str], spec: dict[str, tf.io.RaggedFeature], split: str) -> Iterator[tuple[int, dict]]:
    """`(shard index, batch as numpy)` over every record of `paths` (shards interleaved, each in order),
    label and metadata checked by the batch (`_valid_numpy`): the first bad record is a DataError naming
    its shard and index. Parses only `spec`'s features, never the images. The checks run in numpy on the
    parsed values: the same in TF ops (ragged to dense) cost ~120 ms more CPU per call, in graph set-up."""
    names = tf.constant(paths, tf.string, shape=[len(paths)])

    def batches(shard: tf.Tensor) -> tf.data.Dataset:
        records = tf.data.TFRecordDataset(tf.gather(names, shard)).batch(_LABEL_BATCH)
        return records.map(lambda s: (shard, tf.io.parse_example(s, spec)), num_parallel_calls=AUTOTUNE)

    shards = tf.data.Dataset.range(len(paths)).interleave(
        batches, cycle_length=max(1, min(len(paths), 8)), num_parallel_calls=AUTOTUNE, deterministic=True
    )
    seen = [0] * len(paths)  # records read so far per shard
    try:
        for shard, parsed in shards:
            index = int(shard)
            batch = {key: _numpy(value) for key, value in parsed.items()}
            ok = _valid_numpy(batch)
            if not ok.all():
                _refuse_record(paths[index], seen[index] + int(np.argmin(ok)), split)
            seen[index] += len(ok)
            yield index, batch
    except tf.errors.OpError as err:
        for path in paths:  # name the bad shard (and record, when it can) when one is corrupt
            verify_shard(path)
        raise DataError(
            f"cannot read labels from {len(paths)} {split} shard(s) starting with {paths[0]}: {one_line(err.message)}"
        ) from None


def _numpy(value: tf.Tensor | tf.RaggedTensor) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """A dense feature's array, or a ragged one's (values, row lengths)."""
    if isinstance(value, tf.RaggedTensor):
        return value.flat_values.numpy(), np.diff(value.row_splits.numpy())
    return value.numpy()


def _valid_numpy(batch: dict) -> np.ndarray:
    """bool [B], as `_valid_rows`, on (values, row lengths) of label and metadata; when every length is
    right they become int64 [B, 8] and [B, 28] in `batch`, else only the lengths are judged."""
    (label, label_lengths), (metadata, metadata_lengths) = batch["label"], batch["metadata"]
    ok = (label_lengths == NUM_CLASSES) & (metadata_lengths == METADATA_SIZE)
    if not ok.all():
        return ok
    batch["label"], batch["metadata"] = label.reshape(-1, NUM_CLASSES), metadata.reshape(-1, METADATA_SIZE)
    binary = ((batch["label"] == 0) | (batch["label"] == 1)).all(axis=1) & (batch["label"].sum(axis=1) == 1)
    return binary & ((batch["metadata"] == 0) | (batch["metadata"] == 1)).all(axis=1)


def _refuse_record(path: str, index: int, split: str) -> None:
    """Raise the DataError for record `index` of `path`, worded by the shard's full check (`verify_shard`)."""
    verify_shard(path)  # raises at the first bad record: this one (or an earlier one with a bad image feature)
    raise DataError(f"shard {path} record {index} ({split}): feature label is not one-hot or metadata not 0/1")


def count_labels(paths: list[str], split: str = "train") -> np.ndarray:
    """Examples per class in these shards, int64 [8]; reads only the label and metadata features, and
    refuses the first record whose label is not one-hot or whose metadata is not 0/1 (`_label_pass`)."""
    # 64 records a batch: at 256 px a record is ~197 KB, so 1,024 held 200 MB only to read 8 integers
    # each (bench.scale: +200 MB peak RSS vs +29 MB, same 1.6 s over 2,000 images).
    total = np.zeros(NUM_CLASSES, np.int64)
    for _, batch in _label_pass(list(paths), _CHECKED, split) if paths else ():
        total += batch["label"].sum(axis=0)
    return total


@dataclass(frozen=True)
class Identities:
    """One split's records in file order (the evaluation datasets' order), without pixels."""

    names: tuple[str, ...]  # the record's image_name (ISIC id), else "split/shard/index"
    metadata: np.ndarray  # int8 (N, 28) multi-hot, schema.METADATA_NAMES order
    labels: np.ndarray  # int64 (N,) class ids

    @property
    def class_counts(self) -> tuple[int, ...]:
        return tuple(int(c) for c in np.bincount(self.labels, minlength=NUM_CLASSES))


def read_identities(paths: list[str], split: str) -> Identities:
    """Names, metadata and labels of every record of `paths`, in order; a record without `image_name` is
    named `split/shard/index` (shard = file name without suffix, index = record number in it)."""
    per_shard: list[list[dict]] = [[] for _ in paths]  # shards are read interleaved; kept in file order
    for index, batch in _label_pass(list(paths), _IDENTITY, split) if paths else ():
        per_shard[index].append(batch)
    names: list[str] = []
    metadata, labels = [], []
    for path, batches in zip(paths, per_shard, strict=True):
        shard, start = Path(path).name.split(".")[0], len(names)
        for batch in batches:
            for raw in batch["image_name"]:
                names.append(raw.decode("utf-8", "replace") or f"{split}/{shard}/{len(names) - start}")
            metadata.append(batch["metadata"].astype(np.int8))
            labels.append(batch["label"].argmax(axis=1))
    if not labels:
        return Identities((), np.zeros((0, METADATA_SIZE), np.int8), np.zeros(0, np.int64))
    return Identities(tuple(names), np.concatenate(metadata), np.concatenate(labels).astype(np.int64))
