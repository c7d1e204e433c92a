"""A run's folder and its record: where a run writes, what `run.json` says about it, and `latest.json`.

with open_run_folder(config, is_chief=True) as folder:  # leased; refuses a complete run or one in use
    record = RunRecord.start(config, manifest, devices, now())  # lineage, filled in as the run goes
    record.training = TrainingRecord(epochs_run=3)
    folder.check_lease()                                   # LeaseLost if another process took the folder over
    write_json(folder.path("run.json"), record.to_json())  # last: run.json marks a complete run
    point_latest_at(config, record)
    remove_checkpoints(folder)                             # the backups: nothing resumes a complete run
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime as dt
import json
import logging
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from utilities import storage
from utilities.errors import JobError, one_line
from utilities.run import lease
from utilities.run.config import Config

log = logging.getLogger(__name__)

PACKAGES = ("tensorflow", "tf-keras", "tensorflow-model-optimization", "numpy", "wandb", "dvc", "ai-edge-litert")


class RunError(JobError, RuntimeError):
    """A run that cannot start or continue as asked; the message is one line."""


# ---------------------------------------------------------------------- the folder


@dataclass
class RunFolder:
    """Local folder the run writes into, and the URI where the finished run is published.

    Local output: written in place. gs:// output: staged locally, uploaded at the end.
    Non-chief workers of a multi-worker job write into a temporary folder that is never published.
    Used as a context manager: at the end (normal or not) the chief's leases are released, and a folder
    this run created is removed again if it is still empty (a run refused before it wrote anything).
    """

    local: Path
    uri: str
    publish: bool
    checkpoints: Path = field(init=False)
    leases: list[lease.Lease] = field(default_factory=list)  # the chief's, on `uri` (and its local staging copy)
    created: bool = False  # this run made `local`

    def __post_init__(self) -> None:
        self.checkpoints = self.local / "checkpoints"

    def path(self, *parts: str) -> Path:
        return self.local.joinpath(*parts)

    def check_lease(self) -> None:
        """LeaseLost (exit 1) when another process took this run folder over: then this run must not publish."""
        for held in self.leases:
            held.check()

    def close(self, failed: bool) -> None:
        for held in reversed(self.leases):
            held.release()
        self.leases = []
        if failed and self.created:
            with contextlib.suppress(OSError):  # not empty: there is something to keep (or another run's lease)
                self.local.rmdir()

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        self.close(failed=kind is not None)


def open_run_folder(config: Config, is_chief: bool) -> RunFolder:
    """Where this run writes, leased to this process; refuses a run that is already complete, and a run
    folder that another live process holds (the same --run-id and --output started twice).

    The chief holds a lease (utilities.run.lease) on the run folder, and on a gs:// run also on its local staging
    copy (the backups a rerun resumes from), until the folder is closed. A lease left by a killed run is
    taken over, so that a rerun resumes.

    A non-chief worker takes no lease (the chief holds it for the job) and writes into a temporary folder
    that is never published, but shares the chief's checkpoint folder: BackupAndRestore makes every worker
    restore from the chief's backup there (a worker that restored nothing would start over, out of step with
    the chief), and writes its own into a `workertemp_N` subfolder that it deletes again.
    """
    uri = config.output.run_uri
    local = Path(config.output.staging_dir) / config.output.model_name / config.output.run_id
    if not storage.is_gcs(uri):
        local = Path(uri)
    if is_chief:
        storage.check_writable(config.output.output)
        _refuse_complete(uri)  # before the lease too: a complete run is never touched again
        folder = RunFolder(local=local, uri=uri, publish=True, created=not local.exists())
        advice = (
            f"wait for it to end, then rerun the same command with --run-id {config.output.run_id} to resume it "
            "(or pick another --run-id)"
        )
        try:
            if storage.is_gcs(uri):
                folder.leases.append(lease.acquire(uri, advice))
            folder.leases.append(lease.acquire(local, advice))  # creates `local`
            _refuse_complete(uri)  # it may have completed since the first check
        except BaseException:
            folder.close(failed=True)
            raise
    else:
        folder = RunFolder(local=Path(tempfile.mkdtemp(prefix="dermaid-worker-")), uri=uri, publish=False)
        folder.checkpoints = local / "checkpoints"
    if config.output.checkpoint_dir:
        folder.checkpoints = (
            Path(local_mount(config.output.checkpoint_dir)) / config.output.model_name / config.output.run_id
        )
    return folder


def _refuse_complete(uri: str) -> None:
    if storage.exists(storage.join(uri, "run.json")):
        raise RunError(f"run {uri} is already complete; pick another --run-id (or omit it for a new run)")


def local_mount(uri: str) -> str:
    """Vertex AI mounts buckets at /gcs/BUCKET (Cloud Storage FUSE); TensorFlow writes through it."""
    if storage.is_gcs(uri):
        mounted = Path("/gcs") / uri[len("gs://") :]
        if not Path("/gcs").is_dir():
            raise RunError(f"checkpoint dir {uri} needs the /gcs mount of Vertex AI; use a local path here")
        return str(mounted)
    return uri


# Subfolders of a run's local folder that stay local: the backups, and W&B's files (tracking.wandb_folder).
LOCAL_ONLY = ("checkpoints", "wandb")


def publish_files(folder: RunFolder) -> None:
    """Upload a gs:// run's staged files (`LOCAL_ONLY` folders and the staging copy's lease stay local),
    `run.json` last: it marks completion."""
    if not storage.is_gcs(folder.uri):
        return
    kept = ("run.json", lease.LEASE_NAME)
    for path in sorted(folder.local.rglob("*")):
        relative = path.relative_to(folder.local)
        if path.is_file() and path.name not in kept and relative.parts[0] not in LOCAL_ONLY:
            storage.upload_file(path, storage.join(folder.uri, relative.as_posix()))
    storage.upload_file(folder.path("run.json"), storage.join(folder.uri, "run.json"))


def remove_checkpoints(folder: RunFolder) -> bool:
    """Delete a complete run's training backups (`folder.checkpoints`: checkpoints/ beside the outputs, or the
    run's own folder under AIP_CHECKPOINT_DIR, through Vertex AI's /gcs mount); True when they are gone.

    Called by the chief after run.json and latest.json are written: a complete run is refused before
    anything would restore them. A failure is a warning; the run stays complete.
    """
    path = folder.checkpoints
    if not path.exists():
        return True
    size = 0
    with contextlib.suppress(OSError):  # for the log line only
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    try:
        shutil.rmtree(path, onerror=_vanished_is_fine)
    except OSError as exc:
        log.warning(
            "could not remove the training backups %s (the run is complete; delete them by hand): %s",
            path,
            exc.strerror or one_line(exc),
        )
        return False
    log.info(
        "removed the training backups %s (%.0f MB): the run is complete (--keep-checkpoints keeps them)",
        path,
        size / 1e6,
    )
    return True


def _vanished_is_fine(function, path, exc_info) -> None:
    """shutil.rmtree's error hook: a file another process removed meanwhile is not a failure."""
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]


