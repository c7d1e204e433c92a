"""The DermAID model: a backbone's image branch + metadata dense branch, fused by learned weights.

    image (B,S,S,3) float 0..255 ─ its preprocessing ─ backbone (avg-pooled; DenseNet121: 1024) ─ Dense(8) ─┐
                                                                                                          FusionLayer → probs (B,8)
    metadata (B,28) multi-hot ─ Dense(f, relu) ─ Dropout ─ Dense(8) ─────────────────────────────────────┘

The backbone is `--backbone` (DenseNet121 by default, the original's; `utilities.backbones`).
Preprocessing lives inside the model so a saved or TFLite model takes raw pixels. Every custom class
here (and in utilities.backbones) is registered with Keras, so `tf_keras.models.load_model(path)` needs no `custom_objects` once
this module is imported (`import utilities.model`); a SavedModel export (for serving) loads with
`tf.saved_model.load(path)` and needs nothing.

A model file is a program: `load_model` reads its config as JSON and refuses Python code in it
(`check_model_file`: Lambda layers, classes outside tf_keras and this job) before Keras deserialises
anything; `trust_code=True` (`--trust-model-code`) skips the check for a file the user wrote.
"""

from __future__ import annotations

import errno
import itertools
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tensorflow as tf
import tf_keras

from utilities.backbones import build_backbone, preprocess
from utilities.data.schema import CLASS_NAMES, HEADLINE, METADATA_SIZE, NUM_CLASSES, PROBABILITY_FLOOR
from utilities.errors import one_line
from utilities.model_trust import KERAS_FILE, ModelError, check_model_file
from utilities.run.config import ModelConfig


