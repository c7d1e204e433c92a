"""One training run, start to finish: `training.run(config)` owns every side effect.

    python -c "import cli; cli.main(['--manifest', 'Versioning/versioned_paths.pickle', '--weights', 'none'])"
    python training.py -b 32 -p True      # the original's command line: runs cli.py's main, same flags and exit codes

Reads like the run: devices → manifest → run folder (leased) → data → tracking → model → fit (resuming from the
backup when the run id was used before) → evaluate → compression variants → outputs, with
`run.json` written last so a run folder that has it is complete.
"""

from __future__ import annotations

if __name__ == "__main__":  # `python training.py …`, the original's entry point: exactly `python cli.py …`,
    # which is run as the script it is (no import: this module is what cli.py imports).
    import runpy
    from pathlib import Path

    runpy.run_path(str(Path(__file__).with_name("cli.py")), run_name="__main__")

import contextlib
import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tensorflow as tf
import tf_keras

from utilities import serving, storage
from utilities.data import feature_cache, records
from utilities.data import pipeline as data
from utilities.errors import one_line
from utilities.evaluation import comparison, gate, model_card, report
from utilities.evaluation import variants as variant_eval
from utilities.evaluation.calibration import calibrate
from utilities.evaluation.predictions import write_predictions
from utilities.evaluation.results import HEADLINE, RunMetrics, VariantMetrics
from utilities.evaluation.variants import VariantResult, most_confident_mistakes
from utilities.model import (
    build_model,
    compile_model,
    fusion_weights,
    load_model,
    save_model,
    save_recalibrated,
    tta_model,
)
from utilities.run import distribution, recipe, tracking
from utilities.run.callbacks import (
    BACKUP_SECONDS,
    Backup,
    Preempted,
    PreemptionWatch,
    fit_callbacks,
    resume_position,
)
from utilities.run.config import Config
from utilities.run.folder import (
    RunError,
    RunFolder,
    RunRecord,
    TrainingRecord,
    local_mount,
    now,
    open_run_folder,
    point_latest_at,
    publish_files,
    read_history,
    remove_checkpoints,
    write_json,
)

log = logging.getLogger(__name__)
TTA_VARIANT = "model_tta"  # --tta: the model averaged over dihedral views


@dataclass
class RunResult:
    """What `run` returns: where the run went, its record (run.json) and every evaluated variant."""

    uri: str
    local_dir: Path
    record: RunRecord
    variants: dict[str, VariantResult] = field(default_factory=dict)

    @property
    def metrics(self) -> RunMetrics:
        """metrics.json's content."""
        return RunMetrics({name: v.metrics for name, v in self.variants.items()})


@dataclass(frozen=True)
class RunContext:
    """What every phase of one run works with, typed: one argument instead of seven."""

    config: Config
    cluster: distribution.Cluster
    strategy: tf.distribute.Strategy
    watch: PreemptionWatch
    folder: RunFolder
    datasets: data.Datasets
    tracker: tracking.Tracker
    record: RunRecord


def run(config: Config) -> RunResult:
    """The whole run; SIGTERM raises `Preempted` (inside training: after saving a backup of the step)."""
    with PreemptionWatch() as watch:
        return _run(config, watch)


def _run(config: Config, watch: PreemptionWatch) -> RunResult:
    started = now()
    cluster = distribution.parse_cluster(config.cluster.tf_config)
    manifest = data.load_manifest(config.data.manifest)  # refused before devices and any folder: nothing left
    strategy = set_up_devices(config, several_workers=cluster.num_workers > 1)
    if config.compression.enabled:  # a refused --teacher too, in seconds (not after the shards are fetched)
        compression_module().check_inputs(config)
    # Leased until the end: the same --run-id started twice is refused; a run refused before writing leaves nothing.
    with open_run_folder(config, is_chief=cluster.is_chief) as folder:
        log.info("run %s → %s", config.output.run_id, folder.uri)
        datasets = load_data(config, manifest)
        record = RunRecord.start(config, manifest, distribution.device_summary(strategy), started)
        tracker = tracking.start_tracking(
            config.tracking,
            run_name=config.output.model_name,
            run_id=config.output.run_id,
            config_dict={"config": record.config, "data": dataclasses.asdict(record.data)},
            is_chief=cluster.is_chief,
            local_dir=folder.local,  # W&B's files (without WANDB_DIR): beside the run's, never in the cwd
        )
        result = RunResult(uri=folder.uri, local_dir=folder.local, record=record)
        ctx = RunContext(config, cluster, strategy, watch, folder, datasets, tracker, record)
        try:
            model = train(ctx)
            if cluster.is_chief:
                result.variants = evaluate_variants(ctx, model)
                for line in comparison.collapse_warnings(result.metrics):
                    log.warning(line)
            watch.check()  # a SIGTERM that a library swallowed still stops the run before it publishes
            record.finished = now()
            if folder.publish:
                publish(ctx, result)
            tracker.finish(0)
        except BaseException:
            tracker.finish(1)
            raise
        finally:
            if not folder.publish:  # a non-chief worker's copy of the outputs
                shutil.rmtree(folder.local, ignore_errors=True)
        distribution.wait_for_workers(strategy)  # other workers exit only once the chief has published
    return result


