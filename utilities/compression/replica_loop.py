"""Distillation with an explicit per-replica step (`strategy.run`), for strategies with several replicas.

    loop = ReplicaLoop(student, teacher, DistillationLoss(T, alpha, weights), strategy, learning_rate=1e-3)
    summary = loop.fit(datasets, epochs, patience, checkpoint_dir, on_epoch_end=lambda epoch, logs: ...)

It computes the same loss as the `Distiller` (`losses.batch_loss`) and logs the same Keras-style
epoch logs; `_LoopState` checkpoints it every epoch, so a rerun resumes (`distillation.train_student`
picks this path).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf  # utilities/__init__.py (run first, as our package) selected Keras 2
import tf_keras

from utilities.compression.losses import DistillationLoss, batch_loss, epoch_metrics
from utilities.data.schema import HEADLINE
from utilities.errors import CompressionError
from utilities.progress import Progress

log = logging.getLogger(__name__)


class ReplicaLoop:
    """Distillation with an explicit per-replica step, for strategies with several replicas.

    Each replica computes its examples' losses, sums them and divides by the number of examples in
    the whole global batch (all-reduced, so a short last batch is still a mean); the optimizer sums
    the replicas' gradients. `replica_batch_sizes` records the examples each replica saw at each
    training step (test hook). Checkpoints every epoch under `checkpoint_dir`; a rerun resumes.
    """

    def __init__(
        self, student, teacher, loss_fn: DistillationLoss, strategy: tf.distribute.Strategy, learning_rate: float
    ):
        self.student, self.teacher, self.loss_fn, self.strategy = student, teacher, loss_fn, strategy
        with strategy.scope():
            self.optimizer = tf_keras.optimizers.Adam(learning_rate)
            if student.dtype_policy.name == "mixed_float16":  # as Keras' compile does for fit
                # Dynamic loss scaling: float16 gradients would underflow; a step with inf/NaN
                # gradients is skipped and the scale halved (on every replica alike).
                self.optimizer = tf_keras.mixed_precision.LossScaleOptimizer(self.optimizer)
            self.optimizer.build(student.trainable_variables)  # slots exist before a checkpoint restore
            self.metrics = {split: epoch_metrics() for split in ("train", "val")}
        self.replica_batch_sizes: list[list[int]] = []
        self._train = tf.function(self._distributed_train_step, reduce_retracing=True)
        self._eval = tf.function(self._distributed_eval_step, reduce_retracing=True)

    # ---------------------------------------------------------------- per-replica functions

    def _global_count(self, labels) -> tf.Tensor:
        """Examples in the whole global batch, summed over replicas (int32 scalar)."""
        return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, tf.shape(labels)[0])

    def _replica_train_step(self, features, labels):
        with tf.GradientTape() as tape:
            loss, probs = batch_loss(
                self.student, self.teacher, self.loss_fn, features, labels, self._global_count(labels), True
            )
        # Scaled (mixed precision) and all-reduced over replicas inside the optimizer.
        self.optimizer.minimize(loss, self.student.trainable_variables, tape=tape)
        for metric in self.metrics["train"]:
            metric.update_state(labels, probs)
        return loss, tf.shape(labels)[0]

    def _replica_eval_step(self, features, labels):
        loss, probs = batch_loss(
            self.student, self.teacher, self.loss_fn, features, labels, self._global_count(labels), False
        )
        for metric in self.metrics["val"]:
            metric.update_state(labels, probs)
        return loss

    def _distributed_train_step(self, batch):
        losses, sizes = self.strategy.run(self._replica_train_step, args=(batch[0], batch[1]))
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None), sizes

    def _distributed_eval_step(self, batch):
        losses = self.strategy.run(self._replica_eval_step, args=(batch[0], batch[1]))
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)

    # ---------------------------------------------------------------- python side

    def train_step(self, batch) -> float:
        """One global batch (a distributed-dataset element); returns its mean loss."""
        loss, sizes = self._train(batch)
        self.replica_batch_sizes.append([int(s) for s in self.strategy.experimental_local_results(sizes)])
        return float(loss)

    def run_epoch(self, train, val, epoch: int) -> dict[str, float]:
        """Train and validate once; Keras-style logs (`loss`, `accuracy`, …, `val_…`)."""
        for metric in (*self.metrics["train"], *self.metrics["val"]):
            metric.reset_state()
        progress = Progress(None, f"distillation (replica loop) epoch {epoch + 1}", "step")
        train_loss = self._mean(train, self.train_step, epoch, progress)
        progress.done()
        val_loss = self._mean(val, lambda batch: float(self._eval(batch)), epoch)
        logs = {"loss": train_loss, **{m.name: float(m.result()) for m in self.metrics["train"]}}
        logs.update({"val_loss": val_loss, **{f"val_{m.name}": float(m.result()) for m in self.metrics["val"]}})
        return logs

    @staticmethod
    def _mean(dataset, step: Callable[[Any], float], epoch: int, progress: Progress | None = None) -> float:
        """Mean of per-batch mean losses; stops the run at a non-finite loss, naming the step."""
        losses = []
        for index, batch in enumerate(dataset):
            losses.append(step(batch))
            if progress is not None:
                progress.advance(loss=losses[-1])
            if not math.isfinite(losses[-1]):
                raise CompressionError(f"distillation loss became {losses[-1]} at epoch {epoch + 1}, step {index + 1}")
        return float(np.mean(losses)) if losses else float("nan")

    def fit(self, datasets, epochs: int, patience: int, checkpoint_dir: Path, on_epoch_end: Callable) -> dict[str, Any]:
        """Epoch loop with early stopping on val balanced accuracy; restores the best weights."""
        state = _LoopState(self, Path(checkpoint_dir))
        replicas = self.strategy.num_replicas_in_sync
        # A global batch smaller than the replica count would leave a replica with no example,
        # whose BatchNorm statistics are then NaN; such a tail batch (< replicas examples) is skipped.
        train = datasets.train.filter(lambda *batch: tf.shape(batch[1])[0] >= replicas)
        train = self.strategy.experimental_distribute_dataset(train)
        val = self.strategy.experimental_distribute_dataset(datasets.val)
        start = state.restore()
        for epoch in range(start, epochs):
            logs = self.run_epoch(train, val, epoch)
            on_epoch_end(epoch, logs)
            if state.end_epoch(epoch, logs[f"val_{HEADLINE}"], patience):
                break
        state.restore_best()
        return {
            "path": "replica_loop",
            "resumed_from_epoch": start,
            "epochs_run": int(state.epoch.numpy()),
            "best_val_balanced_accuracy": float(state.best.numpy()),
        }


class _LoopState:
    """Checkpointed loop state: `last/` (student, optimizer, counters) each epoch, `best/` (student)."""

    def __init__(self, loop: ReplicaLoop, directory: Path) -> None:
        with loop.strategy.scope():
            self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False)  # epochs completed
            self.best = tf.Variable(-1.0, dtype=tf.float64, trainable=False)  # best val balanced accuracy
            self.wait = tf.Variable(0, dtype=tf.int64, trainable=False)  # epochs since the best
        last = tf.train.Checkpoint(
            student=loop.student, optimizer=loop.optimizer, epoch=self.epoch, best=self.best, wait=self.wait
        )
        self.last = tf.train.CheckpointManager(last, str(directory / "last"), max_to_keep=1)
        self.best_student = tf.train.CheckpointManager(
            tf.train.Checkpoint(student=loop.student), str(directory / "best"), max_to_keep=1
        )

    def restore(self) -> int:
        """Resume point: epochs already completed (0 for a fresh run)."""
        if self.last.latest_checkpoint:
            try:  # a different shape fails the restore, a missing object (e.g. the loss scale) the assertion
                self.last.checkpoint.restore(self.last.latest_checkpoint).assert_existing_objects_matched()
            except (AssertionError, ValueError):
                raise CompressionError(
                    f"checkpoint {self.last.latest_checkpoint} does not match this student and optimizer (written "
                    "with other --student-filters or --mixed-precision?); use a new --run-id"
                ) from None
            log.info("student: resuming after epoch %d from %s", int(self.epoch.numpy()), self.last.latest_checkpoint)
        return int(self.epoch.numpy())

    def end_epoch(self, epoch: int, score: float, patience: int) -> bool:
        """Record the epoch; True when early stopping should end training."""
        if score > float(self.best.numpy()):
            self.best.assign(score)
            self.wait.assign(0)
            self.best_student.save(checkpoint_number=epoch)
        else:
            self.wait.assign_add(1)
        self.epoch.assign(epoch + 1)
        self.last.save(checkpoint_number=epoch)
        return patience > 0 and int(self.wait.numpy()) >= patience

    def restore_best(self) -> None:
        if self.best_student.latest_checkpoint:
            self.best_student.checkpoint.restore(self.best_student.latest_checkpoint).assert_existing_objects_matched()


__all__ = ["ReplicaLoop"]
