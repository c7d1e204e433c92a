"""Tests of the reading side and the tf.data pipeline: `.venv/bin/python -m pytest tests/test_data.py -q`."""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests.fixtures.data import Prepared
from utilities.data import pipeline as data
from utilities.data.augmentation import Augmentation, augment_images
from utilities.data.pipeline import DataError, build_datasets, fetch_shards, load_manifest
from utilities.data.records import parse_batches, parse_example, shards_are_raw
from utilities.data.schema import CLASS_NAMES, IMAGE_DIR, METADATA_CSV, SPLITS, encode_metadata, one_hot
from utilities.data.shards import file_sha256, verify_shard


def _example(image: bytes, metadata: list[int], label: list[int]) -> bytes:
    """A record exactly as the original DermAID pipeline wrote it: three features."""
    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
        "metadata": tf.train.Feature(int64_list=tf.train.Int64List(value=metadata)),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=label)),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _parse(record: bytes, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    features, label = parse_example(tf.constant(record), size)
    return features["image"].numpy(), features["metadata"].numpy(), label.numpy()


def _write_manifest(path: Path, content: Any) -> Path:
    path.write_bytes(pickle.dumps(content))
    return path


def _shards(prepared: Prepared) -> dict[str, list[str]]:
    return {s: list(prepared.manifest[s]) for s in SPLITS}


def _records(paths: list[str]) -> list[bytes]:
    return [r.numpy() for r in tf.data.TFRecordDataset(paths)]


def _write_shard(path: Path, records: list[bytes]) -> str:
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record)
    return str(path)


def _label_of(record: bytes) -> int:
    return int(np.argmax(tf.train.Example.FromString(record).features.feature["label"].int64_list.value))


# ---------------------------------------------------------------- manifest


def test_manifest_from_prepare_loads(prepared: Prepared) -> None:
    manifest = load_manifest(prepared.manifest_path)
    assert manifest.splits == {s: tuple(prepared.manifest[s]) for s in SPLITS}
    assert manifest.sha256 == prepared.manifest["sha256"] and manifest.counts == prepared.manifest["counts"]
    assert manifest.schema is not None and manifest.schema["image_shape"] == [32, 32, 3]
    assert manifest.raw == prepared.manifest


def test_minimal_three_key_manifest_is_accepted(tmp_path: Path, prepared: Prepared) -> None:
    path = _write_manifest(tmp_path / "m.pickle", _shards(prepared))
    manifest = load_manifest(path)
    assert manifest.splits["train"] == tuple(prepared.manifest["train"])
    assert (manifest.sha256, manifest.schema, manifest.counts) == ({}, None, None)
    assert fetch_shards(manifest, tmp_path / "cache") == _shards(prepared)


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_manifest_that_would_run_code_is_rejected_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = _write_manifest(tmp_path / "evil.pickle", {"train": ["a"], "val": [], "test": [], "x": _RunsCode(marker)})
    with pytest.raises(DataError, match=r"manifest .*evil.pickle tries to unpickle (posix|os)\.system"):
        load_manifest(path)
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # the same bytes do run code with the plain unpickler: the test is real
    assert marker.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (["train.tfrecords"], r"holds a list; expected a dict with keys train, val, test"),
        ({"train": ["a"], "test": ["c"]}, r"has no val key"),
        ({"train": "a.tfrecords", "val": [], "test": []}, r"train is a str, expected a list of shard URIs"),
        ({"train": ["a", 3], "val": [], "test": []}, r"train\[1\] is 3, expected a shard URI string"),
        ({"train": [], "val": ["b"], "test": ["c"]}, r"lists no train shards"),
        ({"train": ["a"], "val": [], "test": [], "sha256": {"a": "abc"}}, r"sha256 entry 'a' is not a 64-digit"),
        (
            {"train": ["a"], "val": [], "test": [], "schema": {"class_names": ["A", "B"]}},
            r"has classes A,B; this job expects MEL",
        ),
    ],
)
def test_malformed_manifests_are_rejected(tmp_path: Path, content: Any, message: str) -> None:
    with pytest.raises(DataError, match=message) as caught:
        load_manifest(_write_manifest(tmp_path / "m.pickle", content))
    assert "\n" not in str(caught.value)