def set_up_devices(config: Config, several_workers: bool) -> tf.distribute.Strategy:
    distribution.configure_devices(config.train.gpus, multi_worker=several_workers, jit=config.train.jit)
    strategy = distribution.build_strategy(config.train.gpus, config.cluster.tf_config)
    if config.train.mixed_precision:
        tf_keras.mixed_precision.set_global_policy("mixed_float16")
    tf_keras.utils.set_random_seed(config.train.seed)
    return strategy


def load_data(config: Config, manifest) -> data.Datasets:
    """The datasets `manifest` names (shards fetched and verified); compression inputs checked."""
    shards = data.fetch_shards(manifest, config.data.cache_dir)
    datasets = data.build_datasets(
        shards,
        image_size=config.data.image_size,
        global_batch_size=config.train.batch_size,
        seed=config.train.seed,
        augment=config.data.augment,
        shuffle_buffer=config.data.shuffle_buffer,
        shuffle_memory_mb=config.data.shuffle_memory,
        augmentation=data.Augmentation(
            colour=config.data.colour_jitter,
            cutout=config.data.cutout,
            metadata_dropout=config.data.metadata_dropout,
        ),
    )
    log.info("examples per split %s; class weights %s", datasets.counts, _rounded(datasets.class_weights))
    if config.compression.enabled:  # the teacher was checked before the run folder was opened
        compression_module().check_inputs(config, train_examples=datasets.counts["train"], load_teacher_model=False)
    return datasets


def compression_module():
    """utilities.compression, imported only when compressing (it imports tensorflow-model-optimization)."""
    from utilities import compression

    return compression


def train(ctx: RunContext) -> tf_keras.Model:
    """Build, fit (resuming from the backup) and save the model into `model/`; fills `record.training`."""
    config, datasets, folder, record = ctx.config, ctx.datasets, ctx.folder, ctx.record
    strategy = ctx.strategy
    steps = datasets.steps_per_epoch["train"]
    momentum = recipe.batchnorm_momentum(config.model.bn_momentum, steps)
    with strategy.scope():
        model = build_model(dataclasses.replace(config.model, bn_momentum=momentum), config.data.image_size)
        compile_recipe(model, config, steps)
    log.info("model: %s parameters (%s trainable)", f"{model.count_params():,}", f"{_trainable(model):,}")
    if warning := lagging_batchnorm(config, steps):
        log.warning(warning)
    elif config.model.fine_tune and not config.model.bn_momentum:
        log.info("BatchNorm momentum %g (%d steps an epoch renew 3/4 of the statistics)", momentum, steps)
    epoch, step = fit(ctx, model)
    history = read_history(folder.path("history.csv"))
    weights = f"moving average (--ema {config.train.ema:g})" if config.train.ema else "as trained"
    record.training = TrainingRecord(epoch, step, epochs_run=len(history.get("loss", [])), weights=weights)
    record.fusion_weights = fusion_weights(model)
    # Every worker saves (saving reads synced variables: collective ops); a non-chief copy is discarded.
    # The chief re-estimates a fine-tuned backbone's BatchNorm statistics first (see save_recalibrated):
    # after a short fine-tune the moving averages lag the weights and inference-mode outputs collapse.
    if folder.publish and config.model.fine_tune:
        used = save_recalibrated(model, folder.path("model"), datasets.train_clean or datasets.train)
        record.training.batchnorm_batches = used
        log.info("BatchNorm statistics re-estimated on %d training batches (no augmentation)", used)
    else:
        save_model(model, folder.path("model"))
    return model


def compile_recipe(model: tf_keras.Model, config: Config, steps_per_epoch: int) -> None:
    """Compile `model` with the run's recipe: its schedule over the run's steps, loss and clipping."""
    train = config.train
    rate = recipe.learning_rate(train, steps_per_epoch)
    compile_model(model, rate, jit=train.jit, loss=recipe.loss(train), clip_norm=train.clip_norm)


