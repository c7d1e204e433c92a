"""Compressed variants of the trained model: magnitude pruning, a distilled student, TFLite files.

    variants = model_compression.run_variants(config, model, datasets, folder, strategy, tracker)
    # {"pruned": {...}, "student": {...}, "model_int8": {...}, "pruned_int8": {...}, ...}

Steps are chosen once from `config.compression` (`choose_steps`) and share one life cycle:
`prepare` (build what the step trains, inside `strategy.scope()`) → `fit` (with its `callbacks`) →
`finalize` (export into the run folder, evaluate with `utilities.variant_eval`, return variant
dicts). Order: pruning → distillation → quantization, which converts the float model and every
model produced before it. A step that fails is recorded as `{"error": "..."}` and logged in one
line; the other steps still run and their files stay written. Keras variants are saved as the
float model is (`save_model`: `pruned/model.keras`, `student/model.keras`), so
`gzip_ratio_vs_float` compares files of one format.

Pruning decision. With the default frozen DenseNet121, the backbone holds 7.0 M of the model's
~7.05 M weights, so pruning only the trainable heads would leave the file size unchanged. We prune
every Conv2D/Dense kernel with at least `MIN_PRUNE_WEIGHTS` weights, backbone included, and let the
pruned kernels fine-tune (the surviving weights compensate for the removed ones). The fine-tune
starts from a trained model, so it runs at `PRUNE_LR_FACTOR` × the training learning rate: at the
full rate, Adam's first steps (each weight moves by ~lr whatever its gradient) wrecked a fine-tuned
DenseNet (demo data: val balanced accuracy 0.77 → 0.125); at a tenth it ended at 0.87–0.95. BatchNorm
keeps the mode the backbone was trained in: frozen (inference mode, fixed statistics) for a frozen
backbone, so a short fine-tune on small data cannot shift ImageNet statistics; training mode (batch
statistics, moving averages updated with the model's momentum) for a fine-tuned backbone, whose
statistics then follow the activations that pruning changes.
The FusionLayer is never pruned: its two weights are the branch mix, and zeroing one drops a branch.

Distillation. One loss (`DistillationLoss`, per example) feeds two training paths: the `Distiller`
Keras model (`fit`, one replica) and `ReplicaLoop` (explicit `strategy.run` step, used when the
strategy has more than one replica). Both log the same per-epoch rows (`student/train/loss`, …).
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf  # utilities/__init__.py (run first, as our package) selected Keras 2
import tf_keras

from utilities import evaluation, model_quantization, variant_eval
from utilities.callbacks import NanGuard, ResumeProbe, progress_display
from utilities.config import CompressionConfig, Config, ConfigError
from utilities.errors import RunFailure, one_line
from utilities.model import (
    BalancedAccuracy,
    FusionLayer,
    ModelError,
    compile_model,
    float32_config,
    float32_policy,
    load_model,
    save_recalibrated,
)
from utilities.progress import Progress
from utilities.schema import METADATA_SIZE, NUM_CLASSES

log = logging.getLogger(__name__)

MIN_PRUNE_WEIGHTS = 1024  # smaller kernels add nothing to the file but their pruning costs accuracy
PRUNE_RAMP = 0.75  # sparsity reaches its target after this fraction of the fine-tune steps
MASK_UPDATES = 20  # about this many mask updates along the ramp
PRUNE_LR_FACTOR = 0.1  # pruning fine-tune learning rate = this × --learning-rate (see the module doc)
STUDENT_LEARNING_RATE = 1e-3  # Adam's default: the student starts from random weights
# The student's BatchNorm moving averages start at mean 0 / variance 1 and must settle within its
# own short run: with Keras' default 0.99 they still carry 0.99^70 ≈ 50 % of the initial values
# after 70 steps (demo data: 5 epochs, val balanced accuracy at chance while train accuracy rose to
# 0.89). 0.9 (PyTorch's default, 0.1 there) settles in ~30 steps.
STUDENT_BN_MOMENTUM = 0.9
_PROB_FLOOR = 1e-7  # probabilities are clipped here before log() so log(0) never appears


class CompressionError(RunFailure, RuntimeError):
    """A compression step that cannot run as asked; the message is one line."""


# ====================================================================== input checks


def check_inputs(config: Config, train_examples: int | None = None, load_teacher_model: bool = True) -> None:
    """Reject nonsense before any training: call from cli.py (no data yet) and after the data is built.

    Raises ConfigError (bad combination) or ModelError (a `--teacher` that does not load or does not
    fit the data) with a one-line message. `train_examples=None` skips the data-dependent checks.
    """
    c = config.compression
    if train_examples == 0:
        needs_train = [
            flag for flag, on in (("-p", c.prune), ("-d", c.distill), ("-q int8", "int8" in c.quantize)) if on
        ]
        if needs_train:
            raise ConfigError(f"{', '.join(needs_train)} need training examples, but the train split is empty")
    if c.distill and c.teacher and load_teacher_model:
        load_teacher(c.teacher, config.data.image_size)


def load_teacher(path: str, image_size: int) -> tf_keras.Model:
    """A saved model usable as teacher: inputs `image` (S,S,3) and `metadata` (28,), output (8,)."""
    if not Path(path).exists():
        raise ModelError(f"--teacher {path} does not exist")
    try:
        teacher = load_model(path)
    except ModelError:
        raise
    except Exception as exc:  # a corrupt file raises zipfile/h5py/protobuf errors, not just OSError
        raise ModelError(f"cannot load --teacher {path}: {one_line(exc)}") from exc
    shapes = {tensor.name.split(":")[0]: tuple(tensor.shape[1:]) for tensor in teacher.inputs}
    expected = {"image": (image_size, image_size, 3), "metadata": (METADATA_SIZE,)}
    if shapes != expected or tuple(teacher.output_shape[1:]) != (NUM_CLASSES,):
        raise ModelError(
            f"--teacher {path} takes {shapes} → {teacher.output_shape[1:]}; expected {expected} → ({NUM_CLASSES},)"
        )
    return teacher


# ====================================================================== steps and driver


@dataclass
class Context:
    """What every step reads; `models` collects the Keras models the quantization step converts."""

    config: Config
    model: tf_keras.Model  # the trained float model; never modified here
    datasets: Any  # utilities.data.Datasets: .train/.val/.test, .class_weights, .counts, .steps_per_epoch
    folder: Any  # training.RunFolder: .path(...), .checkpoints
    strategy: tf.distribute.Strategy
    tracker: Any  # utilities.tracking.Tracker
    reference: dict[str, Any]  # the float model's variant_eval dict: `_val_probs`, `gzip_bytes`
    models: dict[str, tf_keras.Model] = field(default_factory=dict)


class CompressionStep(ABC):
    """One compression variant: prepare → fit (with callbacks) → finalize (export + evaluate)."""

    name: str

    def prepare(self, ctx: Context) -> None:
        """Build the models this step trains; runs inside `ctx.strategy.scope()`."""
        return None  # export-only steps build nothing

    def callbacks(self, ctx: Context) -> list[tf_keras.callbacks.Callback]:
        return []

    def fit(self, ctx: Context) -> None:
        """Train with `self.callbacks(ctx)`."""
        return None  # export-only steps train nothing

    @abstractmethod
    def finalize(self, ctx: Context) -> dict[str, dict[str, Any]]:
        """Write artifacts, evaluate, return {variant name: variant dict}."""

    def run(self, ctx: Context) -> dict[str, dict[str, Any]]:
        with ctx.strategy.scope():
            self.prepare(ctx)
        self.fit(ctx)
        return self.finalize(ctx)


def choose_steps(compression: CompressionConfig) -> list[CompressionStep]:
    """The steps asked for, in the order they must run (quantization last: it converts their models)."""
    steps: list[CompressionStep] = []
    if compression.prune:
        steps.append(PruningStep())
    if compression.distill:
        steps.append(DistillationStep())
    if compression.quantize:
        steps.append(QuantizationStep(compression.quantize))
    return steps


def run_variants(
    config: Config, model, datasets, folder, strategy, tracker, reference: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """Run the chosen steps; {variant: metrics dict or {"error": one line}}.

    `reference` is the float model's `variant_eval` dict (pass `metrics["variants"]["model"]` to
    skip re-evaluating the float model); its val probabilities give every variant's `agreement`.
    """
    # No check_inputs here: the float model is already trained and saved, so an impossible variant
    # (e.g. int8 without training examples) is recorded as that variant's error, not raised.
    if reference is None:
        reference = float_reference(model, datasets, folder.path("model"))
    ctx = Context(config, model, datasets, folder, strategy, tracker, reference, models={"model": model})
    results: dict[str, dict[str, Any]] = {}
    for step in choose_steps(config.compression):
        results.update(guarded(step.name, lambda step=step: step.run(ctx)))
    return results


def guarded(name: str, produce: Callable[[], dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """`produce()`, or {name: {"error": ...}} if it raises: one variant never takes the others down."""
    try:
        return produce()
    except Exception as exc:
        message = f"{type(exc).__name__}: {one_line(exc)}"
        log.error("variant %s failed: %s", name, message)
        log.debug("variant %s traceback", name, exc_info=True)
        return {name: {"error": message}}


def float_reference(model, datasets, saved_path: Path | None = None) -> dict[str, Any]:
    """The float model's val/test predictions (for agreement) and, if saved, its size."""
    reference = variant_eval.evaluate_predict_fn(variant_eval.keras_predict_fn(model), datasets)
    if saved_path is not None and Path(saved_path).exists():
        reference.update(evaluation.artifact_size(saved_path))
    return reference


