"""Experiment tracking with Weights & Biases, and a no-op tracker when tracking is off.

    tracker = start_tracking(config.tracking, run_name, run_id, config.to_dict(), is_chief=is_chief)
    model.fit(..., callbacks=[*tracker.callbacks(), ...])
    tracker.log_model(run_dir / "model", "dermaid", data_tag, manifest_sha256)
    tracker.finish()

Only the chief tracks: other workers and disabled runs get a `NullTracker`, and then `wandb` is
never imported. The run config passes through `sanitize` first, so no secret reaches W&B. Offline
runs are written as `{folder}/wandb/offline-run-*/run-*.wandb`, where `folder` is WANDB_DIR when set,
else the run's local folder (`wandb_folder`: never the current folder); `wandb sync DIR` uploads them
later, and `read_offline_history(DIR)` reads their logged rows back (tests, offline checks).
"""

from __future__ import annotations

import json
import logging
import re
import struct
import tempfile
import time
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tf_keras

from utilities.errors import one_line, redact_url
from utilities.run.config import TrackingConfig

logger = logging.getLogger(__name__)

REDACTED = "[redacted]"
_SECRET_KEY = re.compile(r"token|key|secret|password|passwd|credential", re.IGNORECASE)
_ARTIFACT_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
OFFLINE_FLUSH_TIMEOUT_S = 30.0  # seconds to wait for wandb-core to write the end of an offline run
DATASET_ARTIFACT = "dermaid-dataset"  # one artifact collection; each data tag is an alias of a version