def test_missing_or_garbled_manifest(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"manifest .*nope.pickle not found; fetch it with `sh dvc_pull.sh -t TAG`"):
        load_manifest(tmp_path / "nope.pickle")
    (tmp_path / "junk.pickle").write_bytes(b"\x80\x04not really")
    with pytest.raises(DataError, match=r"junk.pickle is not a valid pickle"):
        load_manifest(tmp_path / "junk.pickle")


# ---------------------------------------------------------------- shards


def test_fetch_names_a_missing_local_shard(tmp_path: Path, prepared: Prepared) -> None:
    content = {**_shards(prepared), "val": [str(tmp_path / "gone.tfrecords")]}
    with pytest.raises(DataError, match=r"shard .*gone.tfrecords listed for val does not exist"):
        fetch_shards(load_manifest(_write_manifest(tmp_path / "m.pickle", content)), tmp_path / "cache")


def test_fetch_names_a_shard_whose_checksum_differs(tmp_path: Path, prepared: Prepared) -> None:
    copy = Path(shutil.copy(prepared.manifest["test"][0], tmp_path / "0000.tfrecords"))
    digest = file_sha256(copy)
    content = {"train": prepared.manifest["train"], "val": [], "test": [str(copy)], "sha256": {str(copy): digest}}
    manifest = load_manifest(_write_manifest(tmp_path / "m.pickle", content))
    assert fetch_shards(manifest, tmp_path / "cache")["test"] == [str(copy)]
    copy.write_bytes(copy.read_bytes()[:-1] + b"\x00")
    with pytest.raises(DataError, match=rf"shard {copy} fails its checksum: manifest says sha256 {digest[:12]}"):
        fetch_shards(manifest, tmp_path / "cache")


def test_verify_shard_counts_and_names_the_bad_record(tmp_path: Path, prepared: Prepared) -> None:
    source = Path(prepared.manifest["train"][0])
    assert verify_shard(source) == 40
    raw = source.read_bytes()
    record_bytes = len(raw) // 40  # every record has the same size: 32*32*3 pixels + 36 ints
    truncated = tmp_path / "truncated.tfrecords"
    truncated.write_bytes(raw[: 7 * record_bytes + 100])
    with pytest.raises(DataError, match=rf"shard {truncated} is corrupt or truncated at record 7"):
        verify_shard(truncated)
    flipped = bytearray(raw)
    flipped[3 * record_bytes + 500] ^= 0xFF  # inside the pixels of record 3: its data CRC no longer matches
    corrupt = tmp_path / "corrupt.tfrecords"
    corrupt.write_bytes(bytes(flipped))
    with pytest.raises(DataError, match=rf"shard {corrupt} is corrupt or truncated at record 3"):
        verify_shard(corrupt)
    wrong = Path(
        _write_shard(
            tmp_path / "wrong.tfrecords",
            [_example(b"x" * 12, [0] * 28, one_hot(1))] * 2 + [_example(b"x", [0] * 5, [1])],
        )
    )
    with pytest.raises(DataError, match=rf"shard {wrong} record 2: feature metadata must hold 28 int64 values"):
        verify_shard(wrong)


# ---------------------------------------------------------------- parsing


def test_parsed_records_equal_the_source(prepared: Prepared, demo_dir: Path) -> None:
    with (demo_dir / METADATA_CSV).open(newline="") as fh:
        meta = {r["image"]: r for r in csv.DictReader(fh)}
    images = prepared.manifest["images"]["val"]
    for index, record in enumerate(_records(prepared.manifest["val"])[:12]):
        image, metadata, label = _parse(record, 32)
        row = meta[images[index]]
        age = float(row["age_approx"]) if row["age_approx"] else None
        assert metadata.tolist() == encode_metadata(age, row["anatom_site_general"], row["sex"])
        assert metadata.dtype == label.dtype == image.dtype == np.float32 and label.sum() == 1
        with Image.open(demo_dir / IMAGE_DIR / f"{images[index]}.jpg") as source:
            expected = np.asarray(source.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR), np.float32)
        np.testing.assert_array_equal(image, expected)
    labels = [_label_of(r) for r in _records(prepared.manifest["val"])]
    counts = prepared.manifest["counts"]["val"]
    assert [labels.count(i) for i in range(len(CLASS_NAMES))] == [counts[c] for c in CLASS_NAMES]


