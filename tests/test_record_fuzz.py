"""Mutated shard bytes give one DataError line naming the shard and the record, never a crash.

    .venv/bin/python -m pytest tests/test_record_fuzz.py -q -s    # -s prints the counts

Mutations: byte flips, truncation, inserted/deleted/repeated slices (caught by the TFRecord CRCs),
records re-framed with valid CRCs around a mutated payload (caught by the Example checks), and
headers announcing huge lengths with a valid CRC (TensorFlow's reader dies with SIGSEGV on 2^40).
"""

from __future__ import annotations

import gc
import pickle
import random
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import google_crc32c
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from utilities.data.pipeline import DataError, fetch_shards, load_manifest
from utilities.data.schema import one_hot
from utilities.data.shards import verify_shard

ROOT = Path(__file__).resolve().parent.parent
STATS = {"inputs": 0, "valid": 0, "refused": 0, "max_seconds": 0.0}


def _masked_crc(data: bytes) -> bytes:
    crc = google_crc32c.value(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def frame(payload: bytes, length: int | None = None) -> bytes:
    """One TFRecord with valid CRCs; `length` overrides the announced length (a crafted header)."""
    header = struct.pack("<Q", len(payload) if length is None else length)
    return header + _masked_crc(header) + payload + _masked_crc(payload)


def example(label: int, seed: int) -> bytes:
    rng = random.Random(seed)
    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[rng.randbytes(4 * 4 * 3)])),
        "metadata": tf.train.Feature(int64_list=tf.train.Int64List(value=[rng.randint(0, 1) for _ in range(28)])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=one_hot(label))),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


PAYLOADS = [example(i % 8, i) for i in range(4)]
SHARD = b"".join(frame(p) for p in PAYLOADS)


def mutate(rng: random.Random) -> bytes:
    kind = rng.choice(["flip", "truncate", "insert", "delete", "duplicate", "reframe", "huge_length"])
    data = bytearray(SHARD)
    at = rng.randrange(len(data))
    if kind == "flip":
        data[at] ^= rng.randint(1, 255)
    elif kind == "truncate":
        del data[at:]
    elif kind == "insert":
        data[at:at] = rng.randbytes(rng.randint(1, 16))
    elif kind == "delete":
        del data[at : at + rng.randint(1, 16)]
    elif kind == "duplicate":
        data[at:at] = data[at : at + rng.randint(1, 64)]
    elif kind == "reframe":  # valid CRCs around a damaged Example: only the Example checks can tell
        payloads = list(PAYLOADS)
        victim = bytearray(payloads[rng.randrange(len(payloads))])
        for _ in range(rng.randint(1, 3)):
            where = rng.randrange(len(victim))
            if rng.random() < 0.7:
                victim[where] ^= rng.randint(1, 255)
            else:
                del victim[where:]
                if not victim:
                    break
        payloads[rng.randrange(len(payloads))] = bytes(victim)
        return b"".join(frame(p) for p in payloads)
    else:  # huge_length: a header whose CRC is right and whose length is not
        index = rng.randrange(len(PAYLOADS) + 1)
        crafted = frame(b"", length=rng.choice([2**31, 2**40, 2**63, 2**64 - 1]))[:12] + rng.randbytes(8)
        return b"".join(frame(p) for p in PAYLOADS[:index]) + crafted + b"".join(frame(p) for p in PAYLOADS[index:])
    return bytes(data)


def check(path: Path) -> int | DataError:
    gc.disable()  # a collection of what earlier tests left in this process (an xdist worker) is not this input's
    started = time.process_time()  # CPU time: a bound that a loaded machine cannot break
    try:
        result: int | DataError = verify_shard(path)
    except DataError as err:
        result = err
    finally:
        seconds = time.process_time() - started
        gc.enable()
    STATS["inputs"] += 1
    STATS["valid" if isinstance(result, int) else "refused"] += 1
    STATS["max_seconds"] = max(STATS["max_seconds"], seconds)
    assert seconds < 1.0, f"{seconds:.2f} s"
    if isinstance(result, DataError):
        message = str(result)
        assert message.startswith(f"shard {path} ") and "\n" not in message, message
        assert " record " in message, message
    return result


