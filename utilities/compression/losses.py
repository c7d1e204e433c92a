"""The distillation loss and what both training paths share: `DistillationLoss` (per example), the
per-replica `batch_loss` and the epoch metrics. The Keras `Distiller` (`distillation`) and the explicit
per-replica loop (`replica_loop`) both import it, so neither imports the other's internals.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import tensorflow as tf  # utilities/__init__.py (run first, as our package) selected Keras 2
import tf_keras

from utilities.data.schema import NUM_CLASSES
from utilities.model import BalancedAccuracy

_PROB_FLOOR = 1e-7  # probabilities are clipped here before log() so log(0) never appears


def class_weight_vector(class_weights: Mapping[int, float] | None) -> list[float]:
    """Per-class loss weights (8,) from a {class id: weight} dict; a missing class weighs 1."""
    weights = class_weights or {}
    return [float(weights.get(i, 1.0)) for i in range(NUM_CLASSES)]


class DistillationLoss:
    """Per-example loss (B,): (1-α)·T²·KL(teacher_T ‖ student_T) + α·w[label]·CE(label, student).

    Both models output probabilities, not logits, so log(p) serves as the logits:
    softmax(log p / T) ∝ p^(1/T), which is exactly the temperature-softened distribution of any
    logits z with softmax(z) = p (z and log p differ by a per-example constant softmax ignores).
    T² keeps the soft term's gradients on the scale of the hard term's (they shrink as 1/T²).
    w[label] is the class weight of each example's true class. `teacher_probs=None` (a student
    trained from scratch) is allowed only with α = 1.
    """

    def __init__(self, temperature: float, alpha: float, class_weights: Sequence[float]) -> None:
        if temperature <= 0 or not 0.0 <= alpha <= 1.0:
            raise ValueError(
                f"distillation needs temperature > 0 and alpha in [0, 1]; got T={temperature}, alpha={alpha}"
            )
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.class_weights = tf.constant(class_weights, tf.float32)  # (8,)

    def __call__(self, labels: tf.Tensor, teacher_probs: tf.Tensor | None, student_probs: tf.Tensor) -> tf.Tensor:
        labels = tf.cast(labels, tf.float32)  # (B, 8) one-hot
        student_log = tf.math.log(tf.clip_by_value(tf.cast(student_probs, tf.float32), _PROB_FLOOR, 1.0))
        example_weights = tf.reduce_sum(labels * self.class_weights, axis=-1)  # (B,)
        hard = -tf.reduce_sum(labels * student_log, axis=-1) * example_weights  # (B,)
        if teacher_probs is None:
            if self.alpha != 1.0:
                raise ValueError("a student without teacher needs alpha = 1 (hard labels only)")
            return hard
        teacher_log = tf.math.log(tf.clip_by_value(tf.cast(teacher_probs, tf.float32), _PROB_FLOOR, 1.0))
        t = self.temperature
        soft_teacher = tf.nn.softmax(teacher_log / t)  # (B, 8)
        kl = tf.reduce_sum(
            soft_teacher * (tf.nn.log_softmax(teacher_log / t) - tf.nn.log_softmax(student_log / t)), axis=-1
        )
        return (1.0 - self.alpha) * (t * t) * kl + self.alpha * hard


def batch_loss(student, teacher, loss_fn: DistillationLoss, features, labels, global_batch_size, training: bool):
    """(scalar loss, student probs (B, 8)) for one per-replica batch.

    Per-example losses are summed and divided by `global_batch_size` (None: this batch × replicas),
    so summing the replicas' gradients gives the gradient of the global mean.
    """
    teacher_probs = None
    if teacher is not None:
        teacher_probs = tf.stop_gradient(tf.cast(teacher(features, training=False), tf.float32))
    student_probs = tf.cast(student(features, training=training), tf.float32)
    per_example = loss_fn(labels, teacher_probs, student_probs)  # (B,)
    loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch_size)
    if student.losses:  # weight regularisers, counted once across replicas
        loss += tf.nn.scale_regularization_loss(tf.add_n(student.losses))
    return loss, student_probs


def epoch_metrics() -> list[tf_keras.metrics.Metric]:
    """Accuracy and balanced accuracy, as the job's model reports them each epoch."""
    return [tf_keras.metrics.CategoricalAccuracy(name="accuracy"), BalancedAccuracy()]


__all__ = ["DistillationLoss", "batch_loss", "class_weight_vector", "epoch_metrics"]
