"""One training run, start to finish: `training.run(config)` owns every side effect.

    python -c "import cli; cli.main(['--manifest', 'Versioning/versioned_paths.pickle', '--weights', 'none'])"
    python training.py -b 32 -p True      # the original's command line: runs cli.py's main, same flags and exit codes

Reads like the run: devices → run folder → data → tracking → model → fit (resuming from the
backup when the run id was used before) → evaluate → compression variants → outputs, with
`run.json` written last so a run folder that has it is complete.
"""

from __future__ import annotations

if __name__ == "__main__":  # `python training.py …`, the original's entry point: exactly `python cli.py …`
    import sys

    import cli

    sys.exit(cli.main())

import contextlib
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

import tensorflow as tf
import tf_keras

from utilities import data, distribution, evaluation, feature_cache, storage, tracking, variant_eval
from utilities.callbacks import (
    BACKUP_SECONDS,
    Backup,
    Preempted,
    PreemptionWatch,
    fit_callbacks,
    resume_position,
)
from utilities.config import Config
from utilities.errors import JobError
from utilities.model import (
    build_model,
    compile_model,
    fusion_weights,
    load_model,
    save_model,
    save_recalibrated,
)

log = logging.getLogger(__name__)


class RunError(JobError, RuntimeError):
    """A run that cannot start or continue as asked; the message is one line."""


_PACKAGES = ("tensorflow", "tf-keras", "tensorflow-model-optimization", "numpy", "wandb", "dvc", "ai-edge-litert")


@dataclass
class RunFolder:
    """Local folder the run writes into, and the URI where the finished run is published.

    Local output: written in place. gs:// output: staged locally, uploaded at the end.
    Non-chief workers of a multi-worker job write into a temporary folder that is never published.
    """

    local: Path
    uri: str
    publish: bool
    checkpoints: Path = field(init=False)

    def __post_init__(self) -> None:
        self.checkpoints = self.local / "checkpoints"

    def path(self, *parts: str) -> Path:
        return self.local.joinpath(*parts)


@dataclass
class RunResult:
    uri: str
    local_dir: Path
    metrics: dict[str, Any]
    lineage: dict[str, Any]


def run(config: Config) -> RunResult:
    """The whole run; SIGTERM raises `Preempted` (inside training: after saving a backup of the step)."""
    with PreemptionWatch() as watch:
        return _run(config, watch)