@settings(max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(st.integers(0, 2**32))
def test_mutated_shards_are_read_or_refused_in_one_line(tmp_path_factory: pytest.TempPathFactory, seed: int) -> None:
    rng = random.Random(seed)
    folder = tmp_path_factory.mktemp("fuzz")
    for i in range(4):
        path = folder / f"{i}.tfrecords"
        path.write_bytes(mutate(rng))
        result = check(path)
        if isinstance(result, int):  # e.g. a flip inside the pixels of a re-framed record
            assert 0 <= result <= len(PAYLOADS) + 1


@pytest.fixture(scope="module", autouse=True)
def _report() -> Any:
    """Peak RSS only grows: if any input had needed 50 MB more than those before it, this would show it."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(
        f"\nrecord reader: {STATS['inputs']} inputs, {STATS['valid']} read, {STATS['refused']} refused; "
        f"max {STATS['max_seconds'] * 1000:.1f} ms, peak RSS grew {grown:.1f} MB"
    )
    assert grown < 50


def test_the_original_shard_reads(tmp_path: Path) -> None:
    (tmp_path / "ok.tfrecords").write_bytes(SHARD)
    assert check(tmp_path / "ok.tfrecords") == 4


def test_a_reframed_garbage_record_is_not_an_example(tmp_path: Path) -> None:
    path = tmp_path / "s.tfrecords"
    path.write_bytes(frame(PAYLOADS[0]) + frame(b"\x0a\x03junk"))  # valid CRCs around bytes protobuf refuses
    assert str(check(path)).startswith(f"shard {path} record 1 is not a tf.train.Example: ")


def test_labels_and_metadata_must_be_zero_or_one(tmp_path: Path) -> None:
    feature = dict(tf.train.Example.FromString(PAYLOADS[0]).features.feature)
    for key, values, message in [
        ("label", [0, 2, 0, 0, 0, 0, 0, 0], "feature label must hold 8 int64 values, each 0 or 1"),
        ("label", [1, 1, 0, 0, 0, 0, 0, 0], "feature label is not one-hot"),
        ("metadata", [7] * 28, "feature metadata must hold 28 int64 values, each 0 or 1"),
    ]:
        changed = {**feature, key: tf.train.Feature(int64_list=tf.train.Int64List(value=values))}
        record = tf.train.Example(features=tf.train.Features(feature=changed)).SerializeToString()
        path = tmp_path / f"{key}.tfrecords"
        path.write_bytes(frame(PAYLOADS[1]) + frame(record))
        assert f"shard {path} record 1: {message}" == str(check(path))


def test_a_huge_announced_length_is_refused_before_tensorflow_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "crafted.tfrecords"
    path.write_bytes(frame(PAYLOADS[0]) + frame(b"", length=2**40)[:12] + b"x" * 20)
    assert str(check(path)) == (
        f"shard {path} is corrupt or truncated at record 1: its header announces 1,099,511,627,776 bytes, "
        "the file has 32 left"
    )
    # The manifest path checks the framing too, before count_labels or the pipeline read the shard.
    manifest = tmp_path / "m.pickle"
    manifest.write_bytes(pickle.dumps({"train": [str(path)], "val": [], "test": []}))
    with pytest.raises(DataError, match=r"crafted.tfrecords is corrupt or truncated at record 1"):
        fetch_shards(load_manifest(manifest), tmp_path / "cache")
    # Without that walk, TensorFlow's own reader takes the whole process down: the check is needed.
    code = f"import tensorflow as tf; list(tf.data.TFRecordDataset({str(path)!r}))"
    crashed = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=300)
    assert crashed.returncode < 0, crashed.returncode  # killed by a signal (SIGSEGV here)