def lagging_batchnorm(config: Config, steps_per_epoch: int) -> str | None:
    """A warning when a fine-tuned backbone's BatchNorm statistics, at a --bn-momentum given, cannot follow its
    weights within an epoch: with momentum m, m ** steps of the moving statistics at an epoch's end predate it.
    Above half, validation during training (the curves, early stopping's choice of epoch) reads lagging
    statistics; the saved model's are re-estimated either way. 0 (the default) chooses a momentum that fits
    (`recipe.batchnorm_momentum`)."""
    momentum = config.model.bn_momentum
    if not config.model.fine_tune or not momentum or momentum**steps_per_epoch <= 0.5:
        return None
    stopping = "early stopping, " if config.train.patience else ""
    return (
        f"BatchNorm momentum {momentum:g} over {steps_per_epoch} steps an epoch: {momentum**steps_per_epoch:.0%} of "
        f"the moving statistics at an epoch's end predate it, so validation during training ({stopping}the curves) "
        f"reads lagging statistics; --bn-momentum {recipe.batchnorm_momentum(0, steps_per_epoch):g} or lower (or 0, "
        "chosen from the steps) suits this run (the saved model's statistics are re-estimated either way)"
    )


def evaluate_variants(ctx: RunContext, model: tf_keras.Model) -> dict[str, VariantResult]:
    """The trained model and every compressed variant, evaluated (chief only)."""
    config, datasets, folder, cluster = ctx.config, ctx.datasets, ctx.folder, ctx.cluster
    # Multi-worker: each read of BatchNorm's moving statistics (ON_READ variables) in `model(x)` is
    # an all-reduce across workers; the saved copy, loaded outside the strategy, needs no peer.
    evaluated = model if cluster.num_workers == 1 else load_model(folder.path("model"))
    resamples = config.evaluation.bootstrap
    reference = variant_eval.evaluate_keras(evaluated, datasets, folder.path("model"), resamples=resamples)
    blind = variant_eval.image_only(variant_eval.keras_predict_fn(evaluated), datasets, resamples)
    reference.metrics = reference.metrics.with_values(image_only=blind)
    log.info("val balanced accuracy %.3f", reference.metrics.val.balanced_accuracy)
    if not config.compression.enabled:
        if config.evaluation.calibrate:
            calibrate(evaluated, reference, folder.path("model"), datasets.identities, resamples)
        return {"model": reference, **tta_variant(ctx, evaluated, reference)}
    compression = compression_module()
    # Several workers: the chief compresses alone, on that reloaded copy under the default
    # strategy (no collective needs a peer), while the others wait at the end barrier.
    compress_strategy = ctx.strategy if cluster.num_workers == 1 else tf.distribute.get_strategy()
    variants = compression.run_variants(config, evaluated, datasets, folder, compress_strategy, ctx.tracker, reference)
    return {"model": reference, **variants, **tta_variant(ctx, evaluated, reference)}


def tta_variant(ctx: RunContext, model: tf_keras.Model, reference: VariantResult) -> dict[str, VariantResult]:
    """--tta N: `model_tta`, the (calibrated) model averaged over N dihedral views, saved and scored like any
    variant; {} when off."""
    views = ctx.config.evaluation.tta
    if not views:
        return {}
    averaged = tta_model(model, views)
    path = ctx.folder.path(TTA_VARIANT)
    save_model(averaged, path)
    result = variant_eval.evaluate_keras(averaged, ctx.datasets, path, reference, ctx.config.evaluation.bootstrap)
    log.info("%s (%d views): val balanced accuracy %.3f", TTA_VARIANT, views, result.metrics.val.balanced_accuracy)
    return {TTA_VARIANT: result}


# ---------------------------------------------------------------------- training


