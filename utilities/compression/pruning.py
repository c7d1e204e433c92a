"""Magnitude pruning of a trained model: `prune` fine-tunes a copy under a pruning schedule and strips it.

    stripped, info = pruning.prune(model, datasets, target_sparsity=0.5, epochs=2, learning_rate=1e-5)
    # info: {"sparsity": {layer: zeros fraction}, "sparsity_overall": float}

`Pruning` is the job's step (the `pruned` variant): `prune` with the run's settings; the driver
(`utilities.compression`) saves, evaluates and sizes what it produces.

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
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf  # utilities/__init__.py (run first, as our package) selected Keras 2
import tf_keras

from utilities.errors import CompressionError
from utilities.model import FusionLayer, compile_model, float32_config, float32_policy, walk_layers
from utilities.run.callbacks import EpochLogger, fit_callbacks
from utilities.run.config import Config

MIN_PRUNE_WEIGHTS = 1024  # smaller kernels add nothing to the file but their pruning costs accuracy
PRUNE_RAMP = 0.75  # sparsity reaches its target after this fraction of the fine-tune steps
MASK_UPDATES = 20  # about this many mask updates along the ramp
PRUNE_LR_FACTOR = 0.1  # pruning fine-tune learning rate = this × --learning-rate (see the module doc)


# ====================================================================== prune: the whole fine-tune


def prune(
    model: tf_keras.Model,
    data,
    *,
    target_sparsity: float,
    epochs: int,
    learning_rate: float,
    strategy: tf.distribute.Strategy | None = None,
    train_batchnorm: bool = False,
    jit: bool = False,
    steps_per_epoch: int | None = None,
    backup_dir: Path | None = None,
    tracker=None,
    progress_seconds: float = 30.0,
) -> tuple[tf_keras.Model, dict[str, Any]]:
    """A pruned, stripped copy of `model` (left untouched) and {"sparsity", "sparsity_overall"}.

    `data`: `.train` (one epoch, finite), `.val` (or None), `.class_weights`, `.steps_per_epoch["train"]`
    (the schedule's length; `steps_per_epoch` overrides it and caps each epoch). `train_batchnorm`: see
    `trainable_copy`. `backup_dir`: a rerun resumes the fine-tune there (masks and pruning step are
    model variables). `tracker`: per-epoch rows `pruned/…`. The copy is built inside `strategy.scope()`.
    """
    strategy = strategy or tf.distribute.get_strategy()
    total_steps = (steps_per_epoch or int(data.steps_per_epoch["train"])) * epochs
    with strategy.scope():
        pruned, wrapped = build_pruned_model(model, pruning_schedule(target_sparsity, total_steps), train_batchnorm)
        # tfmot updates its masks through merge_call, which MirroredStrategy refuses inside an XLA
        # function: the fine-tune is compiled only with one replica.
        compile_model(pruned, learning_rate, jit=jit and strategy.num_replicas_in_sync == 1)
    loggers = [] if tracker is None else [EpochLogger(tracker, prefix="pruned")]
    fine_tune(pruned, data, epochs, steps_per_epoch, backup_dir, loggers, progress_seconds)
    stripped = strip(pruned, strategy)
    return stripped, {
        "sparsity": measure_sparsity(stripped, wrapped),
        "sparsity_overall": overall_sparsity(stripped, wrapped),
    }


def fine_tune(pruned, data, epochs, steps_per_epoch, backup_dir, loggers, progress_seconds: float) -> None:
    """`fit` with the pruning callbacks: tfmot's step counter after the restore (it reads the restored step)."""
    import tensorflow_model_optimization as tfmot

    verbose, callbacks = fit_callbacks(
        "pruning fine-tune",
        progress_seconds=progress_seconds,
        restore_dir=backup_dir,
        hooks=[tfmot.sparsity.keras.UpdatePruningStep()],
        loggers=loggers,
    )
    pruned.fit(
        data.train,
        validation_data=data.val,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        class_weight=data.class_weights,
        callbacks=callbacks,
        verbose=verbose,
    )


def strip(pruned: tf_keras.Model, strategy: tf.distribute.Strategy) -> tf_keras.Model:
    """The plain model under the wrappers (pruned kernels, zeros included), float32 like the copy."""
    import tensorflow_model_optimization as tfmot

    with strategy.scope(), float32_policy():
        return tfmot.sparsity.keras.strip_pruning(pruned)


@dataclass(frozen=True)
class Pruning:
    """The `pruned` variant's step: `prune` at PRUNE_LR_FACTOR × the training rate, BatchNorm as trained."""

    config: Config
    checkpoints: Path  # the run's checkpoint folder: the fine-tune backs up into `pruned_backup/`
    tracker: Any

    def produce(self, model: tf_keras.Model, data, strategy) -> tuple[tf_keras.Model, dict[str, Any]]:
        c, train = self.config.compression, self.config.train
        return prune(
            model,
            data,
            target_sparsity=c.target_sparsity,
            epochs=c.prune_epochs,
            learning_rate=train.learning_rate * PRUNE_LR_FACTOR,
            strategy=strategy,
            train_batchnorm=self.config.model.fine_tune,  # BatchNorm as the backbone was trained
            jit=train.jit,
            backup_dir=Path(self.checkpoints) / "pruned_backup",
            tracker=self.tracker,
            progress_seconds=train.progress_seconds,
        )


# ====================================================================== schedule, wrappers, copies, sparsity


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


def measure_sparsity(model: tf_keras.Model, layer_ids: set[int]) -> dict[str, float]:
    """Fraction of exact zeros in each pruned layer's kernel, by qualified layer name."""
    return {
        name: float(np.mean(layer.kernel.numpy() == 0)) for name, layer in walk_layers(model) if id(layer) in layer_ids
    }


def overall_sparsity(model: tf_keras.Model, layer_ids: set[int]) -> float:
    """Zeros over all pruned kernels' weights (weighted by kernel size)."""
    kernels = [layer.kernel.numpy() for _, layer in walk_layers(model) if id(layer) in layer_ids]
    return float(sum(int(np.sum(k == 0)) for k in kernels) / max(1, sum(k.size for k in kernels)))


__all__ = [
    "MIN_PRUNE_WEIGHTS",
    "PRUNE_LR_FACTOR",
    "Pruning",
    "build_pruned_model",
    "copy_weights",
    "measure_sparsity",
    "overall_sparsity",
    "prune",
    "pruning_schedule",
    "trainable_copy",
]