def test_original_dermaid_record_parses() -> None:
    """Raw 256×256×3 uint8, 28 metadata ints, 8 label ints: the original pipeline's records."""
    pixels = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    metadata = encode_metadata(45, "head/neck", "female")
    record = _example(pixels.tobytes(), metadata, one_hot(2))
    image, parsed_metadata, label = _parse(record, 256)
    np.testing.assert_array_equal(image, pixels.astype(np.float32))
    assert parsed_metadata.tolist() == metadata and label.tolist() == one_hot(2)
    small, _, _ = _parse(record, 64)
    expected = tf.image.resize(pixels, [64, 64], antialias=True).numpy()
    assert small.shape == (64, 64, 3)
    np.testing.assert_allclose(small, expected, atol=1e-3)


@pytest.mark.parametrize("encoding", ["JPEG", "PNG"])
def test_encoded_images_are_decoded_and_resized(encoding: str) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=encoding, quality=95)
    image, _, _ = _parse(_example(buffer.getvalue(), [0] * 28, one_hot(0)), 32)
    reference = tf.image.resize(pixels, [32, 32], antialias=True).numpy()
    assert image.shape == (32, 32, 3)
    if encoding == "PNG":  # lossless
        np.testing.assert_allclose(image, reference, atol=1e-3)
    else:  # lossy on noise, yet far closer than an unrelated image (mean difference ≈ 85)
        assert np.abs(image - reference).mean() < 20


def test_raw_image_that_starts_like_a_jpeg_stays_raw() -> None:
    pixels = np.full((8, 8, 3), 7, np.uint8)
    pixels[0, 0] = (0xFF, 0xD8, 0xFF)  # the JPEG magic number as the first pixel
    image, _, _ = _parse(_example(pixels.tobytes(), [0] * 28, one_hot(0)), 8)
    np.testing.assert_array_equal(image, pixels.astype(np.float32))


def test_image_bytes_of_no_known_form_fail_clearly() -> None:
    with pytest.raises(tf.errors.InvalidArgumentError, match="neither JPEG/PNG nor square raw uint8 RGB"):
        _parse(_example(b"\x01" * 10, [0] * 28, one_hot(0)), 8)


# ---------------------------------------------------------------- pipeline


def _metadata_order(dataset: tf.data.Dataset) -> np.ndarray:
    return np.concatenate([features["metadata"].numpy() for features, _ in dataset])


def test_build_datasets_counts_batches_and_dtypes(prepared: Prepared) -> None:
    built = build_datasets(_shards(prepared), image_size=32, global_batch_size=16, seed=0)
    expected = {s: sum(prepared.manifest["counts"][s].values()) for s in SPLITS}
    assert built.counts == expected
    assert built.class_counts["train"] == tuple(prepared.manifest["counts"]["train"][c] for c in CLASS_NAMES)
    assert built.steps_per_epoch == {s: math.ceil(n / 16) for s, n in expected.items()}
    assert {s: int(getattr(built, s).cardinality()) for s in SPLITS} == built.steps_per_epoch  # declared length
    features, labels = next(iter(built.train))
    assert features["image"].shape == (16, 32, 32, 3) and features["metadata"].shape == (16, 28)
    assert features["image"].dtype == labels.dtype == tf.float32 and labels.shape == (16, 8)
    assert float(tf.reduce_min(features["image"])) >= 0 and float(tf.reduce_max(features["image"])) <= 255
    assert float(tf.reduce_max(features["image"])) > 100  # raw pixels, not normalized
    assert sum(1 for _ in built.val) == built.steps_per_epoch["val"]