def _add_size_ratio(result: dict[str, Any], reference: Mapping[str, Any]) -> None:
    """`gzip_ratio_vs_float`: the float model's gzip size over this variant's (2.0 = half the size)."""
    if reference.get("gzip_bytes") and result.get("gzip_bytes"):
        result["gzip_ratio_vs_float"] = round(reference["gzip_bytes"] / result["gzip_bytes"], 3)


# ====================================================================== pruning


class PruningStep(CompressionStep):
    """Magnitude pruning fine-tune of a copy of the float model; exported stripped to `pruned/`."""

    name = "pruned"

    def prepare(self, ctx: Context) -> None:
        c = ctx.config.compression
        total_steps = int(ctx.datasets.steps_per_epoch["train"]) * c.prune_epochs
        self.model, self.pruned_layers = build_pruned_model(
            ctx.model,
            pruning_schedule(c.target_sparsity, total_steps),
            train_batchnorm=ctx.config.model.fine_tune,  # BatchNorm as the backbone was trained
        )
        # tfmot updates its masks through merge_call, which MirroredStrategy refuses inside an XLA
        # function: the fine-tune is compiled only with one replica.
        jit = ctx.config.train.jit and ctx.strategy.num_replicas_in_sync == 1
        compile_model(self.model, ctx.config.train.learning_rate * PRUNE_LR_FACTOR, jit=jit)

    def callbacks(self, ctx: Context) -> list[tf_keras.callbacks.Callback]:
        import tensorflow_model_optimization as tfmot

        return [
            # A rerun resumes the fine-tune (masks and pruning step are model variables).
            tf_keras.callbacks.BackupAndRestore(str(ctx.folder.checkpoints / "pruned_backup")),
            tfmot.sparsity.keras.UpdatePruningStep(),
            NanGuard("pruning fine-tune"),
            EpochLogger(ctx.tracker, prefix="pruned"),
        ]

    def fit(self, ctx: Context) -> None:
        verbose, progress = progress_display(ctx.config.train.progress_seconds, "pruning fine-tune")
        self.model.fit(
            ctx.datasets.train,
            validation_data=ctx.datasets.val,
            epochs=ctx.config.compression.prune_epochs,
            class_weight=ctx.datasets.class_weights,
            callbacks=[*self.callbacks(ctx), *progress],
            verbose=verbose,
        )

    def finalize(self, ctx: Context) -> dict[str, dict[str, Any]]:
        import tensorflow_model_optimization as tfmot

        with ctx.strategy.scope(), float32_policy():
            stripped = tfmot.sparsity.keras.strip_pruning(self.model)
        path = ctx.folder.path("pruned")
        # BatchNorm trained along (a fine-tuned backbone): its statistics re-estimated before evaluation.
        batchnorm_batches = save_recalibrated(stripped, path, _clean_train(ctx.datasets))
        result = variant_eval.evaluate_keras(stripped, ctx.datasets, path, ctx.reference)
        result["batchnorm_batches"] = batchnorm_batches
        result["sparsity"] = measure_sparsity(stripped, self.pruned_layers)
        result["sparsity_overall"] = overall_sparsity(stripped, self.pruned_layers)
        _add_size_ratio(result, ctx.reference)
        ctx.models["pruned"] = stripped
        log.info(
            "pruned: sparsity %.3f, val balanced accuracy %.3f",
            result["sparsity_overall"],
            result["val"]["balanced_accuracy"],
        )
        return {"pruned": result}


