"""A lease on a folder: one process at a time writes a run folder, locally or on gs://.

    held = lease.acquire("outputs/densenet/r1", advice="rerun with --run-id r1 once it has ended")
    ...                      # LeaseHeld (exit 2) above when a live process holds it; a daemon thread
    held.check()             # refreshes the heartbeat; LeaseLost (exit 1) if another process took it over
    held.release()           # at the end, normal or not

The lease is the object `{folder}/.lease`: JSON naming its holder (pid, host, start, heartbeat). It is
claimed atomically: locally with O_CREAT | O_EXCL, on GCS with `if_generation_match=0`. A lease left by a
killed process is taken over, so that a rerun resumes: on the same machine (host name, boot and pid
namespace all equal) as soon as its pid is gone; from another machine, and for GCS leases of other
machines, once its heartbeat is older than `stale_seconds` (a pid there cannot be checked). A takeover
is race-free too: locally every claim runs under a flock of the folder (and still creates with O_EXCL),
on GCS the new lease replaces the stale one only `if_generation_match` its generation.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from utilities import storage
from utilities.errors import JobError, RunFailure, one_line

log = logging.getLogger(__name__)

LEASE_NAME = ".lease"
HEARTBEAT_SECONDS = 30.0  # the holder refreshes its heartbeat this often
STALE_SECONDS = 300.0  # ten missed heartbeats: a lease of another machine is then taken over
CLAIM_ATTEMPTS = 5  # rounds of claim / take over while others race for the same lease
FOLDER_LOCK_SECONDS = 10.0  # a local claim waits this long for another process's claim (milliseconds) to end


class LeaseHeld(JobError, RuntimeError):
    """Another live process holds the lease (exit 2: nothing ran; the message names the holder)."""


class LeaseLost(RunFailure, RuntimeError):
    """This process's lease was taken over (its heartbeat went stale): it must not publish."""


# ---------------------------------------------------------------------- the holder


@dataclass(frozen=True)
class Holder:
    """Who holds a lease: what the lease file holds, and what a claimant needs to judge it stale."""

    token: str  # unique per claim: tells our own lease from a successor's
    pid: int
    host: str
    machine: str  # boot id and pid namespace: a pid means the same process only where both are equal
    pid_start: str | None  # the process's start (clock ticks since boot, Linux): a reused pid is another process
    started: float  # seconds since the epoch
    heartbeat: float

    @classmethod
    def me(cls) -> Holder:
        clock = time.time()
        pid = os.getpid()
        return cls(uuid.uuid4().hex, pid, socket.gethostname(), _machine(), _process_start(pid), clock, clock)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def parse(cls, data: bytes) -> Holder | None:
        """The holder a lease names; None for a lease that cannot be read (half written, or not ours)."""
        try:
            content = json.loads(data)
            return cls(
                token=str(content["token"]),
                pid=int(content["pid"]),
                host=str(content["host"]),
                machine=str(content["machine"]),
                pid_start=None if content.get("pid_start") is None else str(content["pid_start"]),
                started=float(content["started"]),
                heartbeat=float(content["heartbeat"]),
            )
        except (ValueError, KeyError, TypeError):
            return None

    @property
    def on_this_machine(self) -> bool:
        return self.host == socket.gethostname() and self.machine == _machine()

    def describe(self, heartbeat: float) -> str:
        ago = time.time() - heartbeat
        return f"pid {self.pid} on host {self.host} since {_iso(self.started)} (last heartbeat {ago:.0f} s ago)"


def _iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="seconds")


def _machine() -> str:
    """This boot of this machine and this pid namespace: where a pid names one process."""
    parts = []
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return " ".join(parts)


