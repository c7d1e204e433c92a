"""Shard integrity: a shard fetched into the local cache is the file its manifest names, framed as sound TFRecords.

Owns the sha256 check, the download cache of gs:// shards, the walk of TFRecord headers (before
TensorFlow trusts them) and the full check of every record's Example structure.

Library module (no command line); `utilities.data.pipeline.fetch_shards` runs `fetch` over a whole manifest:

    path, downloaded = fetch("gs://bucket/train/0000.tfrecords", sha256_or_None, "train", Path(".cache/shards"))
    verify_shard(path)   # every record: length and data CRCs, Example structure; returns the count

Every refusal is one `DataError` line naming the shard (and the record, where one is at fault).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import tensorflow as tf

from utilities import storage
from utilities.data.schema import METADATA_SIZE, NUM_CLASSES
from utilities.errors import JobError, one_line

_CHUNK = 1 << 20  # bytes per read when hashing
_HEADER = 12  # a TFRecord: uint64 length, uint32 masked crc32c of it, data, uint32 masked crc32c of the data


class DataError(JobError, ValueError):
    """Bad manifest, shard or data argument; the message is one line naming the file."""


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a local file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------- fetching


def fetch(uri: str, expected: str | None, split: str, cache: Path) -> tuple[Path, bool | None]:
    """`(local path, downloaded?)` of one shard of `split`, its sha256 and TFRecord framing checked.

    gs:// shards are copied into `cache` (downloaded? True or False: reused from the cache); local
    ones (a path or file://) are read in place (downloaded? None).
    """
    downloaded: bool | None = None
    if storage.is_gcs(uri):
        cache.mkdir(parents=True, exist_ok=True)
        path, downloaded = _fetch_remote(uri, expected, cache)
    else:
        path = _fetch_local(uri, expected, split)
    check_framing(path)  # before any TFRecordDataset reads it (count_labels, the pipeline)
    return path, downloaded


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
    path = Path(storage.without_file_scheme(uri))
    if not path.is_file():
        raise DataError(f"shard {uri} listed for {split} does not exist")
    _verify_digest(path, expected, uri)  # ~1 s per GB; catches shards changed after the manifest
    return path


# ---------------------------------------------------------------- verifying


def check_framing(path: str | Path) -> int:
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


def _check_record(data: bytes, path: str | Path, index: int) -> None:
    where = f"shard {path} record {index}"
    try:
        features = tf.train.Example.FromString(data).features.feature
    except Exception as err:
        raise DataError(f"{where} is not a tf.train.Example: {one_line(err)}") from None
    if len(features["image"].bytes_list.value) != 1:
        raise DataError(f"{where}: feature image must hold exactly one bytes value")
    if "image_name" in features and len(features["image_name"].bytes_list.value) != 1:
        raise DataError(f"{where}: feature image_name (optional) must hold exactly one bytes value")
    for key, size in (("metadata", METADATA_SIZE), ("label", NUM_CLASSES)):
        values = features[key].int64_list.value
        if len(values) != size or not set(values) <= {0, 1}:
            raise DataError(f"{where}: feature {key} must hold {size} int64 values, each 0 or 1")
    if sum(features["label"].int64_list.value) != 1:
        raise DataError(f"{where}: feature label is not one-hot")


def verify_shard(path: str | Path) -> int:
    """Read every record (length and data CRCs, Example structure); return the count. Bad → DataError naming the record."""
    if not Path(path).is_file():
        raise DataError(f"shard {path} does not exist")
    check_framing(path)
    count = 0
    try:
        for record in tf.data.TFRecordDataset(str(path)):
            _check_record(record.numpy(), path, count)
            count += 1
    except tf.errors.OpError as err:  # DataLossError: truncated file or CRC mismatch
        message = one_line(re.sub(r"\{\{function_node [^}]*\}\}\s*|\s*\[Op:.*", "", err.message, flags=re.S))
        raise DataError(f"shard {path} is corrupt or truncated at record {count}: {message}") from None
    return count
