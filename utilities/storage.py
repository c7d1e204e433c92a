"""Read and write `gs://bucket/key` and local URIs through one small API.

Used by `tools.prepare` (shards + manifest), the shard cache and the run outputs.

Guarantees:
- Local writes are atomic: a temp file in the destination folder, fsync, `os.replace`; parents are
  created. A failed write leaves no partial file behind.
- GCS uploads are verified against the checksum the service returns (crc32c, else md5); a mismatch
  deletes the object and raises. Transient failures (429, 5xx, connection errors, corrupted
  downloads) are retried with exponential backoff, bounded by `RetryPolicy`.
- GCS downloads go to a temp file beside the destination, then `os.replace`.
- Every failure is a `StorageError` with a one-line message naming the URI and never a credential.
- With `STORAGE_EMULATOR_HOST` set (honoured by google-cloud-storage itself) the client uses
  anonymous credentials and a dummy project, so tests need no Google account.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import logging
import os
import random
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, TypeVar

from utilities.errors import JobError, one_line, redact_url

if TYPE_CHECKING:  # google-cloud-storage costs ~0.5 s to import; local-only users never pay it
    from google.cloud.storage import Blob, Client

log = logging.getLogger(__name__)
T = TypeVar("T")

GCS_SCHEME = "gs://"
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")
_TRANSIENT_HTTP = frozenset({408, 429, 500, 502, 503, 504})
_TMP_MARK = ".tmp-"  # in the names of our in-flight temp files; list_uris skips them
_CHUNK = 1 << 20  # bytes read per step when hashing files


class StorageError(JobError, RuntimeError):
    """A storage operation failed; the message is one line, names the URI, and holds no secret."""


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff for transient GCS failures."""

    attempts: int = 5  # total tries, the first included
    initial_delay: float = 0.5  # seconds before the second try
    multiplier: float = 2.0
    max_delay: float = 16.0

    def delays(self) -> Iterator[float]:
        """Sleep before each retry; jittered so many workers do not retry in lock-step."""
        delay = self.initial_delay
        for _ in range(self.attempts - 1):
            yield min(delay, self.max_delay) * (0.5 + random.random() / 2)
            delay *= self.multiplier


# Read at call time, so tests (and impatient callers) can swap it: `storage.DEFAULT_RETRY = RetryPolicy(3, 0.01)`.
DEFAULT_RETRY = RetryPolicy()


class _ChecksumMismatch(Exception):
    """The service stored bytes other than the ones sent; retried like a transient error."""


# ---------------------------------------------------------------------------------------------------
# URIs
# ---------------------------------------------------------------------------------------------------


def is_gcs(uri: str | os.PathLike[str]) -> bool:
    return str(uri).startswith(GCS_SCHEME)


def join(uri: str, *parts: str) -> str:
    """`join("gs://b/runs", "m", "x.json") == "gs://b/runs/m/x.json"`; local URIs use os.path.join."""
    if not is_gcs(uri):
        return os.path.join(uri, *parts)
    pieces = [str(uri).rstrip("/")] + [p.strip("/") for p in parts if p.strip("/")]
    return "/".join(pieces)


def _split_gcs(uri: str, *, need_key: bool = True) -> tuple[str, str]:
    bucket, _, key = uri[len(GCS_SCHEME) :].partition("/")
    if not _BUCKET_RE.fullmatch(bucket):
        raise StorageError(f"{redact_url(uri)} is not a valid gs:// URI: bad bucket name {bucket!r}")
    if need_key and not key:
        raise StorageError(f"{redact_url(uri)} names a bucket, not an object")
    return bucket, key


def without_file_scheme(uri: str) -> str:
    """A local URI as a path: `file:///x` is `/x`; anything else is returned as it is."""
    return uri.removeprefix("file://")


def _local_path(uri: str | os.PathLike[str]) -> Path:
    text = str(uri)
    if text.startswith("file://"):
        text = without_file_scheme(text)
    elif "://" in text:
        raise StorageError(f"unsupported URI {redact_url(text)}: use gs://bucket/path or a local path")
    return Path(text)


# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------


class TooLarge(StorageError):
    """`read_bytes(..., max_bytes=N)` of an object or file over N bytes."""

    def __init__(self, uri: str, size: int, max_bytes: int) -> None:
        super().__init__(f"cannot read {redact_url(uri)}: {size:,} bytes, over the {max_bytes:,} allowed")
        self.size, self.max_bytes = size, max_bytes