def _run(config: Config, watch: PreemptionWatch) -> RunResult:
    started = _now()
    # ------------------------------------------------------------------ devices and strategy
    cluster = distribution.parse_cluster(config.cluster.tf_config)
    distribution.configure_devices(config.train.gpus, multi_worker=cluster.num_workers > 1, jit=config.train.jit)
    strategy = distribution.build_strategy(config.train.gpus, config.cluster.tf_config)
    if config.train.mixed_precision:
        tf_keras.mixed_precision.set_global_policy("mixed_float16")
    tf_keras.utils.set_random_seed(config.train.seed)

    # ------------------------------------------------------------------ run folder
    folder = open_run_folder(config, is_chief=cluster.is_chief)
    log.info("run %s → %s", config.output.run_id, folder.uri)

    # ------------------------------------------------------------------ data
    manifest = data.load_manifest(config.data.manifest)
    shards = data.fetch_shards(manifest, config.data.cache_dir)
    datasets = data.build_datasets(
        shards,
        image_size=config.data.image_size,
        global_batch_size=config.train.batch_size,
        seed=config.train.seed,
        augment=config.data.augment,
        shuffle_buffer=config.data.shuffle_buffer,
    )
    log.info("examples per split %s; class weights %s", datasets.counts, _rounded(datasets.class_weights))
    if config.compression.prune or config.compression.distill or config.compression.quantize:
        from utilities import compression  # tfmot is imported only when compressing

        compression.check_inputs(config, train_examples=datasets.counts["train"])

    # ------------------------------------------------------------------ tracking
    lineage = build_lineage(config, manifest, strategy, started)
    tracker = tracking.start_tracking(
        config.tracking,
        run_name=config.output.model_name,
        run_id=config.output.run_id,
        config_dict={"config": config.to_dict(), "data": lineage["data"]},
        is_chief=cluster.is_chief,
    )
    try:
        # -------------------------------------------------------------- model
        with strategy.scope():
            model = build_model(config.model, config.data.image_size)
            compile_model(model, config.train.learning_rate, jit=config.train.jit)
        log.info("model: %s parameters (%s trainable)", f"{model.count_params():,}", f"{_trainable(model):,}")

        # -------------------------------------------------------------- train (resumes from backup)
        epoch, step = fit(model, datasets, config, folder, tracker, strategy, watch)
        history = read_history(folder.path("history.csv"))
        lineage["training"] = {
            "resumed_from_epoch": epoch,  # 0-based; (0, 0): not resumed
            "resumed_from_step": step,
            "epochs_run": len(history.get("loss", [])),
        }
        lineage["fusion_weights"] = fusion_weights(model)

        # -------------------------------------------------------------- evaluate and export
        # Every worker saves (saving reads synced variables: collective ops); a non-chief copy is discarded.
        # The chief re-estimates a fine-tuned backbone's BatchNorm statistics first (see save_recalibrated):
        # after a short fine-tune the moving averages lag the weights and inference-mode outputs collapse.
        if cluster.is_chief and config.model.fine_tune:
            used = save_recalibrated(model, folder.path("model"), datasets.train_clean or datasets.train)
            lineage["training"]["batchnorm_batches"] = used
            log.info("BatchNorm statistics re-estimated on %d training batches (no augmentation)", used)
        else:
            save_model(model, folder.path("model"))
        variants: dict[str, variant_eval.VariantResult] = {}
        if cluster.is_chief:
            # Multi-worker: each read of BatchNorm's moving statistics (ON_READ variables) in `model(x)` is
            # an all-reduce across workers; the saved copy, loaded outside the strategy, needs no peer.
            evaluated = model if cluster.num_workers == 1 else load_model(folder.path("model"))
            variants["model"] = variant_eval.evaluate_keras(evaluated, datasets, folder.path("model"))
            log.info("val balanced accuracy %.3f", variants["model"].metrics["val"]["balanced_accuracy"])

            # ---------------------------------------------------------- compression variants
            # Several workers: the chief compresses alone, on that reloaded copy under the default
            # strategy (no collective needs a peer), while the others wait at the end barrier.
            compress_strategy = strategy if cluster.num_workers == 1 else tf.distribute.get_strategy()
            variants.update(run_compression(config, evaluated, datasets, folder, compress_strategy, tracker, variants))
        metrics = {"headline": "balanced_accuracy", "variants": {name: v.metrics for name, v in variants.items()}}
        for line in evaluation.collapse_warnings(metrics):
            log.warning(line)

        # -------------------------------------------------------------- outputs (run.json last)
        lineage["finished"] = _now()
        if folder.publish:
            publish(config, folder, metrics, lineage, history, tracker)
        tracker.finish(0)
    except BaseException:
        tracker.finish(1)
        raise
    finally:
        if not folder.publish:  # a non-chief worker's copy of the outputs
            shutil.rmtree(folder.local, ignore_errors=True)
    distribution.wait_for_workers(strategy)  # other workers exit only once the chief has published
    return RunResult(uri=folder.uri, local_dir=folder.local, metrics=metrics, lineage=lineage)


# ---------------------------------------------------------------------- run folder


def open_run_folder(config: Config, is_chief: bool) -> RunFolder:
    """Where this run writes; refuses to touch a run that is already complete.

    A non-chief worker writes into a temporary folder that is never published, but shares the chief's
    checkpoint folder: BackupAndRestore makes every worker restore from the chief's backup there
    (a worker that restored nothing would start over, out of step with the chief), and writes its own
    into a `workertemp_N` subfolder that it deletes again.
    """
    uri = config.output.run_uri
    local = Path(config.output.staging_dir) / config.output.model_name / config.output.run_id
    if not storage.is_gcs(uri):
        local = Path(uri)
    if is_chief:
        storage.check_writable(config.output.output)
        if storage.exists(storage.join(uri, "run.json")):
            raise RunError(f"run {uri} is already complete; pick another --run-id (or omit it for a new run)")
        local.mkdir(parents=True, exist_ok=True)
        folder = RunFolder(local=local, uri=uri, publish=True)
    else:
        folder = RunFolder(local=Path(tempfile.mkdtemp(prefix="dermaid-worker-")), uri=uri, publish=False)
        folder.checkpoints = local / "checkpoints"
    if config.output.checkpoint_dir:
        folder.checkpoints = (
            Path(local_mount(config.output.checkpoint_dir)) / config.output.model_name / config.output.run_id
        )
    return folder


def local_mount(uri: str) -> str:
    """Vertex AI mounts buckets at /gcs/BUCKET (Cloud Storage FUSE); TensorFlow writes through it."""
    if storage.is_gcs(uri):
        mounted = Path("/gcs") / uri[len("gs://") :]
        if not Path("/gcs").is_dir():
            raise RunError(f"checkpoint dir {uri} needs the /gcs mount of Vertex AI; use a local path here")
        return str(mounted)
    return uri


# ---------------------------------------------------------------------- training


