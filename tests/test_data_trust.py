"""Data is checked where it enters: a shard in one split, once; every record's label and metadata; a gs://
manifest's size before its bytes.

    .venv/bin/python -m pytest tests/test_data_trust.py -q

Each refusal is one DataError line (exit code 2) naming the manifest entries, or the shard file and record.
Hostile inputs are built here, small: shards of 8 records of 4×4 pixels.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf

from tests.fixtures.data import Prepared
from utilities import storage
from utilities.data import records
from utilities.data.manifest import MAX_BYTES
from utilities.data.pipeline import DataError, build_datasets, fetch_shards, load_manifest
from utilities.data.schema import METADATA_SIZE, NUM_CLASSES, SPLITS, one_hot
from utilities.data.shards import file_sha256

SIDE = 4  # px of the records written here
DIGEST = "ab" * 32


def _example(label: list[int], metadata: list[int] | None = None) -> bytes:
    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[bytes(SIDE * SIDE * 3)])),
        "metadata": tf.train.Feature(int64_list=tf.train.Int64List(value=metadata or [0] * METADATA_SIZE)),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=label)),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _shard(path: Path, bad: bytes | None = None, at: int = 5) -> str:
    """8 records, one per class; record `at` replaced by `bad`."""
    rows = [_example(one_hot(i)) for i in range(NUM_CLASSES)]
    if bad is not None:
        rows[at] = bad
    with tf.io.TFRecordWriter(str(path)) as writer:
        for row in rows:
            writer.write(row)
    return str(path)


def _splits(folder: Path) -> dict[str, list[str]]:
    """Two good shards per split."""
    folder.mkdir(exist_ok=True)
    return {s: [_shard(folder / f"{s}{i}.tfrecords") for i in range(2)] for s in SPLITS}


def _manifest(path: Path, content: dict[str, Any]) -> Path:
    path.write_bytes(pickle.dumps(content))
    return path


# ---------------------------------------------------------------- a shard in one split, once


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (  # the issue: 130 examples reported, 80 unique
            {"train": ["d/a.tfrecords", "d/b.tfrecords", "d/a.tfrecords"], "val": [], "test": []},
            "train[2] 'd/a.tfrecords' is the same shard as train[0] 'd/a.tfrecords' (listed twice, its records "
            "would count twice in train); list each shard once",
        ),
        (  # the issue: the test split scored on training data, exit 0
            {"train": ["d/a.tfrecords"], "val": ["d/v.tfrecords"], "test": ["d/a.tfrecords"]},
            "test[0] 'd/a.tfrecords' is the same shard as train[0] 'd/a.tfrecords' (in train and test, the model "
            "would be scored on its own training data); keep a shard in one split",
        ),
        (
            {"train": ["./x/../d/a.tfrecords"], "val": ["d/a.tfrecords"], "test": []},
            "val[0] 'd/a.tfrecords' is the same shard as train[0] './x/../d/a.tfrecords' (in train and val",
        ),
        ({"train": ["/d/a.tfrecords"], "val": [], "test": ["file:///d//a.tfrecords/"]}, "test[0] 'file:///d//a"),
        ({"train": ["t"], "val": [os.path.abspath("t")], "test": []}, f"val[0] {os.path.abspath('t')!r} is the same"),
        (
            {"train": ["gs://bkt/d/a.tfrecords"], "val": ["gs://bkt/d//./a.tfrecords/"], "test": []},
            "val[0] 'gs://bkt/d//./a.tfrecords/' is the same shard as train[0] 'gs://bkt/d/a.tfrecords'",
        ),
        (
            {"train": ["t"], "val": ["v1"], "test": ["v2"], "sha256": {"v1": DIGEST, "v2": DIGEST}},
            "test[0] 'v2' has the same sha256 abababababab… as val[0] 'v1' (in val and test, both would score the "
            "same images); keep a shard in one split",
        ),
        (
            {
                "train": ["gs://bkt/t"],
                "val": [],
                "test": ["/copy/t"],
                "sha256": {"gs://bkt/t": DIGEST, "/copy/t": DIGEST},
            },
            "test[0] '/copy/t' has the same sha256 abababababab… as train[0] 'gs://bkt/t'",
        ),
        (
            {"train": ["t"], "val": [], "test": [], "sha256": {"t": DIGEST, "./t": "cd" * 32}},
            "sha256 gives 't' and './t', one shard, two different digests",
        ),
    ],
)
def test_a_shard_listed_twice_or_in_two_splits_is_refused(tmp_path: Path, content: dict, message: str) -> None:
    path = _manifest(tmp_path / "m.pickle", content)
    with pytest.raises(DataError) as caught:
        load_manifest(path)
    assert str(caught.value).startswith(f"manifest {path}: ") and message in str(caught.value)
    assert "\n" not in str(caught.value) and caught.value.exit_code == 2


def test_distinct_shards_of_similar_names_load(tmp_path: Path) -> None:
    content = {
        "train": ["d/a.tfrecords", "gs://bkt/d/a.tfrecords"],
        "val": ["d/a.tfrecords2"],
        "test": ["e/a.tfrecords"],
    }
    assert load_manifest(_manifest(tmp_path / "m.pickle", content)).splits["val"] == ("d/a.tfrecords2",)


def test_a_link_to_a_listed_shard_is_refused_when_fetched(tmp_path: Path) -> None:
    splits = _splits(tmp_path / "d")
    link = tmp_path / "link.tfrecords"
    link.symlink_to(splits["train"][1])
    manifest = load_manifest(_manifest(tmp_path / "m.pickle", {**splits, "test": [str(link)]}))
    with pytest.raises(DataError, match=rf"test\[0\] {link} is the same file as train\[1\] .*train1.tfrecords"):
        fetch_shards(manifest, tmp_path / "cache")


def test_a_digest_keyed_by_another_spelling_of_the_uri_is_still_checked(tmp_path: Path) -> None:
    splits = _splits(tmp_path / "d")
    shard = splits["val"][0]
    spelled = f"file://{tmp_path}/d/../d/val0.tfrecords"
    content = {**splits, "sha256": {spelled: file_sha256(shard)}}
    manifest = load_manifest(_manifest(tmp_path / "m.pickle", content))
    assert fetch_shards(manifest, tmp_path / "cache")["val"][0] == shard
    Path(shard).write_bytes(Path(shard).read_bytes()[:-1] + b"\x01")  # changed after the manifest was written
    with pytest.raises(DataError, match=rf"shard {shard} fails its checksum"):
        fetch_shards(manifest, tmp_path / "cache")


# ---------------------------------------------------------------- every record's label and metadata

BAD_RECORDS = {
    "two-hot label": (_example([1, 0, 0, 0, 1, 0, 0, 0]), "feature label is not one-hot"),
    "all-zero label": (_example([0] * 8), "feature label is not one-hot"),
    "label value 2": (_example([0, 2, 0, 0, 0, 0, 0, 0]), "feature label must hold 8 int64 values, each 0 or 1"),
    "label of 7": (_example([1] + [0] * 6), "feature label must hold 8 int64 values, each 0 or 1"),
    "metadata of 7s": (_example(one_hot(1), [7] * 28), "feature metadata must hold 28 int64 values, each 0 or 1"),
    "one metadata 7": (_example(one_hot(1), [0] * 27 + [7]), "feature metadata must hold 28 int64 values, each 0 or 1"),
    "metadata of 5": (_example(one_hot(1), [0] * 5), "feature metadata must hold 28 int64 values, each 0 or 1"),
    "no label": (
        tf.train.Example(
            features=tf.train.Features(
                feature={
                    "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[bytes(48)])),
                    "metadata": tf.train.Feature(int64_list=tf.train.Int64List(value=[0] * 28)),
                }
            )
        ).SerializeToString(),
        "feature label must hold 8 int64 values, each 0 or 1",
    ),
}


# Each kind in one split (in turn), and the two-hot label of the issue in all three.
CASES = [(kind, SPLITS[i % 3]) for i, kind in enumerate(BAD_RECORDS)] + [("two-hot label", s) for s in SPLITS[1:]]


@pytest.mark.parametrize(("kind", "split"), CASES)
def test_a_bad_record_in_any_split_is_named_before_any_batch(tmp_path: Path, split: str, kind: str) -> None:
    bad, message = BAD_RECORDS[kind]
    splits = _splits(tmp_path)
    splits[split][1] = _shard(tmp_path / f"{split}1.tfrecords", bad, at=5)
    with pytest.raises(DataError) as caught:
        build_datasets(splits, image_size=SIDE, global_batch_size=4, seed=0)
    assert str(caught.value) == f"shard {splits[split][1]} record 5: {message}"
    assert caught.value.exit_code == 2


def test_good_records_count_as_before(tmp_path: Path) -> None:
    splits = _splits(tmp_path)
    built = build_datasets(splits, image_size=SIDE, global_batch_size=4, seed=0)
    assert built.counts == {"train": 16, "val": 16, "test": 16}
    assert built.class_counts["val"] == (2,) * NUM_CLASSES
    assert list(built.identities["test"].labels) == list(range(8)) * 2  # file order, shard by shard
    assert built.identities["test"].names[9] == "test/test1/1"


def test_a_record_changed_after_the_check_fails_the_pipeline_and_the_feature_cache_in_one_line(
    tmp_path: Path,
) -> None:
    import tf_keras

    from utilities.data import feature_cache

    splits = _splits(tmp_path)
    built = build_datasets(splits, image_size=SIDE, global_batch_size=4, seed=0)
    _shard(Path(splits["val"][1]), _example([1, 0, 0, 0, 1, 0, 0, 0]), at=2)  # two-hot, after the label pass
    _shard(Path(splits["train"][0]), _example(one_hot(1), [0] * 27 + [7]), at=0)
    with pytest.raises(tf.errors.InvalidArgumentError, match=records.UNCHECKED_RECORD):
        list(built.val)  # not argmax-ed into a class
    image = tf_keras.Input((SIDE, SIDE, 3), name="image")
    extractor = tf_keras.Model({"image": image}, tf_keras.layers.GlobalAveragePooling2D()(image))
    for dataset in (built.val, built.train):
        with pytest.raises(
            DataError, match=r"^a record whose label is not one-hot or whose metadata is not 0/1 in a batch: "
        ):
            feature_cache.compute_features(extractor, dataset)


def test_the_in_pipeline_check_accepts_the_original_records() -> None:
    rows = [_example(one_hot(i), [1] + [0] * 27) for i in range(NUM_CLASSES)]
    batches = records.parse_batches(tf.data.Dataset.from_tensor_slices(rows), SIDE, 3, raw=True)
    labels = np.concatenate([label.numpy() for _, label in batches])
    assert labels.argmax(axis=1).tolist() == list(range(8))


# ---------------------------------------------------------------- a gs:// manifest's size, before its bytes


def test_an_oversized_gs_manifest_is_refused_without_downloading_it(
    gcs_emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from google.cloud.storage import Blob

    bucket = gcs_emulator.make_bucket("trust-manifest")
    client = storage._client()
    small = pickle.dumps({"train": ["gs://trust-manifest/t.tfrecords"], "val": [], "test": []})
    client.bucket(bucket).blob("ok.pickle").upload_from_string(small)
    client.bucket(bucket).blob("big.pickle").upload_from_string(small + bytes(MAX_BYTES))
    assert load_manifest(f"gs://{bucket}/ok.pickle").splits["train"] == ("gs://trust-manifest/t.tfrecords",)
    downloads: list[str] = []
    original = Blob.download_as_bytes
    monkeypatch.setattr(
        Blob, "download_as_bytes", lambda blob, *a, **k: downloads.append(blob.name) or original(blob, *a, **k)
    )
    with pytest.raises(DataError) as caught:
        load_manifest(f"gs://{bucket}/big.pickle")
    assert str(caught.value).startswith(f"manifest gs://{bucket}/big.pickle is over 4 MiB") and downloads == []
    with pytest.raises(storage.TooLarge, match=r"big.pickle: 4,194,[0-9]{3} bytes, over the 4,194,304 allowed"):
        storage.read_bytes(f"gs://{bucket}/big.pickle", max_bytes=MAX_BYTES)
    assert load_manifest(f"gs://{bucket}/ok.pickle").path == f"gs://{bucket}/ok.pickle" and downloads == ["ok.pickle"]


def test_read_bytes_caps_a_local_file_too(tmp_path: Path) -> None:
    big = tmp_path / "big"
    with big.open("wb") as fh:
        fh.truncate(2**40)  # sparse
    with pytest.raises(storage.TooLarge, match=r"1,099,511,627,776 bytes, over the 10 allowed"):
        storage.read_bytes(str(big), max_bytes=10)
    (tmp_path / "ok").write_bytes(b"0123456789")
    assert storage.read_bytes(str(tmp_path / "ok"), max_bytes=10) == b"0123456789"


def test_the_prepared_manifest_still_loads_and_fetches(prepared: Prepared, tmp_path: Path) -> None:
    manifest = load_manifest(prepared.manifest_path)
    assert fetch_shards(manifest, tmp_path / "cache") == {s: list(prepared.manifest[s]) for s in SPLITS}
    copy = tmp_path / "again.tfrecords"
    shutil.copy(prepared.manifest["train"][0], copy)
    leaky = {**prepared.manifest, "test": [*prepared.manifest["test"], str(copy)]}
    leaky["sha256"] = {**prepared.manifest["sha256"], str(copy): file_sha256(copy)}
    with pytest.raises(DataError, match=r"test\[\d+\] .*again.* has the same sha256 .* as train\[0\]"):
        load_manifest(_manifest(tmp_path / "m.pickle", leaky))