def read_bytes(uri: str, *, retry: RetryPolicy | None = None, max_bytes: int | None = None) -> bytes:
    """With `max_bytes`, anything larger is refused (`TooLarge`) unread: a gs:// object by its metadata's
    size (the download then asks for that generation: a bigger one put in between is never read), a
    local file after max_bytes + 1 bytes."""
    if not is_gcs(uri):
        data = _local_io("read", uri, lambda: _read_at_most(_local_path(uri), max_bytes))
        if max_bytes is not None and len(data) > max_bytes:
            raise TooLarge(uri, _local_path(uri).stat().st_size, max_bytes)
        return data
    blob = _blob(uri)
    if max_bytes is not None:
        _gcs_call("read metadata of", uri, lambda: blob.reload(retry=None), retry)  # sets blob.generation
        if (blob.size or 0) > max_bytes:
            raise TooLarge(uri, blob.size, max_bytes)
    # checksum="crc32c": the client compares the bytes with the x-goog-hash header it receives.
    return _gcs_call("read", uri, lambda: blob.download_as_bytes(checksum="crc32c", retry=None), retry)


def write_bytes(uri: str, data: bytes, *, retry: RetryPolicy | None = None) -> None:
    if not is_gcs(uri):
        _local_io("write", uri, lambda: atomic_write(_local_path(uri), lambda fh: fh.write(data)))
        return
    crc, md5 = _checksums_of_bytes(data)
    _verified_upload(uri, lambda blob: blob.upload_from_string(data, retry=None), crc, md5, retry)


def upload_file(local_path: str | os.PathLike[str], uri: str, *, retry: RetryPolicy | None = None) -> None:
    source = Path(local_path)
    if not source.is_file():
        raise StorageError(f"cannot upload {source}: no such file")
    if not is_gcs(uri):
        _copy_local(source, _local_path(uri))
        return
    crc, md5 = _local_io("read", str(source), lambda: _checksums_of_file(source))
    _verified_upload(uri, lambda blob: blob.upload_from_filename(str(source), retry=None), crc, md5, retry)


def upload_tree(local_dir: str | os.PathLike[str], uri: str, *, retry: RetryPolicy | None = None) -> list[str]:
    """Upload every file under `local_dir` to the same relative path under `uri`; returns the URIs written."""
    root = Path(local_dir)
    if not root.is_dir():
        raise StorageError(f"cannot upload {root}: no such folder")
    written = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        target = join(uri, *path.relative_to(root).parts)
        upload_file(path, target, retry=retry)
        written.append(target)
    return written


def download_file(uri: str, local_path: str | os.PathLike[str], *, retry: RetryPolicy | None = None) -> None:
    target = Path(local_path)
    if not is_gcs(uri):
        source = _local_path(uri)
        if not source.is_file():
            raise StorageError(f"cannot download {uri}: no such file")
        _copy_local(source, target)
        return
    blob = _blob(uri)

    def fetch() -> None:  # each attempt writes a fresh temp file, so a retry never appends
        atomic_write(target, lambda fh: blob.download_to_file(fh, checksum="crc32c", retry=None))

    _gcs_call("download", uri, fetch, retry)


def fetch_to_cache(uri: str, cache: Path, *, retry: RetryPolicy | None = None) -> tuple[Path, bool]:
    """A gs:// object's local copy in `cache`, named by its identity (generation + crc32c): `(path, downloaded)`.

    For shards whose manifest has no sha256 (the original's pickles): the object's metadata says whether a
    cached copy is still the same object, so a rerun downloads nothing. The cached copy is re-checked
    against the crc32c before use, and the download asks for that exact generation, so an object
    replaced in between is never mixed up with the one whose identity named the file.
    """
    blob = _blob(uri)
    _gcs_call("read metadata of", uri, lambda: blob.reload(retry=None), retry)
    identity = f"{uri}#{blob.generation}#{blob.crc32c}"
    target = cache / f"gcs-{hashlib.sha256(identity.encode()).hexdigest()[:40]}.tfrecords"
    if target.is_file() and blob.crc32c and _checksums_of_file(target)[0] == blob.crc32c:
        return target, False

    def fetch() -> None:  # each attempt writes a fresh temp file, so a retry never appends
        atomic_write(target, lambda fh: blob.download_to_file(fh, checksum="crc32c", retry=None))

    _gcs_call("download", uri, fetch, retry)
    return target, True