def _clean_train(datasets) -> Any:
    """Training batches without augmentation when the datasets have them (BatchNorm re-estimation)."""
    return getattr(datasets, "train_clean", None) or datasets.train


def pruning_schedule(target_sparsity: float, total_steps: int):
    """PolynomialDecay 0 → target over the first PRUNE_RAMP of `total_steps`, then held.

    The wrapper counts training steps 1..total_steps (tfmot 0.8 increments before masking) and
    updates masks when `step % frequency == 0` up to `end_step`; `end_step` is a multiple of
    `frequency`, so the last update lands exactly on the target and the remaining steps fine-tune
    the surviving weights at the final sparsity.
    """
    import tensorflow_model_optimization as tfmot

    if total_steps < 2:
        raise CompressionError(f"pruning needs at least 2 training steps, got {total_steps}; raise --prune-epochs")
    ramp = max(1, int(total_steps * PRUNE_RAMP))
    frequency = max(1, ramp // MASK_UPDATES)
    end_step = frequency * (ramp // frequency)
    return tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=0.0, final_sparsity=target_sparsity, begin_step=0, end_step=end_step, frequency=frequency
    )


def is_prunable(layer: tf_keras.layers.Layer) -> bool:
    """Dense/Conv2D kernels big enough to matter; the FusionLayer never (it mixes the branches)."""
    if isinstance(layer, FusionLayer) or not isinstance(layer, tf_keras.layers.Dense | tf_keras.layers.Conv2D):
        return False
    return int(np.prod(layer.kernel.shape)) >= MIN_PRUNE_WEIGHTS


def build_pruned_model(
    model: tf_keras.Model, schedule, train_batchnorm: bool = False
) -> tuple[tf_keras.Model, set[int]]:
    """Copy of `model` with pruning wrappers on prunable layers, nested backbone included.

    `train_batchnorm`: see `trainable_copy` (True for a model whose backbone was fine-tuned).

    Call inside `strategy.scope()`: the copy, the clones and the wrappers' mask variables must be
    created there (outside, MirroredStrategy fails with "tuple indices must be integers or slices,
    not MirroredVariable"). Returns the model and the ids of the wrapped layers (for sparsity).
    """
    import tensorflow_model_optimization as tfmot

    source = trainable_copy(model, train_batchnorm)
    wrapped: set[int] = set()

    def wrap(layer):
        if isinstance(layer, tf_keras.Model):  # the nested backbone: clone it with its layers wrapped
            return tf_keras.models.clone_model(layer, clone_function=wrap)
        if is_prunable(layer):
            wrapped.add(id(layer))  # strip_pruning returns this very object, so the id identifies it
            return tfmot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule=schedule)
        return layer  # shared with `source`, which is a private copy

    with float32_policy():  # tfmot assigns float32 masks to the kernels: no float16 compute here
        pruned = tf_keras.models.clone_model(source, clone_function=wrap)
    if not wrapped:
        raise CompressionError(f"no Dense/Conv2D layer with >= {MIN_PRUNE_WEIGHTS} weights to prune in {model.name!r}")
    return pruned, wrapped


