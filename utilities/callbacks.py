"""Keras callbacks shared by every `fit` of the job: the main model, the pruning fine-tune, the Distiller.

probe = ResumeProbe()
model.fit(..., callbacks=[BackupAndRestore(dir), probe, NanGuard("pruning"), ...])
probe.start_epoch   # the epoch fit started from (after BackupAndRestore restored its state)
"""

from __future__ import annotations

import math

import tf_keras


class NanLossError(RuntimeError):
    """The loss became NaN or infinite; the message names what was training, the epoch and the step."""


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