def test_train_order_changes_every_epoch_and_val_order_is_stable(prepared: Prepared) -> None:
    built = build_datasets(_shards(prepared), image_size=32, global_batch_size=32, seed=0, augment=False)
    first, second = _metadata_order(built.train), _metadata_order(built.train)
    assert first.shape == second.shape and not np.array_equal(first, second)
    assert sorted(map(tuple, first)) == sorted(map(tuple, second))  # same examples, new order
    rebuilt = build_datasets(_shards(prepared), image_size=32, global_batch_size=32, seed=0, augment=False)
    np.testing.assert_array_equal(_metadata_order(rebuilt.train), first)  # same seed, same first epoch
    val = data.labels_of(built.val)
    np.testing.assert_array_equal(data.labels_of(built.val), val)
    assert val.tolist() == [_label_of(r) for r in _records(prepared.manifest["val"])]  # file order


def test_raw_shards_are_parsed_by_the_batch_and_give_the_example_by_example_result(prepared: Prepared) -> None:
    paths = list(prepared.manifest["val"])
    assert shards_are_raw(paths, 32) and not shards_are_raw(paths, 16)  # 16: must resize
    records = tf.data.TFRecordDataset(paths)
    batched = list(parse_batches(records, 32, 16, raw=True))
    one_by_one = list(parse_batches(records, 32, 16, raw=False))
    assert len(batched) == len(one_by_one) == math.ceil(len(_records(paths)) / 16)
    for (features, labels), (expected, expected_labels) in zip(batched, one_by_one, strict=True):
        for key in ("image", "metadata"):
            np.testing.assert_array_equal(features[key].numpy(), expected[key].numpy())
        np.testing.assert_array_equal(labels.numpy(), expected_labels.numpy())


@pytest.mark.parametrize("encoding", ["JPEG", "raw 40 px"])
def test_splits_with_other_images_are_read_one_by_one_and_a_mixed_raw_shard_fails_clearly(
    prepared: Prepared, tmp_path: Path, encoding: str
) -> None:
    pixels = np.random.default_rng(3).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    other = _example(buffer.getvalue() if encoding == "JPEG" else pixels.tobytes(), [0] * 28, one_hot(3))
    raw = _records(prepared.manifest["train"])[:5]
    raw_shard = _write_shard(tmp_path / "raw.tfrecords", raw)
    other_shard = _write_shard(tmp_path / "other.tfrecords", [other, other])
    assert shards_are_raw([raw_shard], 32) and not shards_are_raw([raw_shard, other_shard], 32)
    split = {**_shards(prepared), "val": [raw_shard, other_shard]}  # a raw shard first, then another kind
    built = build_datasets(split, image_size=32, global_batch_size=4, seed=0)
    assert [int(labels.shape[0]) for _, labels in built.val] == [4, 3]  # read one by one: resized / decoded
    mixed_shard = _write_shard(tmp_path / "mixed.tfrecords", [*raw, other])  # not what tools.prepare writes
    built = build_datasets({**_shards(prepared), "val": [mixed_shard]}, image_size=32, global_batch_size=4, seed=0)
    with pytest.raises(
        tf.errors.InvalidArgumentError, match="not raw uint8 32x32x3 like the first record of its shard"
    ):
        list(built.val)


def test_class_weights_come_from_train_only(prepared: Prepared, tmp_path: Path) -> None:
    counts = prepared.manifest["counts"]["train"]
    total = sum(counts.values())
    expected = {i: total / (8 * counts[c]) for i, c in enumerate(CLASS_NAMES)}
    nv_only = [r for r in _records(prepared.manifest["val"]) if _label_of(r) == 1]
    skewed = {**_shards(prepared), "val": [_write_shard(tmp_path / "val.tfrecords", nv_only)]}
    built = build_datasets(skewed, image_size=32, global_batch_size=16, seed=0)
    assert built.class_weights == pytest.approx(expected)
    assert built.class_counts["val"] == (0, len(nv_only), 0, 0, 0, 0, 0, 0)
    assert built.class_weights[5] > built.class_weights[0] > built.class_weights[1]  # rare DF > MEL > common NV