# ---------------------------------------------------------------------- the record (run.json)


@dataclass
class DataRecord:
    tag: str | None
    manifest: str
    manifest_sha256: str | None  # of the bytes parsed: a gs:// manifest is read once
    shard_sha256: dict[str, str] = field(default_factory=dict)
    counts: dict[str, Any] | None = None


@dataclass
class TrainingRecord:
    resumed_from_epoch: int = 0  # 0-based; (0, 0): not resumed
    resumed_from_step: int = 0
    epochs_run: int = 0
    batchnorm_batches: int | None = None  # a fine-tuned backbone's BatchNorm re-estimation (chief only)
    weights: str = "as trained"  # what was validated and exported: or "moving average (--ema D)"


@dataclass
class RunRecord:
    """The lineage of one run, as `run.json` holds it: what ran, on which data and code, on what devices."""

    run_id: str
    model_name: str
    uri: str
    started: str
    config: dict[str, Any] = field(default_factory=dict)
    data: DataRecord | None = None
    code: dict[str, str | None] = field(default_factory=dict)
    packages: dict[str, str | None] = field(default_factory=dict)
    devices: Any = None  # utilities.run.distribution.device_summary
    training: TrainingRecord | None = None
    fusion_weights: dict[str, float] | None = None
    finished: str | None = None
    gate: dict[str, Any] | None = None  # the release gate's verdict (utilities.evaluation.gate), None: no gate

    @classmethod
    def start(cls, config: Config, manifest, devices: Any, started: str) -> RunRecord:
        """The record of a run started at `started` (`now()`) on `manifest` (a `utilities.data.manifest.Manifest`)."""
        return cls(
            run_id=config.output.run_id,
            model_name=config.output.model_name,
            uri=config.output.run_uri,
            started=started,
            config=config.to_dict(),
            data=DataRecord(
                tag=config.data.data_tag,
                manifest=config.data.manifest,
                manifest_sha256=manifest.digest,
                shard_sha256=dict(manifest.sha256 or {}),
                counts=manifest.counts,
            ),
            # The checkout's HEAD; in a container (no .git) the commit the image was built from.
            code={"git_commit": git_commit() or config.cluster.code_commit},
            packages=package_versions(),
            devices=devices,
        )

    def to_json(self) -> dict[str, Any]:
        content = dataclasses.asdict(self)
        if content["training"] and content["training"]["batchnorm_batches"] is None:
            del content["training"]["batchnorm_batches"]
        return content


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def read_history(path: Path) -> dict[str, list[float]]:
    """Per-epoch metrics from CSVLogger, across resumed runs (later rows win for a repeated epoch)."""
    if not path.exists():
        return {}
    rows: dict[int, dict[str, str]] = {}
    with path.open() as handle:
        for row in csv.DictReader(handle):
            if row.get("epoch", "").isdigit():
                rows[int(row["epoch"])] = row
    keys = [k for k in next(iter(rows.values()), {}) if k != "epoch"]
    return {k: [float(rows[e][k]) for e in sorted(rows)] for k in keys}


def point_latest_at(config: Config, record: RunRecord) -> None:
    """`{output}/{model_name}/latest.json` names the latest complete run (one object write: atomic).

    Written after run.json; a run that finished earlier than the one already named leaves it alone.
    """
    uri = storage.join(config.output.output, config.output.model_name, "latest.json")
    pointer = {
        "run_id": record.run_id,
        "uri": record.uri,
        "model": storage.join(record.uri, "model"),
        "run_json": storage.join(record.uri, "run.json"),
        "finished": record.finished,
        "data_tag": record.data.tag if record.data else None,
        "manifest_sha256": record.data.manifest_sha256 if record.data else None,
    }
    try:
        current = json.loads(storage.read_bytes(uri)) if storage.exists(uri) else {}
    except (storage.StorageError, ValueError):
        current = {}  # unreadable pointer: replace it
    if str(current.get("finished") or "") > str(pointer["finished"] or ""):
        log.info("latest.json keeps run %s, which finished after this one", current.get("run_id"))
        return
    storage.write_bytes(uri, json.dumps(pointer, indent=2, sort_keys=True).encode())


def write_json(path: Path, content: Any) -> None:
    """Atomically and durably (`storage.atomic_write`)."""
    data = json.dumps(content, indent=2, sort_keys=True, default=str).encode()
    storage.atomic_write(path, lambda fh: fh.write(data))


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