def exists(uri: str, *, retry: RetryPolicy | None = None) -> bool:
    """True for an existing file or folder; on GCS for an object, or a prefix with objects under it."""
    if not is_gcs(uri):
        return _local_path(uri).exists()
    bucket, key = _split_gcs(uri, need_key=False)
    if not key:
        return _gcs_call("check", uri, lambda: _client().bucket(bucket).exists(retry=None), retry)

    def probe() -> bool:
        if _client().bucket(bucket).blob(key).exists(retry=None):
            return True
        children = _client().list_blobs(bucket, prefix=key.rstrip("/") + "/", max_results=1, retry=None)
        return any(True for _ in children)

    return _gcs_call("check", uri, probe, retry)


def list_uris(prefix: str, *, retry: RetryPolicy | None = None) -> list[str]:
    """Sorted URIs of all objects/files whose URI starts with `prefix` (gsutil semantics; recursive)."""
    if is_gcs(prefix):
        bucket, key = _split_gcs(prefix, need_key=False)
        return _gcs_call(
            "list",
            prefix,
            lambda: sorted(
                f"{GCS_SCHEME}{bucket}/{b.name}" for b in _client().list_blobs(bucket, prefix=key, retry=None)
            ),
            retry,
        )
    path = _local_path(prefix)
    root = path if path.is_dir() else path.parent
    if not root.is_dir():
        return []
    found = (str(p) for p in root.rglob("*") if p.is_file() and _TMP_MARK not in p.name)
    return sorted(p for p in found if p.startswith(str(path)))


def check_writable(uri: str, *, retry: RetryPolicy | None = None) -> None:
    """Fail early, before hours of training, when outputs could not be written to `uri` (a folder)."""
    if not is_gcs(uri):
        _check_local_writable(_local_path(uri))
        return
    probe_uri = join(uri, f".write-probe-{uuid.uuid4().hex}")
    blob = _blob(probe_uri)
    _gcs_call("write to", uri, lambda: blob.upload_from_string(b"", retry=None), retry)
    with contextlib.suppress(Exception):  # a leftover empty probe is harmless; the check passed
        blob.delete(retry=None)


