"""Keras callbacks shared by every `fit` of the job: the main model, the pruning fine-tune, the Distiller;
and the SIGTERM watch that turns a preemption into a saved backup and a clean exit.

probe = ResumeProbe()
verbose, callbacks = fit_callbacks("distillation", restore_dir=ckpt, hooks=[probe], loggers=[EpochLogger(tracker, "student")])
model.fit(..., callbacks=callbacks, verbose=verbose)
probe.start_epoch   # the epoch fit started from (after BackupAndRestore restored its state)

with PreemptionWatch() as watch:                      # SIGTERM → Preempted (BaseException)
    with watch.deferred():                            # inside fit: at the end of the current step,
        model.fit(..., callbacks=[..., Backup(dir, watch=watch)])   # after Backup has saved it
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import tensorflow as tf
import tf_keras

from utilities.data.schema import HEADLINE
from utilities.errors import RunFailure
from utilities.progress import Progress
from utilities.run.recipe import current_rate

log = logging.getLogger(__name__)
BACKUP_SECONDS = 300.0  # default interval between backups on one machine: at most ~5 minutes of work at risk


class NanLossError(RunFailure, RuntimeError):
    """The loss became NaN or infinite; the message names what was training, the epoch and the step."""


class Preempted(BaseException):  # like KeyboardInterrupt: no `except Exception` may swallow it
    """SIGTERM arrived (Vertex AI, spot VMs: ~30 s before the kill); what could be saved is saved."""


class LearningRateLog(tf_keras.callbacks.Callback):
    """`lr` in each epoch's logs (history.csv, W&B, the curves): the rate the next step applies."""

    def on_epoch_end(self, epoch, logs=None):
        optimizer = getattr(self.model, "optimizer", None)
        if logs is not None and optimizer is not None:
            logs["lr"] = current_rate(optimizer)


class EpochCSVLogger(tf_keras.callbacks.CSVLogger):
    """history.csv with epochs numbered from 1, as the log lines, the report and its figure count them."""

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        super().on_epoch_end(epoch + 1, logs)


class NanGuard(tf_keras.callbacks.Callback):
    """Stops training at the first non-finite loss, naming epoch and step (TerminateOnNaN names neither)."""

    def __init__(self, what: str = "training") -> None:
        super().__init__()
        self.what = what
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise NanLossError(
                f"{self.what} loss became {loss} at epoch {self.epoch + 1}, step {batch + 1}; lower --learning-rate"
            )


class ResumeProbe(tf_keras.callbacks.Callback):
    """Records the epoch `fit` starts from (after BackupAndRestore has restored its state)."""

    start_epoch: int | None = None

    def on_epoch_begin(self, epoch, logs=None):
        if self.start_epoch is None:
            self.start_epoch = epoch


class EpochLogger(tf_keras.callbacks.Callback):
    """Keras logs of each epoch → one tracker row `{prefix}/epoch`, `{prefix}/train/loss`, …"""

    def __init__(self, tracker, prefix: str) -> None:
        super().__init__()
        self.tracker, self.prefix = tracker, prefix

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.tracker.log(epoch_row(self.prefix, epoch, logs or {}))


def epoch_row(prefix: str, epoch: int, logs: Mapping[str, Any]) -> dict[str, float]:
    """`loss`/`val_loss`-style keys → `{prefix}/train/loss`, `{prefix}/val/loss`, plus `{prefix}/epoch`.

    No explicit W&B step: the main fit already advanced it, and rows with a smaller step are
    dropped; `{prefix}/epoch` is the x-axis (as WandbMetricsLogger does with `epoch/epoch`).
    """
    row = {f"{prefix}/epoch": epoch}
    for key, value in logs.items():
        split, metric = ("val", key[4:]) if key.startswith("val_") else ("train", key)
        row[f"{prefix}/{split}/{metric}"] = float(value)
    return row