def fit(ctx: RunContext, model: tf_keras.Model) -> tuple[int, int]:
    """Train with class weights; return the (epoch, step) training started from, 0-based ((0, 0) unless resumed).

    Backups (`Backup`) every --checkpoint-every steps (default: every 5 minutes; several workers: every
    epoch), at every epoch's end and at once on SIGTERM; a rerun with the same run id restores the
    latest and continues at the next step with the very batches it would have seen (`train_from`).

    With a frozen backbone and no augmentation (or --cache-features on), the backbone's features are
    computed once and only the head trains; the head shares the full model's layer objects, so the
    full model ends up trained and is what gets exported.
    """
    config, datasets, folder, strategy, watch = ctx.config, ctx.datasets, ctx.folder, ctx.strategy, ctx.watch
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
    clean = datasets.train_clean or datasets.train
    verbose, callbacks = fit_callbacks(
        progress_seconds=config.train.progress_seconds,
        # Several workers: no re-estimation before validation (its cross-replica reads would be collectives)
        hooks=recipe.callbacks(config.train, None if several_workers or not config.model.fine_tune else clean),
        history_csv=folder.path("history.csv"),
        loggers=ctx.tracker.callbacks(),
        patience=config.train.patience,
        patience_from=recipe.patience_start(config.train),
        tensorboard_dir=local_mount(config.output.tensorboard_dir) if config.output.tensorboard_dir else None,
        backup=Backup(backup_dir, config.train.checkpoint_every, seconds, watch=None if several_workers else watch),
    )
    trainee, train_data, val_data = model, datasets.train_from(epoch, step, config.train.epochs), datasets.val
    if config.caches_features:
        with strategy.scope():
            trainee = feature_cache.head_model(model)
            compile_recipe(trainee, config, steps)
        cached = feature_cache.cache_datasets(model, datasets, config, epoch, step)
        train_data, val_data = cached.train, cached.val
        log.info("training the head on cached backbone features (%d view(s))", cached.views)
    # SIGTERM inside fit: finish the step, save, then stop (several workers: at once; their save is collective).
    with watch.deferred() if not several_workers else contextlib.nullcontext():
        try:
            trainee.fit(
                train_data,
                validation_data=val_data,
                steps_per_epoch=steps,
                epochs=config.train.epochs,
                class_weight=datasets.class_weights,
                callbacks=callbacks,
                verbose=verbose,
            )
        except tf.errors.InvalidArgumentError as err:  # a shard changed after build_datasets checked it
            if (bad := records.unchecked_record(err)) is None:
                raise
            raise bad from None
    return epoch, step


# ---------------------------------------------------------------------- outputs


def publish(ctx: RunContext, result: RunResult) -> None:
    """metrics.json, per-image predictions, the report, W&B summary and model, the SavedModel export; the
    release gate and the model card; then run.json and latest.json (if the gate passed); then the training
    backups go (unless --keep-checkpoints)."""
    config, folder, tracker, datasets = ctx.config, ctx.folder, ctx.tracker, ctx.datasets
    metrics, record = result.metrics, result.record
    folder.check_lease()  # a run whose folder another process took over publishes nothing
    write_json(folder.path("metrics.json"), metrics.to_json())
    write_predictions(folder.path("predictions"), result.variants, datasets.identities)
    names = datasets.identities["test"].names
    gallery = most_confident_mistakes(datasets.test, result.variants["model"], names, config.evaluation.gallery)
    history = read_history(folder.path("history.csv"))
    written = report.write_report(folder.local, metrics, record, history, gallery=gallery)
    model = metrics.variants["model"]
    tracker.log_summary(summary_values(model))
    tracker.log_table("variants", comparison.comparison_rows(metrics))
    tracker.log_images({p.stem: p for p in folder.local.glob("*.png")})
    tracker.log_model(folder.path("model"), record.model_name, record.data.tag, record.data.manifest_sha256)
    report_hypertune(config, model.val.headline())
    # After evaluation, so that the model's measured size is the .keras file alone.
    exported = None  # serving.json's content, when a SavedModel is exported
    if config.output.saved_model or config.output.model_dir:
        exported = export_saved_model(folder.path("model"), model, config)
    if config.evaluation.export_tta and TTA_VARIANT in metrics.variants:
        export_saved_model(folder.path(TTA_VARIANT), metrics.variants[TTA_VARIANT], config)
    if config.output.model_dir:  # Vertex AI's model registry serves SavedModels
        storage.upload_tree(folder.path("model"), config.output.model_dir)
    verdict = release_verdict(config, record, metrics)
    record.gate = verdict.to_json() if verdict else None
    card = model_card.model_card(record, metrics, exported)
    model_card.write_model_card(folder.local, card)
    tracker.log_summary({"model_card": card})
    # run.json is the completion marker: written (and uploaded) after everything else.
    folder.check_lease()
    write_json(folder.path("run.json"), record.to_json())
    publish_files(folder)
    if verdict is None or verdict.passed:
        point_latest_at(config, record)
    else:
        log.warning(
            "release gate failed (%s): %s; latest.json not moved", verdict.expression, "; ".join(verdict.reasons)
        )
    log.info("model, metrics and report: %s (report: %s)", folder.uri, written.name)
    if not config.output.keep_checkpoints:  # a complete run is never resumed: its backups only take space
        remove_checkpoints(folder)