def trainable_copy(model: tf_keras.Model, train_batchnorm: bool = False) -> tf_keras.Model:
    """A new model with `model`'s weights (BatchNorm statistics included) whose nested backbone trains.

    build_model calls a frozen backbone with `training=False`; the pruning wrappers only update
    their masks in training mode, so the copy drops that call argument. BatchNorm is frozen unless
    `train_batchnorm`: frozen BatchNorm layers (trainable=False) run in inference mode in Keras 2,
    whatever the training flag; trainable ones use batch statistics in training and keep updating
    their moving averages (starting from `model`'s, with its momentum). Always float32 compute
    (see `float32_copy`), also when `model` was trained with mixed precision.
    """
    config = float32_config(model.get_config())
    for layer_config in config["layers"]:
        if layer_config["class_name"] in ("Functional", "Model", "Sequential"):
            for node in layer_config["inbound_nodes"]:
                for inbound in node:  # [layer name, node index, tensor index, call kwargs]
                    if len(inbound) > 3 and isinstance(inbound[3], dict):
                        inbound[3].pop("training", None)
    with float32_policy():
        copy = tf_keras.Model.from_config(config)
    copy_weights(model, copy)
    copy.trainable = True
    if not train_batchnorm:
        for _, layer in walk_layers(copy):
            if isinstance(layer, tf_keras.layers.BatchNormalization):
                layer.trainable = False
    return copy