class ProgressLog(tf_keras.callbacks.Callback):
    """A `Progress` line every `seconds` (0: every step) inside each epoch: step, loss, rate and ETA.

    Keras' verbose=2 prints once per epoch; at ISIC scale an epoch is minutes to hours of silence.
    For logs; a terminal gets Keras' own bar (verbose=1) instead.
    """

    def __init__(self, seconds: float = 30.0, what: str = "training") -> None:
        super().__init__()
        self.seconds, self.what = seconds, what
        self.epoch, self.progress = 0, None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch, self.progress = epoch, None

    def on_train_batch_end(self, batch, logs=None):
        if self.progress is None:  # a resumed epoch starts past step 0
            what = f"{self.what} epoch {self.epoch + 1}/{self.params.get('epochs')}"
            self.progress = Progress(self.params.get("steps"), what, "step", self.seconds, initial=batch, bar=False)
        loss = (logs or {}).get("loss")
        self.progress.advance(**({} if loss is None else {"loss": float(loss)}))


def progress_display(seconds: float = 30.0, what: str = "training") -> tuple[int, list[tf_keras.callbacks.Callback]]:
    """(fit's `verbose`, extra callbacks): a terminal gets Keras' bar; a log one line per epoch (verbose=2)
    plus a `ProgressLog` line every `seconds` inside it."""
    if sys.stdout.isatty():
        return 1, []
    return 2, [ProgressLog(seconds, what)]


def fit_callbacks(
    what: str = "training",
    *,
    progress_seconds: float = 30.0,
    restore_dir: str | Path | None = None,
    hooks: Sequence[tf_keras.callbacks.Callback] = (),
    history_csv: str | Path | None = None,
    loggers: Sequence[tf_keras.callbacks.Callback] = (),
    patience: int = 0,
    patience_from: int = 0,
    tensorboard_dir: str | None = None,
    backup: tf_keras.callbacks.Callback | None = None,
) -> tuple[int, list[tf_keras.callbacks.Callback]]:
    """(fit's `verbose`, callbacks) for one `fit`, in the order they must run:

    a `BackupAndRestore` on `restore_dir` first, so that `hooks` see the restored state at train begin
    (tfmot's `UpdatePruningStep` reads the restored pruning step, a `ResumeProbe` the restored epoch);
    `NanGuard(what)`; `LearningRateLog`; a `CSVLogger` appending to `history_csv`; `loggers` (the tracker's callbacks, an
    `EpochLogger`); `EarlyStopping` on val balanced accuracy when `patience` > 0, from epoch `patience_from`
    (0-based; earlier epochs neither count nor are kept) (best weights restored at
    the end); `TensorBoard` when a dir is given; the progress display; `backup` last, so that its final
    save comes after EarlyStopping restored the best weights and a NaN step is never saved.
    """
    callbacks: list[tf_keras.callbacks.Callback] = []
    if restore_dir is not None:
        callbacks.append(tf_keras.callbacks.BackupAndRestore(str(restore_dir)))  # a rerun resumes
    callbacks += [*hooks, NanGuard(what), LearningRateLog()]
    if history_csv is not None:
        callbacks.append(EpochCSVLogger(str(history_csv), append=True))
    callbacks += loggers
    if patience > 0:
        callbacks.append(
            tf_keras.callbacks.EarlyStopping(
                monitor=f"val_{HEADLINE}",
                mode="max",
                patience=patience,
                restore_best_weights=True,
                start_from_epoch=patience_from,
            )
        )
    if tensorboard_dir:
        callbacks.append(tf_keras.callbacks.TensorBoard(tensorboard_dir))
    verbose, progress = progress_display(progress_seconds, what)
    callbacks += progress
    if backup is not None:
        callbacks.append(backup)
    return verbose, callbacks