def test_a_class_missing_from_train_is_an_error(prepared: Prepared, tmp_path: Path) -> None:
    no_df = [r for r in _records(prepared.manifest["train"]) if _label_of(r) != 5]
    shards = {**_shards(prepared), "train": [_write_shard(tmp_path / "train.tfrecords", no_df)]}
    with pytest.raises(DataError, match=r"class DF has no training examples"):
        build_datasets(shards, image_size=32, global_batch_size=16, seed=0)


def test_augmentation_is_seeded_geometric_and_keeps_the_range(prepared: Prepared) -> None:
    records = tf.data.TFRecordDataset(prepared.manifest["val"][:1]).map(lambda s: parse_example(s, 32)).batch(16)
    features, _ = next(iter(records))
    images = features["image"]
    seed = tf.constant([3, 4], tf.int64)
    once, twice = augment_images(images, seed).numpy(), augment_images(images, seed).numpy()
    np.testing.assert_array_equal(once, twice)
    other = augment_images(images, tf.constant([3, 5], tf.int64)).numpy()
    assert once.shape == images.shape and not np.allclose(once, other) and not np.allclose(once, images.numpy())
    assert once.min() >= 0 and once.max() <= 255.001
    dihedral = augment_images(images, seed, Augmentation(rotation=0, shift=0, zoom=0)).numpy()
    seen = set()
    for original, result in zip(images.numpy(), dihedral, strict=True):  # flips and quarter turns: pixels moved
        views = [np.rot90(f, k) for f in (original, original[::-1]) for k in range(4)]  # the 8 symmetries
        matches = [i for i, view in enumerate(views) if np.allclose(result, view, atol=1e-3)]
        assert matches, "not one of the square's 8 symmetries"
        seen.add(matches[0])
    assert len(seen) >= 4  # 16 images: the turns are drawn, not one fixed view


def test_colour_cutout_and_metadata_dropout_are_seeded_per_image_and_keep_the_ranges(prepared: Prepared) -> None:
    from utilities.data.augmentation import drop_metadata

    records = tf.data.TFRecordDataset(prepared.manifest["val"][:1]).map(lambda s: parse_example(s, 32)).batch(16)
    features, _ = next(iter(records))
    images, seed = features["image"], tf.constant([7, 1], tf.int64)
    colour_only = Augmentation(flip=False, quarter_turns=False, rotation=0, shift=0, zoom=0, colour=0.3)
    once = augment_images(images, seed, colour_only).numpy()
    np.testing.assert_array_equal(once, augment_images(images, seed, colour_only).numpy())
    assert once.min() >= 0 and once.max() <= 255
    # per image: each image's own brightness change, not one for the batch
    ratios = once.reshape(16, -1).mean(axis=1) / images.numpy().reshape(16, -1).mean(axis=1)
    assert ratios.std() > 0.02 and np.all(np.abs(ratios - 1) < 0.6)
    cut = augment_images(images, seed, dataclasses.replace(colour_only, colour=0.0, cutout=0.25)).numpy()
    changed = np.any(cut != images.numpy(), axis=3).reshape(16, -1).mean(axis=1)
    assert np.all(changed <= 0.25**2 * 1.3) and changed.mean() > 0.25**2 * 0.3  # one square of ~1/16, clipped at edges
    metadata = tf.ones([4000, 28])
    dropped = drop_metadata(metadata, 0.2, tf.constant([1, 2], tf.int64)).numpy()
    groups = [dropped[:, :18], dropped[:, 18:26], dropped[:, 26:]]
    for group in groups:  # a group is dropped whole (unknown) or kept whole, 20 % of the time
        assert set(np.unique(group.sum(axis=1))) <= {0.0, float(group.shape[1])}
        assert abs((group.sum(axis=1) == 0).mean() - 0.2) < 0.03