def copy_weights(source: tf_keras.Model, target: tf_keras.Model) -> None:
    """Layer-by-layer weight copy between two models of one architecture (nested models included)."""
    pairs = list(zip(walk_layers(source), walk_layers(target), strict=True))
    for (source_name, source_layer), (target_name, target_layer) in pairs:
        if source_name != target_name:
            raise CompressionError(f"cannot copy weights: layer {source_name!r} faces {target_name!r}")
        target_layer.set_weights(source_layer.get_weights())


def walk_layers(model: tf_keras.Model, prefix: str = "") -> Iterator[tuple[str, tf_keras.layers.Layer]]:
    """(qualified name, layer) of every non-model layer, descending into nested models."""
    for layer in model.layers:
        if isinstance(layer, tf_keras.Model):
            yield from walk_layers(layer, f"{prefix}{layer.name}/")
        else:
            yield f"{prefix}{layer.name}", layer


def measure_sparsity(model: tf_keras.Model, layer_ids: set[int]) -> dict[str, float]:
    """Fraction of exact zeros in each pruned layer's kernel, by qualified layer name."""
    return {
        name: float(np.mean(layer.kernel.numpy() == 0)) for name, layer in walk_layers(model) if id(layer) in layer_ids
    }


def overall_sparsity(model: tf_keras.Model, layer_ids: set[int]) -> float:
    """Zeros over all pruned kernels' weights (weighted by kernel size)."""
    kernels = [layer.kernel.numpy() for _, layer in walk_layers(model) if id(layer) in layer_ids]
    return float(sum(int(np.sum(k == 0)) for k in kernels) / max(1, sum(k.size for k in kernels)))


# ====================================================================== distillation: model and loss


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


def _epoch_metrics() -> list[tf_keras.metrics.Metric]:
    return [tf_keras.metrics.CategoricalAccuracy(name="accuracy"), BalancedAccuracy()]


# ====================================================================== distillation: Keras path


class Distiller(tf_keras.Model):
    """Trains `student` against a frozen `teacher` with `fit`; save `distiller.student`, not this."""

    def __init__(self, student: tf_keras.Model, teacher: tf_keras.Model | None, loss_fn: DistillationLoss, **kwargs):
        super().__init__(name="distiller", **kwargs)
        self.student = student
        self.teacher = teacher  # only ever called with training=False; never receives gradients
        self.loss_fn = loss_fn
        self.loss_tracker = tf_keras.metrics.Mean(name="loss")
        self.epoch_metrics = _epoch_metrics()

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


def _fit_distiller(
    distiller: Distiller, datasets, epochs: int, patience: int, checkpoint_dir: Path, tracker, prefix: str
):
    probe = ResumeProbe()
    callbacks = [
        tf_keras.callbacks.BackupAndRestore(str(checkpoint_dir / "backup")),  # a rerun resumes
        probe,
        NanGuard("distillation"),
        EpochLogger(tracker, prefix),
    ]
    if patience > 0:
        callbacks.append(
            tf_keras.callbacks.EarlyStopping(
                monitor="val_balanced_accuracy", mode="max", patience=patience, restore_best_weights=True
            )
        )
    verbose, progress = progress_display(what="distillation")
    history = distiller.fit(
        datasets.train, validation_data=datasets.val, epochs=epochs, callbacks=[*callbacks, *progress], verbose=verbose
    )
    scores = history.history.get("val_balanced_accuracy", [])
    return {
        "path": "distiller",
        "resumed_from_epoch": probe.start_epoch or 0,
        "epochs_run": len(scores),
        "best_val_balanced_accuracy": max(scores) if scores else None,
    }