# ---------------------------------------------------------------------------------------------------
# Local files
# ---------------------------------------------------------------------------------------------------


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """`write(fh)` into a temp file of its own beside `path`, fsync, `os.replace`: a reader never sees half
    a file, two writers never share a temp file, a failure leaves the old content and no temp file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its 0600 mode would survive the rename; open(..., "xb") honours the umask.
    tmp = path.parent / f".{path.name}{_TMP_MARK}{uuid.uuid4().hex[:12]}"
    try:
        with open(tmp, "xb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _read_at_most(path: Path, limit: int | None) -> bytes:
    with open(path, "rb") as fh:
        return fh.read() if limit is None else fh.read(limit + 1)


def _copy_local(source: Path, target: Path) -> None:
    with contextlib.suppress(OSError):
        if target.exists() and os.path.samefile(source, target):
            return

    def copy() -> None:
        with open(source, "rb") as src:
            atomic_write(target, lambda fh: shutil.copyfileobj(src, fh, _CHUNK))

    _local_io("write", str(target), copy)


def _check_local_writable(folder: Path) -> None:
    def probe() -> None:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / f".write-probe-{uuid.uuid4().hex}", lambda fh: fh.write(b""))
        for leftover in folder.glob(".write-probe-*"):
            leftover.unlink(missing_ok=True)

    _local_io("write to", str(folder), probe)


def _local_io(op: str, uri: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except FileNotFoundError as exc:
        raise StorageError(f"cannot {op} {uri}: no such file or folder") from exc
    except OSError as exc:
        raise StorageError(f"cannot {op} {uri}: {exc.strerror or one_line(exc)}") from exc


# ---------------------------------------------------------------------------------------------------
# GCS
# ---------------------------------------------------------------------------------------------------


def _client() -> Client:
    return _client_for(os.environ.get("STORAGE_EMULATOR_HOST") or None)


@functools.lru_cache(maxsize=4)
def _client_for(emulator_host: str | None) -> Client:
    """One client per endpoint: keyed by the emulator host so tests can point at a proxy and back."""
    from google.cloud import storage

    if emulator_host:
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project="emulator", credentials=AnonymousCredentials())
    try:
        return storage.Client()
    except Exception as exc:  # DefaultCredentialsError and friends: say what to do, not the traceback
        raise StorageError(
            f"no Google Cloud credentials ({type(exc).__name__}); run `gcloud auth application-default login` "
            "or set GOOGLE_APPLICATION_CREDENTIALS"
        ) from exc


def _blob(uri: str) -> Blob:
    bucket, key = _split_gcs(uri)
    return _client().bucket(bucket).blob(key)


def _verified_upload(uri: str, send: Callable[[Blob], None], crc: str, md5: str, retry: RetryPolicy | None) -> None:
    blob = _blob(uri)

    def attempt() -> None:
        send(blob)  # the upload response refreshes blob.crc32c / blob.md5_hash
        remote, local = (blob.crc32c, crc) if blob.crc32c else (blob.md5_hash, md5)
        if remote != local:
            kind = "crc32c" if blob.crc32c else "md5"
            raise _ChecksumMismatch(f"{kind} sent {local}, service stored {remote}")

    try:
        _gcs_call("upload to", uri, attempt, retry)
    except StorageError as err:
        if isinstance(err.__cause__, _ChecksumMismatch):
            with contextlib.suppress(Exception):  # never leave corrupt bytes where readers trust them
                blob.delete(retry=None)
        raise


def _gcs_call(op: str, uri: str, fn: Callable[[], T], retry: RetryPolicy | None) -> T:
    """Run `fn`, retrying transient failures per `retry`; any failure becomes a one-line StorageError."""
    policy = retry or DEFAULT_RETRY
    delays = policy.delays()
    attempt = 1
    while True:
        try:
            return fn()
        except StorageError:
            raise
        except Exception as exc:
            delay = next(delays, None) if _is_transient(exc) else None
            if delay is None:
                raise _to_storage_error(op, uri, exc, attempt) from exc
            log.warning("%s %s: %s; retry %d/%d in %.2fs", op, uri, _describe(exc), attempt, policy.attempts - 1, delay)
            time.sleep(delay)
            attempt += 1


def _is_transient(exc: BaseException) -> bool:
    import requests
    from google.api_core import exceptions as api
    from google.auth.exceptions import TransportError
    from google.cloud.storage.exceptions import DataCorruption, InvalidResponse

    if isinstance(exc, _ChecksumMismatch | DataCorruption | TransportError | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, requests.ConnectionError | requests.Timeout):
        return True
    if isinstance(exc, api.GoogleAPICallError):
        return exc.code in _TRANSIENT_HTTP
    if isinstance(exc, InvalidResponse):
        return getattr(exc.response, "status_code", None) in _TRANSIENT_HTTP
    return False


def _to_storage_error(op: str, uri: str, exc: BaseException, attempts: int) -> StorageError:
    from google.api_core import exceptions as api

    tried = f" after {attempts} attempts" if attempts > 1 else ""
    if isinstance(exc, api.NotFound):
        return StorageError(f"cannot {op} {uri}: {_what_is_missing(uri)}")
    if isinstance(exc, api.Forbidden | api.Unauthorized):
        return StorageError(f"cannot {op} {uri}: permission denied (HTTP {exc.code}); check the account's bucket roles")
    return StorageError(f"cannot {op} {uri}{tried}: {_describe(exc)}")


def _what_is_missing(uri: str) -> str:
    bucket, _ = _split_gcs(uri, need_key=False)
    try:
        bucket_exists = _client().bucket(bucket).exists(retry=None)
    except Exception:  # the diagnosis is best effort; the caller already has a failure to report
        bucket_exists = True
    return "no such object" if bucket_exists else f"bucket gs://{bucket} does not exist"


def _describe(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    if isinstance(code, int):  # api_core errors: keep the status and the service's reason, not the URL/body dump
        return one_line(f"HTTP {code} {_service_reason(exc)}", 200)
    if isinstance(exc, _ChecksumMismatch):
        return f"upload verification failed: {exc}"
    return one_line(f"{type(exc).__name__}: {exc}", 200)


def _service_reason(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    with contextlib.suppress(Exception):  # the body is JSON on GCS: {"error": {"message": ...}}
        return str(response.json()["error"]["message"])  # type: ignore[union-attr]
    return str(getattr(response, "reason", "") or getattr(exc, "message", "") or "")


def _checksums_of_bytes(data: bytes) -> tuple[str, str]:
    import google_crc32c

    return _b64(google_crc32c.Checksum(data).digest()), _b64(hashlib.md5(data, usedforsecurity=False).digest())


def _checksums_of_file(path: Path) -> tuple[str, str]:
    import google_crc32c

    crc, md5 = google_crc32c.Checksum(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            crc.update(chunk)
            md5.update(chunk)
    return _b64(crc.digest()), _b64(md5.digest())


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")