def fit(
    model, datasets, config: Config, folder: RunFolder, tracker, strategy, watch: PreemptionWatch
) -> tuple[int, int]:
    """Train with class weights; return the (epoch, step) training started from, 0-based ((0, 0) unless resumed).

    Backups (`Backup`) every --checkpoint-every steps (default: every 5 minutes; several workers: every
    epoch), at every epoch's end and at once on SIGTERM; a rerun with the same run id restores the
    latest and continues at the next step with the very batches it would have seen (`train_from`).

    With a frozen backbone and no augmentation (or --cache-features on), the backbone's features are
    computed once and only the head trains; the head shares the full model's layer objects, so the
    full model ends up trained and is what gets exported.
    """
    several_workers = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    backup_dir = str(folder.checkpoints / "backup")
    steps = datasets.steps_per_epoch["train"]
    epoch, step = resume_position(backup_dir, steps)
    if epoch >= config.train.epochs:
        log.info("training had finished before this run was interrupted: its final weights are restored")
    elif (epoch, step) != (0, 0):
        log.info(
            "resuming from the backup at epoch %d step %d (of %d epochs × %d steps)",
            epoch + 1,
            step + 1,
            config.train.epochs,
            steps,
        )
    # A terminal gets Keras' progress bar; a log (Vertex AI, CI, a file) one plain line per epoch plus
    # a progress line every --progress-every seconds (a bar's carriage returns garble logs).
    # Backup last: its final save comes after EarlyStopping restored the best weights; a NaN step is never saved.
    seconds = 0.0 if several_workers or config.train.checkpoint_every else BACKUP_SECONDS
    verbose, callbacks = fit_callbacks(
        progress_seconds=config.train.progress_seconds,
        history_csv=folder.path("history.csv"),
        loggers=tracker.callbacks(),
        patience=config.train.patience,
        tensorboard_dir=local_mount(config.output.tensorboard_dir) if config.output.tensorboard_dir else None,
        backup=Backup(backup_dir, config.train.checkpoint_every, seconds, watch=None if several_workers else watch),
    )
    trainee, train_data, val_data = model, datasets.train_from(epoch, step, config.train.epochs), datasets.val
    if config.caches_features:
        with strategy.scope():
            trainee = feature_cache.head_model(model)
            compile_model(trainee, config.train.learning_rate, jit=config.train.jit)
        cached = feature_cache.cache_datasets(model, datasets, config, epoch, step)
        train_data, val_data = cached.train, cached.val
        log.info("training the head on cached backbone features (%d view(s))", cached.views)
    # SIGTERM inside fit: finish the step, save, then stop (several workers: at once; their save is collective).
    with watch.deferred() if not several_workers else contextlib.nullcontext():
        trainee.fit(
            train_data,
            validation_data=val_data,
            steps_per_epoch=steps,
            epochs=config.train.epochs,
            class_weight=datasets.class_weights,
            callbacks=callbacks,
            verbose=verbose,
        )
    return epoch, step


def read_history(path: Path) -> dict[str, list[float]]:
    """Per-epoch metrics from CSVLogger, across resumed runs (later rows win for a repeated epoch)."""
    if not path.exists():
        return {}
    import csv

    rows: dict[int, dict[str, str]] = {}
    with path.open() as handle:
        for row in csv.DictReader(handle):
            if row.get("epoch", "").isdigit():
                rows[int(row["epoch"])] = row
    keys = [k for k in next(iter(rows.values()), {}) if k != "epoch"]
    return {k: [float(rows[e][k]) for e in sorted(rows)] for k in keys}


# ---------------------------------------------------------------------- evaluation


def run_compression(
    config: Config, model, datasets, folder: RunFolder, strategy, tracker, variants
) -> dict[str, variant_eval.VariantResult]:
    """Pruned, student and TFLite variants, each evaluated; none when no compression flag is set (chief only)."""
    c = config.compression
    if not (c.prune or c.distill or c.quantize):
        return {}
    from utilities import compression

    reference = variants.get("model")  # float model's predictions (chief only), for top-1 agreement
    return compression.run_variants(config, model, datasets, folder, strategy, tracker, reference=reference)


# ---------------------------------------------------------------------- outputs