# ====================================================================== distillation: per-replica loop


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
            self.metrics = {split: _epoch_metrics() for split in ("train", "val")}
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
            if state.end_epoch(epoch, logs["val_balanced_accuracy"], patience):
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


# ====================================================================== distillation: entry points


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


class DistillationStep(CompressionStep):
    """A small student trained from the teacher (the trained model or `--teacher`), saved to `student/`."""

    name = "student"

    def prepare(self, ctx: Context) -> None:
        c, image_size = ctx.config.compression, ctx.config.data.image_size
        self.teacher = load_teacher(c.teacher, image_size) if c.teacher else ctx.model
        self.student = build_student(image_size, c.student_filters, ctx.config.model.dropout)
        self.loss_fn = DistillationLoss(c.temperature, c.alpha, class_weight_vector(ctx.datasets.class_weights))

    def fit(self, ctx: Context) -> None:
        c = ctx.config.compression
        self.summary = train_student(
            self.student,
            self.teacher,
            self.loss_fn,
            ctx.datasets,
            strategy=ctx.strategy,
            epochs=c.student_epochs or ctx.config.train.epochs,
            patience=ctx.config.train.patience,
            checkpoint_dir=ctx.folder.checkpoints / "student",
            tracker=ctx.tracker,
            jit=ctx.config.train.jit,
        )

    def finalize(self, ctx: Context) -> dict[str, dict[str, Any]]:
        path = ctx.folder.path("student")
        batchnorm_batches = save_recalibrated(self.student, path, _clean_train(ctx.datasets))
        result = variant_eval.evaluate_keras(self.student, ctx.datasets, path, ctx.reference)
        result["batchnorm_batches"] = batchnorm_batches
        result["teacher"] = ctx.config.compression.teacher or "model"
        result["training"] = self.summary
        _add_size_ratio(result, ctx.reference)
        ctx.models["student"] = self.student
        log.info("student: val balanced accuracy %.3f (%s)", result["val"]["balanced_accuracy"], self.summary["path"])
        return {"student": result}


# ====================================================================== quantization


class QuantizationStep(CompressionStep):
    """TFLite files `{source}_{mode}.tflite` for the float model and each model produced before."""

    name = "quantized"

    def __init__(self, modes: Sequence[str]) -> None:
        self.modes = tuple(modes)

    def finalize(self, ctx: Context) -> dict[str, dict[str, Any]]:
        results: dict[str, dict[str, Any]] = {}
        for source, model in list(ctx.models.items()):
            for mode in self.modes:
                name = f"{source}_{mode}"
                results.update(
                    guarded(name, lambda s=source, m=model, q=mode, n=name: {n: self._variant(ctx, s, m, q)})
                )
        return results

    @staticmethod
    def _variant(ctx: Context, source: str, model: tf_keras.Model, mode: str) -> dict[str, Any]:
        path = model_quantization.export(model, mode, ctx.folder.path(f"{source}_{mode}.tflite"), ctx.datasets.train)
        predict = model_quantization.tflite_predict_fn(path)
        result = variant_eval.evaluate_variant(predict, ctx.datasets, path, int(model.count_params()), ctx.reference)
        result.update(source=source, mode=mode)
        _add_size_ratio(result, ctx.reference)
        return result


__all__ = [
    "CompressionError",
    "CompressionStep",
    "DistillationLoss",
    "DistillationStep",
    "Distiller",
    "PruningStep",
    "QuantizationStep",
    "ReplicaLoop",
    "build_pruned_model",
    "build_student",
    "check_inputs",
    "choose_steps",
    "load_teacher",
    "measure_sparsity",
    "pruning_schedule",
    "run_variants",
    "train_student",
]