@tf_keras.utils.register_keras_serializable(package="dermaid")
class FusionLayer(tf_keras.layers.Layer):
    """Convex mix of the branches' class probabilities with learned weights.

    One trainable logit per branch; softmax over them gives weights w_i ≥ 0, Σ w_i = 1, and the
    output is Σ w_i · softmax(branch_logits_i). The weights say how much the model leans on each
    branch (logged every epoch). Always computed in float32, also under mixed precision.
    """

    def __init__(self, branch_names: tuple[str, ...] = ("image", "metadata"), temperature: float = 1.0, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.branch_names = tuple(branch_names)
        # --calibrate: the output becomes softmax(log p / T) (temperature scaling of the mixed probabilities;
        # the argmax is unchanged). A Python number in the config, not a weight, so checkpoints and models
        # saved before it existed load unchanged (T = 1). Set it with `set_temperature` before tracing.
        self.temperature = float(temperature)

    def build(self, input_shape):
        self.branch_logits = self.add_weight(
            name="branch_logits", shape=(len(self.branch_names),), initializer="zeros", trainable=True
        )
        super().build(input_shape)

    def call(self, inputs):
        weights = tf.nn.softmax(self.branch_logits)  # (n_branches,)
        probs = tf.stack([tf.nn.softmax(tf.cast(x, tf.float32)) for x in inputs], axis=0)  # (n, B, C)
        mixed = tf.einsum("n,nbc->bc", weights, probs)
        if self.temperature == 1.0:
            return mixed
        return tf.nn.softmax(tf.math.log(tf.maximum(mixed, PROBABILITY_FLOOR)) / self.temperature)

    def branch_weights(self) -> dict[str, float]:
        values = tf.nn.softmax(self.branch_logits).numpy().tolist()
        return dict(zip(self.branch_names, values, strict=True))

    def get_config(self):
        return {**super().get_config(), "branch_names": list(self.branch_names), "temperature": self.temperature}


def set_temperature(model: tf_keras.Model, temperature: float) -> None:
    """Fold a calibration temperature into `model` (every FusionLayer's output); trace or save it afterwards."""
    fusions = [layer for layer in _all_layers(model) if isinstance(layer, FusionLayer)]
    if not fusions:
        raise ModelError(f"model {model.name} has no FusionLayer to carry a calibration temperature")
    for layer in fusions:
        layer.temperature = float(temperature)


@tf_keras.utils.register_keras_serializable(package="dermaid")
class BalancedAccuracy(tf_keras.metrics.Metric):
    """Mean per-class recall over classes seen so far (the headline metric), from one-hot labels.

    Accumulates a C×C confusion matrix, so it sums correctly across replicas and batches.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, name: str = HEADLINE, **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes = num_classes
        self.matrix = self.add_weight(name="matrix", shape=(num_classes, num_classes), initializer="zeros")

    def update_state(self, y_true, y_pred, sample_weight=None):
        true_ids = tf.argmax(y_true, axis=-1)
        pred_ids = tf.argmax(y_pred, axis=-1)
        batch = tf.math.confusion_matrix(true_ids, pred_ids, num_classes=self.num_classes, dtype=self.dtype)
        self.matrix.assign_add(batch)

    def result(self):
        support = tf.reduce_sum(self.matrix, axis=1)
        recall = tf.math.divide_no_nan(tf.linalg.diag_part(self.matrix), support)
        present = tf.cast(support > 0, self.dtype)
        return tf.math.divide_no_nan(tf.reduce_sum(recall * present), tf.reduce_sum(present))

    def reset_state(self):
        self.matrix.assign(tf.zeros_like(self.matrix))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


def build_model(config: ModelConfig, image_size: int) -> tf_keras.Model:
    """The fused classifier; call inside `strategy.scope()`. Output: class probabilities (B, 8)."""
    image = tf_keras.Input((image_size, image_size, 3), name="image")
    metadata = tf_keras.Input((METADATA_SIZE,), name="metadata")

    backbone = build_backbone(config.backbone, config.weights, image_size)
    backbone.trainable = config.fine_tune
    for layer in backbone.layers:  # bn_momentum 0 (not resolved from the steps per epoch): the backbone's own
        if isinstance(layer, tf_keras.layers.BatchNormalization) and config.bn_momentum:
            layer.momentum = config.bn_momentum
    # A frozen backbone runs in inference mode so its BatchNorm statistics stay fixed.
    features = backbone(preprocess(image, config.backbone), training=None if config.fine_tune else False)
    features = tf_keras.layers.Dropout(config.dropout, name="image_dropout")(features)
    image_logits = tf_keras.layers.Dense(NUM_CLASSES, name="image_logits")(features)

    hidden = tf_keras.layers.Dense(config.fcnn_nodes, activation="relu", name="metadata_dense")(metadata)
    hidden = tf_keras.layers.Dropout(config.dropout, name="metadata_dropout")(hidden)
    metadata_logits = tf_keras.layers.Dense(NUM_CLASSES, name="metadata_logits")(hidden)

    probs = FusionLayer(name="fusion")([image_logits, metadata_logits])
    return tf_keras.Model({"image": image, "metadata": metadata}, probs, name="dermaid")


def compile_model(
    model: tf_keras.Model,
    learning_rate: float | tf_keras.optimizers.schedules.LearningRateSchedule,
    jit: bool = False,
    loss: tf_keras.losses.Loss | None = None,
    clip_norm: float = 0.0,
) -> None:
    """Adam (a per-step schedule or a constant rate; `clip_norm` > 0 clips the gradients' global norm) on
    `loss` (default: categorical cross-entropy) over the fused probabilities; inside `strategy.scope()`.
    The run's recipe (`utilities.run.recipe`) chooses the schedule and the loss."""
    model.compile(
        optimizer=tf_keras.optimizers.Adam(learning_rate, global_clipnorm=clip_norm or None),
        loss=loss or tf_keras.losses.CategoricalCrossentropy(),
        metrics=[tf_keras.metrics.CategoricalAccuracy(name="accuracy"), BalancedAccuracy()],
        jit_compile=jit,
    )


DIHEDRAL_VIEWS = 8  # the square's symmetries: 4 quarter turns, each also mirrored


@tf_keras.utils.register_keras_serializable(package="dermaid")
class DihedralView(tf_keras.layers.Layer):
    """One of the square image's 8 symmetries: view v is mirrored left-right when v >= 4, then turned v % 4
    quarter turns. View 0 is the image itself. Dermoscopy has no up or left, so each view is as valid."""

    def __init__(self, view: int = 0, **kwargs):
        super().__init__(**kwargs)
        if not 0 <= view < DIHEDRAL_VIEWS:
            raise ValueError(f"a dihedral view is 0..{DIHEDRAL_VIEWS - 1}, not {view}")
        self.view = view

    def call(self, image):
        if self.view >= 4:
            image = tf.reverse(image, axis=[2])
        return tf.image.rot90(image, k=self.view % 4)

    def get_config(self):
        return {**super().get_config(), "view": self.view}


def tta_model(model: tf_keras.Model, views: int) -> tf_keras.Model:
    """`model` averaged over its first `views` dihedral views of the image (test-time augmentation), as one
    Keras model with the same inputs and output: exportable, scored and served like any variant."""
    if not 2 <= views <= DIHEDRAL_VIEWS:
        raise ValueError(f"test-time augmentation takes 2..{DIHEDRAL_VIEWS} views, not {views}")
    inputs = {name: tf_keras.Input(model.get_layer(name).output.shape[1:], name=name) for name in ("image", "metadata")}
    outputs = [
        model({"image": DihedralView(v, name=f"view_{v}")(inputs["image"]), "metadata": inputs["metadata"]})
        for v in range(views)
    ]
    return tf_keras.Model(inputs, tf_keras.layers.Average(name="tta_mean")(outputs), name=f"{model.name}_tta")


def fusion_weights(model: tf_keras.Model) -> dict[str, float] | None:
    """Current branch weights of the model's fusion layer, or None if it has none."""
    for layer in model.layers:
        if isinstance(layer, FusionLayer):
            return layer.branch_weights()
    return None


@contextmanager
def float32_policy() -> Iterator[None]:
    """Layers built inside compute in float32, whatever the global (mixed precision) policy."""
    previous = tf_keras.mixed_precision.global_policy()
    tf_keras.mixed_precision.set_global_policy("float32")
    try:
        yield
    finally:
        tf_keras.mixed_precision.set_global_policy(previous)


def float32_config(config: Any) -> Any:
    """A layer/model config with every mixed-precision dtype policy replaced by float32 (recursive)."""
    if isinstance(config, dict):
        if config.get("class_name") == "Policy":
            return "float32"
        return {key: float32_config(value) for key, value in config.items()}
    if isinstance(config, list):
        return [float32_config(value) for value in config]
    return config


def float32_copy(model: tf_keras.Model) -> tf_keras.Model:
    """`model` itself when it computes in float32, else a float32 twin with the same weights.

    Mixed precision (`--mixed-precision`) is a training setting: exports, TFLite conversion (which has
    no float16 kernels for most ops) and pruning (tfmot's masks are float32) use the float32 twin.
    The master weights are float32 either way, so nothing is lost.
    """
    if all(layer.dtype_policy.name == "float32" for layer in _all_layers(model)):
        return model
    with float32_policy():
        twin = model.__class__.from_config(float32_config(model.get_config()))
    twin.set_weights(model.get_weights())
    return twin


def walk_layers(model: tf_keras.Model, prefix: str = "") -> Iterator[tuple[str, tf_keras.layers.Layer]]:
    """(qualified name, layer) of every non-model layer, descending into nested models."""
    for layer in model.layers:
        if isinstance(layer, tf_keras.Model):
            yield from walk_layers(layer, f"{prefix}{layer.name}/")
        else:
            yield f"{prefix}{layer.name}", layer


def _all_layers(model: tf_keras.Model) -> Iterator[tf_keras.layers.Layer]:
    return (layer for _, layer in walk_layers(model))


def trainable_batchnorms(model: tf_keras.Model) -> list[tf_keras.layers.BatchNormalization]:
    """The model's BatchNorm layers that train (a fine-tuned backbone's), nested models included."""
    return [
        layer
        for layer in _all_layers(model)
        if isinstance(layer, tf_keras.layers.BatchNormalization) and layer.trainable
    ]


def recalibrate_batchnorm(
    model: tf_keras.Model, batches: Any, max_batches: int = 100, forward: Callable[[Any], Any] | None = None
) -> int:
    """Precise BatchNorm: set every trainable BatchNorm's moving mean/variance to the average of its
    batch statistics over up to `max_batches` training batches (forward passes only, no gradient step).

    Moving averages with momentum 0.99 need hundreds of steps to forget their initial values; after a
    short fine-tune they lag the weights they normalise, and inference-mode outputs collapse (one class
    for every image) although training accuracy rose. Here each compiled forward pass runs with
    momentum 0 (the moving statistics become that batch's), and their mean over the batches is kept.
    Frozen BatchNorm layers (a frozen backbone) run in inference mode and are left alone. Returns the
    number of batches used (0: nothing to do). By default on a model outside any distribution strategy;
    `forward` (features → None, e.g. a `strategy.run` per replica over distributed `batches`) replaces the
    plain training-mode call — a tf.function first traced here, so it sees momentum 0 (`FreshBatchNorm`
    keeps one across epochs).
    """
    layers = trainable_batchnorms(model)
    if not layers:
        return 0
    momenta = [layer.momentum for layer in layers]
    sums = [[tf.zeros_like(layer.moving_mean), tf.zeros_like(layer.moving_variance)] for layer in layers]
    used = 0
    try:
        for layer in layers:
            layer.momentum = 0.0  # read when the forward pass is traced
        if forward is None:
            forward = tf.function(lambda features: model(features, training=True), reduce_retracing=True)
        for features, *_ in itertools.islice(iter(batches), max_batches):
            forward(features)
            used += 1
            for total, layer in zip(sums, layers, strict=True):
                total[0] += layer.moving_mean
                total[1] += layer.moving_variance
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
    if used:
        for (mean, variance), layer in zip(sums, layers, strict=True):
            layer.moving_mean.assign(mean / used)
            layer.moving_variance.assign(variance / used)
    return used


class ModelSaveError(ModelError):
    """A model the run could not write (a full disk): the run failed on the way (exit 1); a rerun resumes."""

    exit_code = 1


def save_model(model: tf_keras.Model, folder: str | Path) -> Path:
    """`folder/model.keras`: config + weights in one zip, seconds to write (a SavedModel takes ~1 min).

    Without optimizer state: Adam's two moments would triple the file of a fine-tuned model, and
    resuming uses the training checkpoints, not this export. Always float32 compute (`float32_copy`).
    Atomic: written under a temporary name in `folder`, then renamed, so a failed write (a full disk)
    leaves the previous file, if any, and no partial one that a later load would trip over.
    """
    path = Path(folder) / KERAS_FILE
    model = float32_copy(model)
    # The temporary name ends in .keras too: Keras picks the file format from the name.
    partial = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:12]}{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A fresh functional wrapper over the same layers has no optimizer attached (the .keras format
        # has no include_optimizer switch).
        tf_keras.Model(inputs=model.input, outputs=model.output, name=model.name).save(str(partial))
        os.replace(partial, path)
    except OSError as exc:
        full = " (the disk is full)" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise ModelSaveError(
            f"cannot write model {path}{full}: {one_line(exc)}; no partial file was kept. Free the space, then rerun "
            "the same command with the same --run-id: the run resumes from its last backup"
        ) from exc
    finally:
        partial.unlink(missing_ok=True)
    return path


def save_recalibrated(model: tf_keras.Model, folder: str | Path, batches: Any) -> int:
    """`save_model`, with the trainable BatchNorm statistics re-estimated first (`recalibrate_batchnorm`).

    The re-estimation runs eagerly on a reloaded float32 copy, outside any distribution strategy; the
    export is rewritten from it and its statistics are copied back into `model` (which may live in a
    strategy), so the model evaluated next and the file exported agree. Returns the batches used.
    """
    save_model(model, folder)
    copy = load_model(folder)
    used = recalibrate_batchnorm(copy, batches)
    if used:
        save_model(copy, folder)
        model.set_weights(copy.get_weights())
    return used


def load_model(path: str | Path, trust_code: bool = False) -> tf_keras.Model:
    """Reload a saved model: a .keras file, a folder holding one, a Keras SavedModel folder or a legacy .h5.

    Unless `trust_code`, its config is checked first (`check_model_file`) and a .keras file loads in
    Keras' safe_mode. `trust_code=True` (`--trust-model-code`, a file the user wrote) lets its code run.
    """
    path = Path(path)
    if path.is_dir() and (path / KERAS_FILE).is_file():
        path = path / KERAS_FILE
    if not trust_code:
        check_model_file(path)
    try:
        return tf_keras.models.load_model(str(path), safe_mode=not trust_code)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(f"cannot load model {path}: {one_line(exc)}") from exc


__all__ = [
    "CLASS_NAMES",
    "BalancedAccuracy",
    "FusionLayer",
    "ModelError",
    "ModelSaveError",
    "build_model",
    "check_model_file",
    "compile_model",
    "float32_config",
    "float32_copy",
    "float32_policy",
    "fusion_weights",
    "load_model",
    "recalibrate_batchnorm",
    "save_model",
    "save_recalibrated",
    "set_temperature",
]