def _process_start(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (after the parenthesised name, which may hold spaces); None off Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def _alive(holder: Holder) -> bool:
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        pass
    started = _process_start(holder.pid)
    return holder.pid_start is None or started is None or started == holder.pid_start


def _stale(holder: Holder | None, heartbeat: float, stale_seconds: float) -> bool:
    """A lease nobody keeps any more: its pid gone (this machine), else its heartbeat too old."""
    if holder is not None and holder.on_this_machine:
        return not _alive(holder)
    return time.time() - heartbeat > stale_seconds


def _refusal(uri: str, holder: Holder | None, heartbeat: float, advice: str, stale_seconds: float) -> LeaseHeld:
    who = holder.describe(heartbeat) if holder else f"an unreadable lease (written {_iso(heartbeat)})"
    expiry = (
        ""
        if holder and holder.on_this_machine
        else f"; a lease is stale {stale_seconds:.0f} s after its last heartbeat"
    )
    return LeaseHeld(f"{uri} is in use by {who}; {advice}{expiry}")


# ---------------------------------------------------------------------- the lease


class Lease:
    """A held lease; a daemon thread refreshes its heartbeat until `release()`."""

    def __init__(self, uri: str, holder: Holder, heartbeat_seconds: float) -> None:
        self.uri, self.holder = uri, holder
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, args=(heartbeat_seconds,), name="lease-heartbeat", daemon=True
        )
        self._thread.start()

    def check(self) -> None:
        """Raise LeaseLost when the lease is no longer this process's (another process took it over)."""
        if self.lost or not self._still_ours():
            self.lost = True
            raise LeaseLost(f"the lease on {self.uri} was taken over by another process; this run does not publish")

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours; never raises (called on every exit)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=60)
        try:
            self._remove()
        except Exception as exc:  # left behind: a rerun takes it over (dead pid, or a stale heartbeat)
            log.warning("could not remove the lease on %s: %s", self.uri, one_line(exc))

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _beat(self, seconds: float) -> None:
        while not self._stop.wait(seconds):
            try:
                self._refresh()
            except LeaseLost as exc:
                self.lost = True
                log.error("%s", exc)
                return
            except Exception as exc:  # a transient failure; the next beat tries again
                log.warning("lease heartbeat on %s failed: %s", self.uri, one_line(exc))

    def _still_ours(self) -> bool:
        raise NotImplementedError

    def _refresh(self) -> None:
        raise NotImplementedError

    def _remove(self) -> None:
        raise NotImplementedError


def acquire(
    folder: str | os.PathLike[str],
    advice: str,
    *,
    stale_seconds: float = STALE_SECONDS,
    heartbeat_seconds: float = HEARTBEAT_SECONDS,
) -> Lease:
    """The lease on `folder` (a local folder, created if missing, or a gs:// prefix), or LeaseHeld naming
    its live holder and ending with `advice` (what to do about it)."""
    if storage.is_gcs(folder):
        return _acquire_gcs(str(folder), advice, stale_seconds, heartbeat_seconds)
    return _acquire_local(Path(folder), advice, stale_seconds, heartbeat_seconds)


# ---------------------------------------------------------------------- local


class _LocalLease(Lease):
    """`{folder}/.lease`, kept open: the heartbeat is its mtime, its inode tells ours from a successor's."""

    def __init__(self, path: Path, holder: Holder, fd: int, heartbeat_seconds: float) -> None:
        self.path, self._fd = path, fd
        super().__init__(str(path.parent), holder, heartbeat_seconds)

    def _still_ours(self) -> bool:
        try:
            on_disk = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(self._fd)
        return (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino)

    def _refresh(self) -> None:
        if not self._still_ours():
            raise LeaseLost(f"the lease on {self.uri} was taken over by another process")
        os.utime(self._fd)

    def _remove(self) -> None:
        try:
            with _folder_lock(self.path.parent):
                if self._still_ours():
                    self.path.unlink()
        finally:
            os.close(self._fd)


def _acquire_local(folder: Path, advice: str, stale_seconds: float, heartbeat_seconds: float) -> Lease:
    path = folder / LEASE_NAME
    me = Holder.me()
    for _ in range(CLAIM_ATTEMPTS):
        folder.mkdir(parents=True, exist_ok=True)
        with _folder_lock(folder):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                found, heartbeat = _read_local(path)
                if heartbeat is None:
                    continue  # released in between: claim again
                if not _stale(found, heartbeat, stale_seconds):
                    raise _refusal(str(folder), found, heartbeat, advice, stale_seconds) from None
                log.warning(
                    "taking over the stale lease on %s (%s)",
                    folder,
                    found.describe(heartbeat) if found else "unreadable",
                )
                path.unlink(missing_ok=True)
                continue
            except FileNotFoundError:
                continue  # the folder was removed (a refused run tidying up): create it again
            try:
                os.write(fd, me.to_bytes())
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                path.unlink(missing_ok=True)
                raise
            return _LocalLease(path, me, fd, heartbeat_seconds)
    raise LeaseHeld(f"{folder} is being claimed by several processes at once; {advice}")