def sanitize(value: Any) -> Any:
    """Copy of a config tree with secrets redacted, recursively through dicts, lists and tuples.

    A value whose key contains token/key/secret/password/credential becomes "[redacted]", and
    credentials embedded in URLs (`https://user:token@host/...`) are removed from every string.
    """
    if isinstance(value, dict):
        return {k: REDACTED if _SECRET_KEY.search(str(k)) else sanitize(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [sanitize(v) for v in value]
    if isinstance(value, str):
        return redact_url(value)
    return value


# ── trackers ──────────────────────────────────────────────────────────────────────────────────


class Tracker(ABC):
    """What the training job needs from experiment tracking; every method is safe to call when off."""

    def callbacks(self) -> list[tf_keras.callbacks.Callback]:
        """Keras callbacks for `fit`. Always records the fusion weights into the Keras History."""
        return [FusionWeightLogger(self)]

    @abstractmethod
    def log(self, metrics: dict[str, Any], step: int | None = None, commit: bool = True) -> None:
        """One row of the history; `step` must grow over the run (omit it to use the next step)."""

    @abstractmethod
    def log_summary(self, summary: dict[str, Any]) -> None:
        """Final values shown for the run (e.g. test metrics of each variant)."""

    @abstractmethod
    def log_images(self, images: dict[str, Path]) -> None:
        """PNG files by name (confusion matrix, training curves)."""

    @abstractmethod
    def log_table(self, name: str, rows: list[dict[str, Any]]) -> None:
        """A table of flat rows (e.g. `comparison.comparison_rows`)."""

    @abstractmethod
    def log_model(self, path: Path, name: str, data_tag: str | None, manifest_sha256: str | None) -> None:
        """A saved model (file or folder) as a "model" artifact linked to the dataset it was trained on."""

    @abstractmethod
    def finish(self, exit_code: int = 0) -> None:
        """Close the run; a non-zero exit code marks it failed."""

    @property
    def run_dir(self) -> Path | None:
        """Local folder of the run's files (the offline-run folder), or None when not tracking."""
        return None


class NullTracker(Tracker):
    """Tracking off (or not the chief): every call does nothing; callbacks still fill the History."""

    def log(self, metrics: dict[str, Any], step: int | None = None, commit: bool = True) -> None:
        pass

    def log_summary(self, summary: dict[str, Any]) -> None:
        pass

    def log_images(self, images: dict[str, Path]) -> None:
        pass

    def log_table(self, name: str, rows: list[dict[str, Any]]) -> None:
        pass

    def log_model(self, path: Path, name: str, data_tag: str | None, manifest_sha256: str | None) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbTracker(Tracker):
    """A live `wandb` run; created by `start_tracking`."""

    def __init__(self, run: Any) -> None:
        self._run = run
        self._finished = False
        self._axes: set[str] = set()  # prefixes whose `{prefix}/epoch` is their charts' x-axis

    @property
    def run_dir(self) -> Path | None:
        return Path(self._run.dir).parent  # run.dir is "<run folder>/files"

    def callbacks(self) -> list[tf_keras.callbacks.Callback]:
        from wandb.integration.keras import WandbMetricsLogger

        # FusionWeightLogger first: it adds its values to `logs` and to the row the metrics logger commits.
        return [*super().callbacks(), WandbMetricsLogger(log_freq="epoch")]

    def log(self, metrics: dict[str, Any], step: int | None = None, commit: bool = True) -> None:
        for key in metrics:  # e.g. student/epoch: plot student/* against it, as Keras' epoch/* is
            prefix, _, leaf = key.rpartition("/")
            if leaf == "epoch" and prefix and prefix not in self._axes:
                self._run.define_metric(f"{prefix}/*", step_metric=key)
                self._axes.add(prefix)
        self._run.log(metrics, step=step, commit=commit)

    def log_summary(self, summary: dict[str, Any]) -> None:
        self._run.summary.update(sanitize(summary))

    def log_images(self, images: dict[str, Path]) -> None:
        import wandb

        self._run.log({name: wandb.Image(str(path)) for name, path in images.items()})

    def log_table(self, name: str, rows: list[dict[str, Any]]) -> None:
        import wandb

        columns = list(dict.fromkeys(key for row in rows for key in row))  # union, first-seen order
        data = [[row.get(column) for column in columns] for row in rows]
        self._run.log({name: wandb.Table(columns=columns, data=data)})

    def log_model(self, path: Path, name: str, data_tag: str | None, manifest_sha256: str | None) -> None:
        """Log the model artifact; the dataset identity goes in its metadata and a "dataset" artifact.

        `run.use_artifact` (a real input edge in the lineage graph) raises in offline mode, so offline
        the dataset artifact is logged as an output of this run instead; online it is used as input.
        Both carry the data tag and manifest sha256, and the model's metadata names them too.
        """
        import wandb

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"cannot log model {path}: no such file or directory")
        if data_tag or manifest_sha256:
            self._link_dataset(data_tag, manifest_sha256)
        lineage = {"data_tag": data_tag, "manifest_sha256": manifest_sha256}
        artifact = wandb.Artifact(_artifact_name(name), type="model", metadata=lineage)
        if path.is_dir():
            artifact.add_dir(str(path))
        else:
            artifact.add_file(str(path))
        self._run.log_artifact(artifact, aliases=["latest", *_tag_alias(data_tag)])

    def _link_dataset(self, data_tag: str | None, manifest_sha256: str | None) -> None:
        """A tiny "dataset" artifact whose content is the tag and manifest hash (same data → same digest)."""
        import wandb

        identity = {"data_tag": data_tag, "manifest_sha256": manifest_sha256}
        artifact = wandb.Artifact(DATASET_ARTIFACT, type="dataset", metadata=identity)
        with artifact.new_file("dataset.json", mode="w", encoding="utf-8") as handle:
            json.dump(identity, handle, sort_keys=True)
        aliases = _tag_alias(data_tag)
        if self._run.offline:
            self._run.log_artifact(artifact, aliases=aliases)
        else:
            self._run.use_artifact(artifact, aliases=aliases)

    def finish(self, exit_code: int = 0) -> None:
        """Close the run; offline, also wait until its log is complete on disk (ready to copy or sync)."""
        if self._finished:
            return
        self._finished = True
        self._run.finish(exit_code=exit_code)
        # wandb-core may still be flushing the .wandb file when finish() returns.
        if self._run.offline and not wait_for_offline_run(self.run_dir, OFFLINE_FLUSH_TIMEOUT_S):
            logger.warning(
                "W&B offline run %s was not complete on disk after %.0f s", self.run_dir, OFFLINE_FLUSH_TIMEOUT_S
            )


def _artifact_name(name: str) -> str:
    """W&B artifact names allow letters, digits, '.', '_' and '-'."""
    return _ARTIFACT_NAME_CHARS.sub("-", name).strip("-") or "model"


def _tag_alias(data_tag: str | None) -> list[str]:
    """The data tag as an artifact alias (aliases may not contain '/' or ':')."""
    return [_artifact_name(data_tag)] if data_tag else []


def wandb_folder(config: TrackingConfig, local_dir: str | Path | None) -> Path:
    """The folder W&B writes its `wandb/` into: WANDB_DIR when set, else the run's local folder.

    `local_dir` is the run folder itself for a local --output, its staging copy (`.cache/runs/…`, never
    uploaded) for a gs:// one. Without either (a library call), a new temporary folder that is kept:
    `wandb sync` needs it. Never the current folder, where wandb would put `./wandb/` by itself.
    """
    if config.wandb_dir:
        return Path(config.wandb_dir)
    if local_dir is not None:
        return Path(local_dir)
    return Path(tempfile.mkdtemp(prefix="dermaid-wandb-"))


def start_tracking(
    config: TrackingConfig,
    run_name: str,
    run_id: str,
    config_dict: dict[str, Any],
    is_chief: bool = True,
    local_dir: str | Path | None = None,
) -> Tracker:
    """A W&B run (resumed when `run_id` exists) on the chief when enabled, else a `NullTracker`.

    Its files go under `wandb_folder(config, local_dir)`. A failing `wandb.init` (e.g. online without
    network) does not stop training: it is logged and the run continues untracked; metrics.json and
    report.md still hold every result.
    """
    if not config.enabled or config.mode == "disabled" or not is_chief:
        return NullTracker()
    import wandb

    folder = wandb_folder(config, local_dir).resolve()  # the logged `wandb sync` command works from anywhere
    folder.mkdir(parents=True, exist_ok=True)
    try:
        run = wandb.init(
            project=config.project,
            name=run_name,
            id=run_id,
            resume="allow",
            mode=config.mode,
            dir=str(folder),
            config=sanitize(config_dict),
        )
    except Exception as exc:  # wandb raises its own errors (CommError, UsageError, ...)
        logger.warning("W&B init failed, continuing without tracking: %s", one_line(exc))
        return NullTracker()
    tracker = WandbTracker(run)
    if config.mode == "offline":
        logger.info("W&B offline run: %s; upload it with `wandb sync %s`", tracker.run_dir, tracker.run_dir)
    return tracker


# ── Keras callback ────────────────────────────────────────────────────────────────────────────


class FusionWeightLogger(tf_keras.callbacks.Callback):
    """Each epoch, the fusion layer's branch weights as `fusion/<branch>` in the Keras logs and tracker.

    The layer named `layer_name` must have `branch_weights() -> {"image": w, "metadata": w}`; a
    model without it (e.g. the student) is skipped. Place it before `WandbMetricsLogger`: the
    weights are logged with `commit=False`, so they land in the same W&B row as the epoch metrics.
    """

    def __init__(self, tracker: Tracker | None = None, layer_name: str = "fusion") -> None:
        super().__init__()
        self.tracker = tracker or NullTracker()
        self.layer_name = layer_name

    def _weights(self) -> dict[str, float]:
        try:
            layer = self.model.get_layer(self.layer_name)
        except ValueError:  # no such layer
            return {}
        if not hasattr(layer, "branch_weights"):
            return {}
        return {f"fusion/{branch}": float(w) for branch, w in layer.branch_weights().items()}

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        weights = self._weights()
        if not weights:
            return
        if logs is not None:
            logs.update(weights)  # the same dict reaches later callbacks and the History
        self.tracker.log(weights, commit=False)


# ── reading offline runs ──────────────────────────────────────────────────────────────────────

# A .wandb file is a LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version 0), then
# 32 KiB blocks of chunks, each a 7-byte header (crc32, length, type) + payload; a chunk never
# crosses a block, so long records are split FIRST/MIDDLE…/LAST. Payloads are protobuf `Record`s.
_FILE_HEADER = struct.Struct("<4sHB")
_CHUNK_HEADER = struct.Struct("<IHB")
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _wandb_file(run_dir: Path) -> Path:
    files = sorted(Path(run_dir).glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file in {run_dir}; expected a W&B offline-run folder")
    return files[0]


def _chunks(data: bytes, path: Path) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each chunk, checksum-verified; stops at a truncated tail (run still open)."""
    offset = _FILE_HEADER.size
    while offset + _CHUNK_HEADER.size <= len(data):
        if _BLOCK - offset % _BLOCK < _CHUNK_HEADER.size:  # block trailer padding
            offset += _BLOCK - offset % _BLOCK
            continue
        crc, length, kind = _CHUNK_HEADER.unpack_from(data, offset)
        payload = data[offset + _CHUNK_HEADER.size : offset + _CHUNK_HEADER.size + length]
        if kind == 0 or len(payload) < length:
            return
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) != crc:
            raise ValueError(f"{path}: corrupt record at byte {offset} (checksum mismatch)")
        yield kind, payload
        offset += _CHUNK_HEADER.size + length


def read_offline_records(run_dir: str | Path) -> Iterator[Any]:
    """Every `wandb.proto.wandb_internal_pb2.Record` of an offline run folder, in write order."""
    from wandb.proto import wandb_internal_pb2

    path = _wandb_file(Path(run_dir))
    data = path.read_bytes()
    ident, magic, version = _FILE_HEADER.unpack_from(data)
    if (ident, magic, version) != (b":W&B", 0xBEE1, 0):
        raise ValueError(f"{path}: not a W&B log version 0 (header {ident!r}, magic {magic:#x}, version {version})")
    pending = b""
    for kind, payload in _chunks(data, path):
        pending = payload if kind in (_FULL, _FIRST) else pending + payload
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def wait_for_offline_run(run_dir: str | Path, timeout_s: float = OFFLINE_FLUSH_TIMEOUT_S) -> bool:
    """True once the run's log holds its final `exit` record (everything before it is on disk too)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if any(r.WhichOneof("record_type") == "exit" for r in read_offline_records(run_dir)):
                return True
        except FileNotFoundError:
            pass  # not created yet
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _set_item(row: dict[str, Any], item: Any) -> None:
    """Put one history item into `row`; a logged dict (media, tables) comes back nested."""
    *parents, leaf = list(item.nested_key) or [item.key]
    for part in parents:
        row = row.setdefault(part, {})
    row[leaf] = json.loads(item.value_json)


def read_offline_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The logged history rows of an offline run (`run.log` calls), values JSON-decoded.

    Each row includes W&B's `_step`; Keras epochs logged by `WandbMetricsLogger` appear as
    `epoch/<metric>` with `epoch/epoch`.
    """
    rows = []
    for record in read_offline_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _set_item(row, item)
            rows.append(row)
    return rows