def publish(config: Config, folder: RunFolder, metrics, lineage, history, tracker) -> None:
    _write_json(folder.path("metrics.json"), metrics)
    summary = {
        **lineage,
        "data_tag": lineage["data"]["tag"],
        "manifest_sha256": lineage["data"]["manifest_sha256"],
        "git_commit": lineage["code"]["git_commit"],
        "start_time": lineage["started"],
        "end_time": lineage.get("finished"),
    }
    report = evaluation.write_report(folder.local, metrics, summary, history)
    headline = metrics["variants"]["model"]["val"]["balanced_accuracy"]
    tracker.log_summary(
        {
            "val/balanced_accuracy": headline,
            "test/balanced_accuracy": metrics["variants"]["model"]["test"]["balanced_accuracy"],
        }
    )
    tracker.log_table("variants", evaluation.comparison_rows(metrics))
    tracker.log_images({p.stem: p for p in folder.local.glob("*.png")})
    tracker.log_model(
        folder.path("model"), config.output.model_name, config.data.data_tag, lineage["data"]["manifest_sha256"]
    )
    report_hypertune(config, headline)
    # After evaluation, so that the model's measured size is the .keras file alone.
    if config.output.saved_model or config.output.model_dir:
        export_saved_model(folder.path("model"))
    if config.output.model_dir:  # Vertex AI's model registry serves SavedModels
        storage.upload_tree(folder.path("model"), config.output.model_dir)
    # run.json is the completion marker: written (and uploaded) after everything else.
    _write_json(folder.path("run.json"), lineage)
    if storage.is_gcs(folder.uri):
        files = [
            p for p in folder.local.rglob("*") if p.is_file() and p.name != "run.json" and "checkpoints" not in p.parts
        ]
        for path in files:
            storage.upload_file(path, storage.join(folder.uri, path.relative_to(folder.local).as_posix()))
        storage.upload_file(folder.path("run.json"), storage.join(folder.uri, "run.json"))
    point_latest_at(config, lineage)
    log.info("model, metrics and report: %s (report: %s)", folder.uri, report.name)


def export_saved_model(model_folder: Path) -> None:
    """A TF SavedModel in `model_folder`, beside model.keras, as the original exported its model.

    It loads where only TensorFlow is installed: `tf.saved_model.load(path).signatures["serving_default"]`
    (inputs `image`, `metadata`), and `tf_keras.models.load_model(path)` revives it as a Keras model
    (the fusion layer comes back as a revived layer, as in the original). ~1 min for DenseNet121 on a CPU:
    Keras traces every layer; `--no-saved-model` skips it where only the .keras file is needed.
    """
    from utilities.model import load_model

    load_model(model_folder).save(str(model_folder), include_optimizer=False, save_format="tf")


def point_latest_at(config: Config, lineage: dict[str, Any]) -> None:
    """`{output}/{model_name}/latest.json` names the latest complete run (one object write: atomic).

    Written after run.json; a run that finished earlier than the one already named leaves it alone.
    """
    uri = storage.join(config.output.output, config.output.model_name, "latest.json")
    pointer = {
        "run_id": config.output.run_id,
        "uri": config.output.run_uri,
        "model": storage.join(config.output.run_uri, "model"),
        "run_json": storage.join(config.output.run_uri, "run.json"),
        "finished": lineage.get("finished"),
        "data_tag": lineage["data"]["tag"],
        "manifest_sha256": lineage["data"]["manifest_sha256"],
    }
    try:
        current = json.loads(storage.read_bytes(uri)) if storage.exists(uri) else {}
    except (storage.StorageError, ValueError):
        current = {}  # unreadable pointer: replace it
    if str(current.get("finished") or "") > str(pointer["finished"] or ""):
        log.info("latest.json keeps run %s, which finished after this one", current.get("run_id"))
        return
    storage.write_bytes(uri, json.dumps(pointer, indent=2, sort_keys=True).encode())


def report_hypertune(config: Config, balanced_accuracy: float) -> None:
    if not config.output.hp_metric_file:
        return
    import hypertune

    hypertune.HyperTune().report_hyperparameter_tuning_metric(
        hyperparameter_metric_tag="balanced_accuracy", metric_value=balanced_accuracy, global_step=config.train.epochs
    )


# ---------------------------------------------------------------------- lineage


def build_lineage(config: Config, manifest, strategy, started: str) -> dict[str, Any]:
    return {
        "run_id": config.output.run_id,
        "model_name": config.output.model_name,
        "uri": config.output.run_uri,
        "started": started,
        "config": config.to_dict(),
        "data": {
            "tag": config.data.data_tag,
            "manifest": config.data.manifest,
            "manifest_sha256": manifest.digest,  # of the bytes parsed: a gs:// manifest is read once
            "shard_sha256": dict(manifest.sha256 or {}),
            "counts": manifest.counts,
        },
        # The checkout's HEAD; in a container (no .git) the commit the image was built from.
        "code": {"git_commit": git_commit() or config.cluster.code_commit},
        "packages": package_versions(),
        "devices": distribution.device_summary(strategy),
    }


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _write_json(path: Path, content: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(content, indent=2, sort_keys=True, default=str))
    tmp.replace(path)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _trainable(model) -> int:
    return int(sum(tf.size(w).numpy() for w in model.trainable_weights))


def _rounded(weights: dict[int, float]) -> dict[int, float]:
    return {k: round(v, 3) for k, v in weights.items()}


__all__ = ["Preempted", "RunError", "run"]