def test_augmented_training_batches_differ_between_epochs_but_labels_are_untouched(prepared: Prepared) -> None:
    shards = {**_shards(prepared), "train": prepared.manifest["train"][:1]}  # one shard keeps this quick
    plain = build_datasets(shards, image_size=32, global_batch_size=40, seed=0, augment=False, shuffle_buffer=1)
    built = build_datasets(shards, image_size=32, global_batch_size=40, seed=0, augment=True, shuffle_buffer=1)
    (a, labels_a), (b, _), (p, labels_p) = (
        next(iter(built.train)),
        next(iter(built.train)),
        next(iter(plain.train)),
    )
    np.testing.assert_array_equal(labels_a, labels_p)
    np.testing.assert_array_equal(a["metadata"], p["metadata"])
    assert not np.allclose(a["image"], b["image"]) and not np.allclose(a["image"], p["image"])


def test_a_resumed_stream_yields_the_very_batches_an_uninterrupted_one_would(prepared: Prepared) -> None:
    built = build_datasets(_shards(prepared), image_size=32, global_batch_size=16, seed=5)
    steps = built.steps_per_epoch["train"]

    def batches(dataset: tf.data.Dataset, n: int) -> list[np.ndarray]:
        return [np.concatenate([f["image"].numpy().ravel(), f["metadata"].numpy().ravel()]) for f, _ in dataset.take(n)]

    whole = batches(built.train_from(0, 0, 3), 3 * steps)
    for epoch, step in ((0, 3), (1, 0), (1, steps - 1), (2, 1)):
        resumed = built.train_from(epoch, step, 3)
        assert int(resumed.cardinality()) == (3 - epoch) * steps - step  # what fit consumes
        resumed = batches(resumed, 2)
        at = epoch * steps + step
        for got, expected in zip(resumed, whole[at : at + 2], strict=True):
            np.testing.assert_array_equal(got, expected)  # same examples, same augmentation
    assert not np.array_equal(whole[0], whole[steps])  # epochs differ


def test_bad_build_arguments(prepared: Prepared) -> None:
    with pytest.raises(DataError, match=r"shards have no test split"):
        build_datasets({"train": ["a"], "val": []}, image_size=32, global_batch_size=8, seed=0)
    with pytest.raises(DataError, match=r"there are no train shards"):
        build_datasets({"train": [], "val": [], "test": []}, image_size=32, global_batch_size=8, seed=0)
    with pytest.raises(DataError, match=r"global_batch_size"):
        build_datasets(_shards(prepared), image_size=32, global_batch_size=0, seed=0)


def test_empty_val_and_test_splits_give_empty_datasets(prepared: Prepared) -> None:
    built = build_datasets({**_shards(prepared), "val": [], "test": []}, image_size=32, global_batch_size=64, seed=0)
    assert built.counts["val"] == built.steps_per_epoch["test"] == 0
    assert list(built.val) == [] and data.labels_of(built.test).shape == (0,)


def test_the_shuffle_buffer_holds_at_most_its_memory_in_records(tmp_path, caplog):
    shards = []
    for i, size in enumerate((300_000, 100_000)):  # 400,000 bytes of 100 records: 4,000 bytes a record
        shards.append(tmp_path / f"{i}.tfrecords")
        shards[-1].write_bytes(bytes(size))
    mb = 2**20
    assert data.shuffle_records(shards, 100, 2048, None) == 2048  # no memory bound
    caplog.set_level(logging.INFO, logger="utilities.data.pipeline")
    assert data.shuffle_records(shards, 100, 2048, 40_000 / mb) == 10  # 40,000 bytes: 10 records of 4,000
    assert "shuffle buffer: 10 records" in caplog.text and "--shuffle-buffer 2048" in caplog.text
    assert data.shuffle_records(shards, 100, 5, 40_000 / mb) == 5  # the record count binds first
    assert data.shuffle_records(shards, 100, 2048, 1 / mb) == 1  # never empty
    assert data.shuffle_records(shards, 0, 2048, 1.0) == 2048  # no records: nothing to size