def release_verdict(config: Config, record: RunRecord, metrics: RunMetrics) -> gate.Verdict | None:
    """The run judged by --gate, or by default against the run latest.json names when that run scored the
    same test data (same manifest) with an interval; None: no gate applies."""
    expression = config.evaluation.gate
    if expression == "off":
        return None
    if expression:
        return gate.parse(expression).judge(metrics)
    pointer = storage.join(config.output.output, config.output.model_name, "latest.json")
    try:
        latest = json.loads(storage.read_bytes(pointer)) if storage.exists(pointer) else None
        same_data = latest and record.data and latest.get("manifest_sha256") == record.data.manifest_sha256
        if not same_data or latest.get("run_id") == record.run_id:
            return None
        previous = RunMetrics.from_json(json.loads(storage.read_bytes(storage.join(latest["uri"], "metrics.json"))))
    except (storage.StorageError, ValueError, KeyError, TypeError) as err:
        log.warning("no release gate: the latest run's metrics cannot be read (%s)", one_line(err))
        return None
    default = gate.previous_run_gate(previous, latest["run_id"])
    return default.judge(metrics) if default else None


def summary_values(model: VariantMetrics) -> dict[str, Any]:
    """The trained model's headline numbers for the tracker's run summary: `val/balanced_accuracy`, …"""
    values: dict[str, Any] = {}
    for split, m in (("val", model.val), ("test", model.test)):
        values |= {f"{split}/balanced_accuracy": m.balanced_accuracy, f"{split}/macro_auc": m.macro_auc}
        values[f"{split}/ece"] = m.ece
        for key in ("balanced_accuracy", "macro_auc"):
            if bounds := m.interval(key):
                values |= {f"{split}/{key}_ci95_low": bounds[0], f"{split}/{key}_ci95_high": bounds[1]}
        for name, triage in (m.triage or {}).items():
            values[f"{split}/{name}_auc"] = triage.auc
    if model.calibration is not None:
        values["temperature"] = model.calibration.temperature
    return {key: value for key, value in values.items() if value is not None}


def export_saved_model(model_folder: Path, metrics: VariantMetrics, config: Config) -> dict[str, Any]:
    """A TF SavedModel in `model_folder`, beside model.keras, as the original exported its model, plus
    `serving.json` (utilities.serving).

    It loads where only TensorFlow is installed: `tf.saved_model.load(path).signatures["serving_default"]`
    (inputs `image`, `metadata`: the original's), `signatures["serving_raw"]` (the image file and the
    metadata CSV's fields in, class names and the triage flag out, at the malignant threshold of
    validation's --operating-point specificity), and `tf_keras.models.load_model(path)` revives it as a
    Keras model (the fusion layer comes back as a revived layer, as in the original). ~1 min for
    DenseNet121 on a CPU: Keras traces every layer; `--no-saved-model` skips it where only the .keras
    file is needed. Returns serving.json's content.
    """
    from tf_keras.src.saving.legacy import saving_utils  # Keras' own serving_default, as save() traces it

    specificity = config.evaluation.operating_point
    malignant = (metrics.val.triage or {}).get("malignant")
    threshold = malignant.threshold_at_specificity.get(f"{specificity:.2f}") if malignant else None
    model = load_model(model_folder)
    signatures = {
        "serving_default": saving_utils.trace_model_call(model),
        serving.RAW_SIGNATURE: serving.raw_signature(model, config.data.image_size, threshold),
    }
    model.save(str(model_folder), include_optimizer=False, save_format="tf", signatures=signatures)
    record = serving.serving_record(config.data.image_size, threshold, specificity, config.evaluation.calibrate)
    serving.write_serving_record(model_folder, record)
    log.info(
        "SavedModel: serving_default and serving_raw (malignant flag at %s, val specificity %.2f)",
        "never" if threshold is None else f"{threshold:.4f}",
        specificity,
    )
    return record


def report_hypertune(config: Config, value: float) -> None:
    """The headline metric on val, to Vertex AI's hyperparameter tuning service (--hp-metric-file)."""
    if not config.output.hp_metric_file:
        return
    import hypertune

    hypertune.HyperTune().report_hyperparameter_tuning_metric(
        hyperparameter_metric_tag=HEADLINE, metric_value=value, global_step=config.train.epochs
    )


def _trainable(model) -> int:
    return int(sum(tf.size(w).numpy() for w in model.trainable_weights))


def _rounded(weights: dict[int, float]) -> dict[int, float]:
    return {k: round(v, 3) for k, v in weights.items()}


__all__ = ["Preempted", "RunError", "RunResult", "run"]