class PreemptionWatch:
    """SIGTERM → `Preempted`: at once, or (inside `deferred()`) once the current step is done and saved.

    Installed only in the main thread (signal handlers live there); elsewhere SIGTERM keeps its default.
    """

    def __init__(self) -> None:
        self.signalled = False
        self._defer = False
        self._previous = None

    def __enter__(self) -> PreemptionWatch:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        self.signalled = True
        log.warning("SIGTERM received: %s", "saving a backup after this step" if self._defer else "stopping")
        if not self._defer:
            raise Preempted("SIGTERM")

    def check(self) -> None:
        """Raise `Preempted` if SIGTERM came and its exception was swallowed on the way (TensorFlow's TFLite
        converter can eat it while it traces): called between the run's phases, so a preempted run never
        publishes as complete."""
        if self.signalled:
            raise Preempted("SIGTERM")

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._defer = True
        try:
            yield
        finally:
            self._defer = False
        if self.signalled:  # arrived after the last step's check
            raise Preempted("SIGTERM")


class Backup(tf_keras.callbacks.BackupAndRestore):
    """BackupAndRestore that saves mid-epoch: every `every_steps` steps (0: off), every `every_seconds`
    (0: off), at the last step of each epoch, and at once when `watch` saw SIGTERM (then raises Preempted).

    Keras resumes a mid-epoch backup at the next step (`resume_position`); the data pipeline must then
    start at that very batch (`Datasets.train_from`). On success the final state is saved as "last step
    of the last epoch done" (after EarlyStopping restored its best weights, when this callback comes
    last), so a rerun of a run that trained to the end restores those weights and trains no further step.
    With several workers the save is collective: `every_seconds` must be 0 (steps agree, clocks do not).
    """

    def __init__(
        self, backup_dir: str, every_steps: int = 0, every_seconds: float = 0.0, watch: PreemptionWatch | None = None
    ) -> None:
        super().__init__(backup_dir, save_freq=1, delete_checkpoint=False)
        self.every_steps, self.every_seconds, self.watch = every_steps, every_seconds, watch

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._since, self._clock = 0, time.monotonic()

    def on_train_batch_end(self, batch, logs=None):
        self._since += 1
        preempted = self.watch is not None and self.watch.signalled
        if (
            preempted
            or batch == (self.params.get("steps") or 0) - 1
            or (self.every_steps and self._since >= self.every_steps)
            or (self.every_seconds and time.monotonic() - self._clock >= self.every_seconds)
        ):
            self._backup(epoch=self._current_epoch, batch=batch)
            self._since, self._clock = 0, time.monotonic()
        if preempted:
            raise Preempted(f"backup saved at epoch {self._current_epoch + 1} step {batch + 1}")

    def on_train_end(self, logs=None):
        # "The last step of the last epoch is done": Keras resumes that at epoch `epochs`, i.e. not at all.
        last_epoch, last_step = self.params["epochs"] - 1, (self.params.get("steps") or 1) - 1
        self._training_state._ckpt_saved_epoch.assign(last_epoch)
        self._training_state._ckpt_saved_batch.assign(last_step)
        self._backup(epoch=last_epoch, batch=last_step)
        super().on_train_end(logs)  # delete_checkpoint=False: forgets the state, keeps the files


def resume_position(backup_dir: str, steps_per_epoch: int) -> tuple[int, int]:
    """(epoch, step) where `fit` with a `Backup` on `backup_dir` will start: Keras' own rule for
    step-level backups (tf_keras `WorkerTrainingState.maybe_load_initial_counters_from_ckpt`)."""
    latest = tf.train.latest_checkpoint(f"{backup_dir}/chief")
    if latest is None:
        return 0, 0
    reader = tf.train.load_checkpoint(latest)
    epoch = int(reader.get_tensor("ckpt_saved_epoch/.ATTRIBUTES/VARIABLE_VALUE"))
    batch = int(reader.get_tensor("ckpt_saved_batch/.ATTRIBUTES/VARIABLE_VALUE"))
    if batch < 0:
        return 0, 0  # never saved mid-training (an epoch-level backup of an older version): Keras starts over
    return (epoch + 1, 0) if batch == steps_per_epoch - 1 else (epoch, batch + 1)