def _read_local(path: Path) -> tuple[Holder | None, float | None]:
    """(holder, heartbeat: the file's mtime); (None, None) when there is no lease file."""
    try:
        with open(path, "rb") as fh:
            data, mtime = fh.read(1 << 16), os.fstat(fh.fileno()).st_mtime
    except FileNotFoundError:
        return None, None
    return Holder.parse(data), mtime


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """Claims and takeovers of one folder's lease, one at a time (a flock of the folder itself: released when
    its holder dies). Where flock is not supported (some network file systems) O_EXCL alone guards a claim."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        deadline = time.monotonic() + FOLDER_LOCK_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LeaseHeld(f"{folder} is locked by another process claiming it; try again") from None
                time.sleep(0.02)
            except OSError as exc:
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                    raise
                log.debug("no flock on %s (%s): O_EXCL alone guards the lease", folder, exc.strerror)
                break
        yield
    finally:
        os.close(fd)  # releases the flock


# ---------------------------------------------------------------------- GCS


class _GcsLease(Lease):
    """`gs://…/{folder}/.lease`: every change is conditional on the generation this process last wrote."""

    def __init__(self, uri: str, holder: Holder, generation: int, heartbeat_seconds: float) -> None:
        self.lease_uri, self.generation = storage.join(uri, LEASE_NAME), generation
        super().__init__(uri, holder, heartbeat_seconds)

    def _still_ours(self) -> bool:
        found, _, _ = _read_gcs(self.lease_uri)
        return found is not None and found.token == self.holder.token

    def _refresh(self) -> None:
        beat = replace(self.holder, heartbeat=time.time())
        try:
            self.generation = _write_gcs(self.lease_uri, beat.to_bytes(), self.generation)
        except _PreconditionFailed:
            found, generation, _ = _read_gcs(self.lease_uri)
            if found is None or found.token != self.holder.token:
                raise LeaseLost(f"the lease on {self.uri} was taken over by another process") from None
            self.generation = generation  # our own write, retried after a lost response
        self.holder = beat

    def _remove(self) -> None:
        blob = storage._blob(self.lease_uri)
        with contextlib.suppress(_PreconditionFailed, _NotFound):  # not ours any more: the successor's to keep
            _gcs("release", self.lease_uri, lambda: blob.delete(if_generation_match=self.generation, retry=None))


class _PreconditionFailed(Exception):
    """HTTP 412: the object is not at the generation the request was conditional on."""


class _NotFound(Exception):
    pass


def _acquire_gcs(uri: str, advice: str, stale_seconds: float, heartbeat_seconds: float) -> Lease:
    lease_uri = storage.join(uri, LEASE_NAME)
    me = Holder.me()
    for _ in range(CLAIM_ATTEMPTS):
        try:
            return _GcsLease(uri, me, _write_gcs(lease_uri, me.to_bytes(), 0), heartbeat_seconds)
        except _PreconditionFailed:
            pass
        found, generation, updated = _read_gcs(lease_uri)
        if generation is None:
            continue  # released in between: claim again
        if found is not None and found.token == me.token:  # our create, retried after a lost response
            return _GcsLease(uri, me, generation, heartbeat_seconds)
        heartbeat = found.heartbeat if found else updated
        if not _stale(found, heartbeat, stale_seconds):
            raise _refusal(uri, found, heartbeat, advice, stale_seconds)
        log.warning("taking over the stale lease on %s (%s)", uri, found.describe(heartbeat) if found else "unreadable")
        try:
            return _GcsLease(uri, me, _write_gcs(lease_uri, me.to_bytes(), generation), heartbeat_seconds)
        except _PreconditionFailed:
            continue  # another process took it over first: judge its lease
    raise LeaseHeld(f"{uri} is being claimed by several processes at once; {advice}")


def _write_gcs(uri: str, data: bytes, generation: int) -> int:
    """Write `data` only if the object is at `generation` (0: does not exist); the new generation."""
    blob = storage._blob(uri)
    _gcs("claim", uri, lambda: blob.upload_from_string(data, if_generation_match=generation, retry=None))
    return int(blob.generation)


def _read_gcs(uri: str) -> tuple[Holder | None, int | None, float]:
    """(holder, generation, the object's update time); generation None when there is no lease."""
    blob = storage._blob(uri)
    try:
        _gcs("read", uri, lambda: blob.reload(retry=None))
        # Taken before the download, which resets them from its response headers (absent on some servers).
        generation, updated = int(blob.generation), blob.updated.timestamp() if blob.updated else 0.0
        data = _gcs("read", uri, lambda: blob.download_as_bytes(if_generation_match=generation, retry=None))
    except (_NotFound, _PreconditionFailed):  # gone, or replaced between the two reads: the caller retries
        return None, None, 0.0
    return Holder.parse(data), generation, updated


def _gcs(op: str, uri: str, fn):
    """storage's retried call; 412 and 404 come back as their own exceptions (they are answers here)."""
    from google.api_core import exceptions as api

    def call():
        try:
            return fn()
        except api.PreconditionFailed as exc:
            raise _PreconditionFailed(str(exc)) from exc
        except api.NotFound as exc:
            raise _NotFound(str(exc)) from exc

    try:
        return storage._gcs_call(op, uri, call, None)
    except storage.StorageError as err:
        if isinstance(err.__cause__, _PreconditionFailed | _NotFound):
            raise err.__cause__ from None
        raise
