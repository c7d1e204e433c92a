"""Distillation: a small student trained from a frozen teacher (the trained model or `--teacher`).

    student = distillation.build_student(image_size, filters)
    summary = distillation.train_student(student, teacher, DistillationLoss(T, alpha, weights), datasets,
                                         strategy=strategy, epochs=5, patience=0, checkpoint_dir=ckpt, tracker=tracker)

One loss (`DistillationLoss`, per example) feeds two training paths: the `Distiller` Keras model
(`fit`, one replica) and `ReplicaLoop` (explicit `strategy.run` step, `utilities.compression.replica_loop`,
used when the strategy has more than one replica). Both log the same per-epoch rows
(`student/train/loss`, …). `Distillation` is the job's step (the `student` variant); the driver
(`utilities.compression`) saves, evaluates and sizes the student it produces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tensorflow as tf  # utilities/__init__.py (run first, as our package) selected Keras 2
import tf_keras

from utilities.compression.losses import DistillationLoss, batch_loss, class_weight_vector, epoch_metrics
from utilities.compression.replica_loop import ReplicaLoop
from utilities.data.schema import HEADLINE, METADATA_SIZE, NUM_CLASSES
from utilities.errors import one_line
from utilities.model import FusionLayer, ModelError, load_model
from utilities.run.callbacks import EpochLogger, ResumeProbe, epoch_row, fit_callbacks
from utilities.run.config import Config

STUDENT_LEARNING_RATE = 1e-3  # Adam's default: the student starts from random weights
# The student's BatchNorm moving averages start at mean 0 / variance 1 and must settle within its
# own short run: with Keras' default 0.99 they still carry 0.99^70 ≈ 50 % of the initial values
# after 70 steps (demo data: 5 epochs, val balanced accuracy at chance while train accuracy rose to
# 0.89). 0.9 (PyTorch's default, 0.1 there) settles in ~30 steps.
STUDENT_BN_MOMENTUM = 0.9


# ====================================================================== teacher and student


def load_teacher(path: str, image_size: int, trust_code: bool = False) -> tf_keras.Model:
    """A saved model usable as teacher: inputs `image` (S,S,3) and `metadata` (28,), output (8,).

    Its config is checked for Python code first (`load_model`), unless `trust_code` (`--trust-model-code`).
    """
    if not Path(path).exists():
        raise ModelError(f"--teacher {path} does not exist")
    try:
        teacher = load_model(path, trust_code=trust_code)
    except ModelError as exc:
        raise ModelError(f"--teacher: {exc}") from exc
    except Exception as exc:  # a corrupt file raises zipfile/h5py/protobuf errors, not just OSError
        raise ModelError(f"cannot load --teacher {path}: {one_line(exc)}") from exc
    shapes = {tensor.name.split(":")[0]: tuple(tensor.shape[1:]) for tensor in teacher.inputs}
    expected = {"image": (image_size, image_size, 3), "metadata": (METADATA_SIZE,)}
    if shapes != expected or tuple(teacher.output_shape[1:]) != (NUM_CLASSES,):
        raise ModelError(
            f"--teacher {path} takes {shapes} → {teacher.output_shape[1:]}; expected {expected} → ({NUM_CLASSES},)"
        )
    return teacher


def build_student(
    image_size: int, filters: int, dropout: float = 0.3, bn_momentum: float = STUDENT_BN_MOMENTUM
) -> tf_keras.Model:
    """Small conv image branch + metadata dense branch, fused like the teacher. Output probs (B, 8).

    image (B,S,S,3) 0..255 → Rescaling 1/255 → [Conv3×3 (f·2^i, ≤4f) → BN → ReLU → MaxPool 2] × k
    → global average → Dense(8); metadata (B,28) → Dense(2f, relu) → Dense(8); FusionLayer.
    k = number of halvings leaving ≥ 4 px (≤ 4): 3 at 32 px, 4 from 64 px. Call inside strategy.scope().
    `bn_momentum`: see STUDENT_BN_MOMENTUM.
    """
    image = tf_keras.Input((image_size, image_size, 3), name="image")
    metadata = tf_keras.Input((METADATA_SIZE,), name="metadata")
    x = tf_keras.layers.Rescaling(1.0 / 255.0, name="scale_0_1")(image)
    for block in range(1, _student_blocks(image_size) + 1):
        width = filters * min(2 ** (block - 1), 4)
        x = tf_keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"block{block}_conv")(x)
        x = tf_keras.layers.BatchNormalization(momentum=bn_momentum, name=f"block{block}_bn")(x)
        x = tf_keras.layers.ReLU(name=f"block{block}_relu")(x)
        x = tf_keras.layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
    x = tf_keras.layers.GlobalAveragePooling2D(name="image_pool")(x)
    x = tf_keras.layers.Dropout(dropout, name="image_dropout")(x)
    image_logits = tf_keras.layers.Dense(NUM_CLASSES, name="image_logits")(x)
    hidden = tf_keras.layers.Dense(2 * filters, activation="relu", name="metadata_dense")(metadata)
    hidden = tf_keras.layers.Dropout(dropout, name="metadata_dropout")(hidden)
    metadata_logits = tf_keras.layers.Dense(NUM_CLASSES, name="metadata_logits")(hidden)
    probs = FusionLayer(name="fusion")([image_logits, metadata_logits])
    return tf_keras.Model({"image": image, "metadata": metadata}, probs, name="student")


def _student_blocks(image_size: int) -> int:
    return int(min(4, max(1, math.floor(math.log2(image_size / 4)))))


# ====================================================================== Keras path


class Distiller(tf_keras.Model):
    """Trains `student` against a frozen `teacher` with `fit`; save `distiller.student`, not this."""

    def __init__(self, student: tf_keras.Model, teacher: tf_keras.Model | None, loss_fn: DistillationLoss, **kwargs):
        super().__init__(name="distiller", **kwargs)
        self.student = student
        self.teacher = teacher  # only ever called with training=False; never receives gradients
        self.loss_fn = loss_fn
        self.loss_tracker = tf_keras.metrics.Mean(name="loss")
        self.epoch_metrics = epoch_metrics()

    @property
    def metrics(self) -> list[tf_keras.metrics.Metric]:
        return [self.loss_tracker, *self.epoch_metrics]  # reset by fit at each epoch

    def call(self, inputs, training=False):
        return self.student(inputs, training=training)

    def batch_loss(self, features, labels, training: bool):
        return batch_loss(self.student, self.teacher, self.loss_fn, features, labels, None, training)

    def train_step(self, data):
        features, labels = data[0], data[1]
        with tf.GradientTape() as tape:
            loss, probs = self.batch_loss(features, labels, training=True)
        # minimize, not apply_gradients: a LossScaleOptimizer (mixed precision) scales the loss here.
        self.optimizer.minimize(loss, self.student.trainable_variables, tape=tape)
        return self._update(loss, labels, probs)

    def test_step(self, data):
        features, labels = data[0], data[1]
        loss, probs = self.batch_loss(features, labels, training=False)
        return self._update(loss, labels, probs)

    def _update(self, loss, labels, probs) -> dict[str, tf.Tensor]:
        self.loss_tracker.update_state(loss)
        for metric in self.epoch_metrics:
            metric.update_state(labels, probs)
        return {m.name: m.result() for m in self.metrics}


def _fit_distiller(
    distiller: Distiller, datasets, epochs: int, patience: int, checkpoint_dir: Path, tracker, prefix: str
) -> dict[str, Any]:
    probe = ResumeProbe()
    verbose, callbacks = fit_callbacks(
        "distillation",
        restore_dir=Path(checkpoint_dir) / "backup",
        hooks=[probe],
        loggers=[EpochLogger(tracker, prefix)],
        patience=patience,
    )
    history = distiller.fit(
        datasets.train, validation_data=datasets.val, epochs=epochs, callbacks=callbacks, verbose=verbose
    )
    scores = history.history.get(f"val_{HEADLINE}", [])
    return {
        "path": "distiller",
        "resumed_from_epoch": probe.start_epoch or 0,
        "epochs_run": len(scores),
        "best_val_balanced_accuracy": max(scores) if scores else None,
    }


# ====================================================================== entry points


def train_student(
    student: tf_keras.Model,
    teacher: tf_keras.Model | None,
    loss_fn: DistillationLoss,
    datasets,
    *,
    strategy: tf.distribute.Strategy,
    epochs: int,
    patience: int,
    checkpoint_dir: Path,
    tracker,
    learning_rate: float = STUDENT_LEARNING_RATE,
    prefix: str = "student",
    force_loop: bool = False,
    jit: bool = False,
) -> dict[str, Any]:
    """Train `student` in place (Distiller with one replica, ReplicaLoop with more or when forced).

    `student` (and a teacher built here) must have been created inside `strategy.scope()`. `jit`:
    XLA-compile the Distiller's step (the per-replica loop runs without XLA).
    Returns a summary: path used, epoch resumed from, epochs run, best val balanced accuracy.
    """
    if strategy.num_replicas_in_sync > 1 or force_loop:
        loop = ReplicaLoop(student, teacher, loss_fn, strategy, learning_rate)

        def on_epoch_end(epoch: int, logs: dict[str, float]) -> None:
            tracker.log(epoch_row(prefix, epoch, logs))

        return loop.fit(datasets, epochs, patience, checkpoint_dir, on_epoch_end)
    with strategy.scope():
        distiller = Distiller(student, teacher, loss_fn)
        distiller.compile(optimizer=tf_keras.optimizers.Adam(learning_rate), jit_compile=jit)
    return _fit_distiller(distiller, datasets, epochs, patience, checkpoint_dir, tracker, prefix)


@dataclass(frozen=True)
class Distillation:
    """The `student` variant's step: a student trained from the teacher (the trained model or `--teacher`)."""

    config: Config
    checkpoints: Path  # the run's checkpoint folder: the student's go into `student/`
    tracker: Any

    def produce(self, model: tf_keras.Model, data, strategy) -> tuple[tf_keras.Model, dict[str, Any]]:
        c, image_size = self.config.compression, self.config.data.image_size
        with strategy.scope():
            teacher = load_teacher(c.teacher, image_size, trust_code=c.trust_model_code) if c.teacher else model
            student = build_student(image_size, c.student_filters, self.config.model.dropout)
            loss_fn = DistillationLoss(c.temperature, c.alpha, class_weight_vector(data.class_weights))
        summary = train_student(
            student,
            teacher,
            loss_fn,
            data,
            strategy=strategy,
            epochs=c.student_epochs or self.config.train.epochs,
            patience=self.config.train.patience,
            checkpoint_dir=Path(self.checkpoints) / "student",
            tracker=self.tracker,
            jit=self.config.train.jit,
        )
        return student, {"teacher": c.teacher or "model", "training": summary}


__all__ = [
    "STUDENT_BN_MOMENTUM",
    "Distillation",
    "Distiller",
    "build_student",
    "load_teacher",
    "train_student",
]
