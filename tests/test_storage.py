"""utilities.storage against local folders and the GCS emulator (with injected 503s).

Run: .venv/bin/python -m pytest tests/test_storage.py -q
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from utilities import storage
from utilities.storage import RetryPolicy, StorageError

FAST = RetryPolicy(attempts=3, initial_delay=0.01, max_delay=0.02)


def _one_line(err: pytest.ExceptionInfo[StorageError]) -> str:
    message = str(err.value)
    assert "\n" not in message and message
    return message


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if storage._TMP_MARK in p.name or "write-probe" in p.name]


# ---------------------------------------------------------------------------------------------------
# Local
# ---------------------------------------------------------------------------------------------------


def test_join_and_is_gcs() -> None:
    assert storage.join("gs://b/runs/", "m", "/x.json") == "gs://b/runs/m/x.json"
    assert storage.join("gs://b", "a") == "gs://b/a"
    assert storage.join("/tmp/o", "m", "x.json") == "/tmp/o/m/x.json"
    assert storage.is_gcs("gs://b/a") and not storage.is_gcs("/gs/b") and not storage.is_gcs(Path("gs"))


def test_local_round_trip_creates_parents_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "x.bin"
    storage.write_bytes(str(target), b"one")
    storage.write_bytes(str(target), b"two")
    assert storage.read_bytes(str(target)) == b"two"
    assert storage.exists(str(target)) and storage.exists(str(tmp_path / "a"))
    assert _leftovers(tmp_path) == []


def test_local_failed_write_keeps_old_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "x.bin"
    storage.write_bytes(str(target), b"old")

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage.os, "fsync", broken_fsync)
    with pytest.raises(StorageError) as err:
        storage.write_bytes(str(target), b"new")
    assert "No space left" in _one_line(err) and str(target) in str(err.value)
    assert target.read_bytes() == b"old" and _leftovers(tmp_path) == []


def test_local_files_tree_and_listing(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"a")
    (src / "sub" / "b.txt").write_bytes(b"b")
    out = tmp_path / "out"
    written = storage.upload_tree(str(src), str(out))
    assert written == [str(out / "a.txt"), str(out / "sub" / "b.txt")]
    assert storage.list_uris(str(out)) == written
    assert storage.list_uris(str(out / "sub")) == [str(out / "sub" / "b.txt")]
    assert storage.list_uris(str(tmp_path / "nowhere")) == []
    storage.download_file(str(out / "sub" / "b.txt"), tmp_path / "dl" / "b.txt")
    assert (tmp_path / "dl" / "b.txt").read_bytes() == b"b"


def test_local_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(StorageError) as err:
        storage.read_bytes(str(tmp_path / "missing.bin"))
    assert "no such file" in _one_line(err)
    with pytest.raises(StorageError) as err:
        storage.upload_file(tmp_path / "missing.bin", str(tmp_path / "x"))
    assert "missing.bin" in _one_line(err)
    with pytest.raises(StorageError) as err:
        storage.read_bytes("s3://bucket/key")
    assert "unsupported URI" in _one_line(err)


def test_local_check_writable(tmp_path: Path) -> None:
    storage.check_writable(str(tmp_path / "new" / "folder"))
    assert (tmp_path / "new" / "folder").is_dir() and _leftovers(tmp_path) == []
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StorageError) as err:
        storage.check_writable(str(tmp_path / "file" / "sub"))
    assert "cannot write to" in _one_line(err)


# ---------------------------------------------------------------------------------------------------
# GCS emulator
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def bucket(gcs_emulator) -> str:
    return gcs_emulator.make_bucket(f"t-{uuid.uuid4().hex[:12]}")


def test_gcs_round_trip(bucket: str, tmp_path: Path) -> None:
    uri = f"gs://{bucket}/runs/m/x.bin"
    storage.write_bytes(uri, b"\x00payload")
    assert storage.read_bytes(uri) == b"\x00payload"
    assert storage.exists(uri) and storage.exists(f"gs://{bucket}/runs") and storage.exists(f"gs://{bucket}")
    assert not storage.exists(f"gs://{bucket}/runs/nothing")

    src = tmp_path / "model"
    (src / "variables").mkdir(parents=True)
    (src / "saved_model.pb").write_bytes(b"pb" * 1000)
    (src / "variables" / "v.data").write_bytes(bytes(range(256)) * 64)
    written = storage.upload_tree(src, f"gs://{bucket}/runs/m/model")
    assert written == [f"gs://{bucket}/runs/m/model/saved_model.pb", f"gs://{bucket}/runs/m/model/variables/v.data"]
    assert storage.list_uris(f"gs://{bucket}/runs/m/model/") == written
    storage.download_file(written[1], tmp_path / "dl" / "v.data")
    assert (tmp_path / "dl" / "v.data").read_bytes() == (src / "variables" / "v.data").read_bytes()


def test_gcs_missing_bucket_and_object(gcs_emulator, bucket: str, tmp_path: Path) -> None:
    with pytest.raises(StorageError) as err:
        storage.write_bytes("gs://no-such-bucket-dermaid/x", b"x", retry=FAST)
    assert "bucket gs://no-such-bucket-dermaid does not exist" in _one_line(err)
    with pytest.raises(StorageError) as err:
        storage.read_bytes(f"gs://{bucket}/missing.bin", retry=FAST)
    assert f"gs://{bucket}/missing.bin: no such object" in _one_line(err)
    with pytest.raises(StorageError):
        storage.download_file(f"gs://{bucket}/missing.bin", tmp_path / "d" / "m.bin", retry=FAST)
    assert not (tmp_path / "d" / "m.bin").exists() and _leftovers(tmp_path) == []
    with pytest.raises(StorageError) as err:
        storage.list_uris("gs://no-such-bucket-dermaid/prefix", retry=FAST)
    assert "does not exist" in _one_line(err)


def test_gcs_check_writable(bucket: str) -> None:
    storage.check_writable(f"gs://{bucket}/outputs")
    assert storage.list_uris(f"gs://{bucket}/") == []  # the probe object was removed
    with pytest.raises(StorageError) as err:
        storage.check_writable("gs://no-such-bucket-dermaid/outputs", retry=FAST)
    assert "does not exist" in _one_line(err)


def test_gcs_upload_retries_transient_503(bucket: str, gcs_faults, tmp_path: Path) -> None:
    gcs_faults.fail_next(2)
    storage.write_bytes(f"gs://{bucket}/retried.bin", b"survived", retry=FAST)
    assert gcs_faults.failed == 2
    assert storage.read_bytes(f"gs://{bucket}/retried.bin") == b"survived"

    gcs_faults.fail_next(1, methods=("GET",))
    storage.download_file(f"gs://{bucket}/retried.bin", tmp_path / "r.bin", retry=FAST)
    assert (tmp_path / "r.bin").read_bytes() == b"survived" and gcs_faults.failed == 3


def test_gcs_persistent_faults_fail_cleanly(bucket: str, gcs_faults, tmp_path: Path) -> None:
    source = tmp_path / "x.bin"
    source.write_bytes(b"never stored")
    gcs_faults.fail_next(1000, methods=("POST", "PUT"))
    with pytest.raises(StorageError) as err:
        storage.upload_file(source, f"gs://{bucket}/x.bin", retry=FAST)
    message = _one_line(err)
    assert f"gs://{bucket}/x.bin after 3 attempts" in message and "503" in message
    assert gcs_faults.failed == 3
    assert not storage.exists(f"gs://{bucket}/x.bin")  # GETs still pass the proxy


def test_gcs_checksum_mismatch_deletes_object(bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Pretend the bytes changed on the way: the local checksum no longer matches what the service stored.
    monkeypatch.setattr(storage, "_checksums_of_bytes", lambda data: ("AAAAAA==", "AAAAAAAAAAAAAAAAAAAAAA=="))
    with pytest.raises(StorageError) as err:
        storage.write_bytes(f"gs://{bucket}/corrupt.bin", b"data", retry=FAST)
    assert "crc32c" in _one_line(err) and "after 3 attempts" in str(err.value)
    assert not storage.exists(f"gs://{bucket}/corrupt.bin")


def test_gcs_bad_uris() -> None:
    with pytest.raises(StorageError) as err:
        storage.read_bytes("gs://bucket-only")
    assert "names a bucket, not an object" in _one_line(err)
    with pytest.raises(StorageError) as err:
        storage.read_bytes("gs://Bad_Bucket/x")
    assert "bad bucket name" in _one_line(err)


def test_gcs_unreachable_endpoint_is_retried_then_reported(gcs_emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.fixtures.gcs import _free_port

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    with pytest.raises(StorageError) as err:
        storage.write_bytes("gs://any-bucket/x.bin", b"x", retry=FAST)
    assert "gs://any-bucket/x.bin after 3 attempts: ConnectionError" in _one_line(err)
