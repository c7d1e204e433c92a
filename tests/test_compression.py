"""Pruning and distillation on tiny models and data: sparsity reached, teacher untouched, one loss for
both training paths, per-replica batches, resume, tracking, and per-variant failure isolation.

    .venv/bin/python -m pytest tests/test_compression.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf  # conftest.py set TF_USE_LEGACY_KERAS=1: tf_keras is Keras 2
import tf_keras

from utilities import compression
from utilities.compression import distillation, losses, pruning, replica_loop
from utilities.errors import CompressionError
from utilities.evaluation import metrics as evaluation
from utilities.evaluation import variants as variant_eval
from utilities.model import FusionLayer, ModelError, build_model, compile_model, load_model, save_model, walk_layers
from utilities.run.config import CompressionConfig, Config, DataConfig, ModelConfig, TrainConfig
from utilities.run.fields import ConfigError
from utilities.run.folder import RunFolder

REPO = Path(__file__).resolve().parents[1]
SIZE = 32  # pixels


# ---------------------------------------------------------------------- toy data, models, stand-ins


@dataclass
class ToyDatasets:
    """Shaped like utilities.data.pipeline.Datasets: batches of ({"image", "metadata"}, one-hot)."""

    train: tf.data.Dataset
    val: tf.data.Dataset
    test: tf.data.Dataset
    class_weights: dict[int, float]
    counts: dict[str, int]
    steps_per_epoch: dict[str, int]


def toy_arrays(n: int, seed: int, size: int = SIZE) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Learnable toy data: a class colour in the image (+ noise), the class as the site bit 70 % of the time."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 8, n)
    palette = np.stack([(np.arange(8) * k) % 256 for k in (37, 91, 151)], axis=1)  # (8, 3) RGB per class
    images = palette[labels][:, None, None, :] + rng.normal(0, 40, (n, size, size, 3))
    metadata = np.zeros((n, 28), np.float32)
    metadata[np.arange(n), rng.integers(0, 18, n)] = 1  # an age bin
    site = np.where(rng.random(n) < 0.7, labels, rng.integers(0, 8, n))
    metadata[np.arange(n), 18 + site] = 1
    features = {"image": np.clip(images, 0, 255).astype(np.float32), "metadata": metadata}
    return features, tf_keras.utils.to_categorical(labels, 8).astype(np.float32)


def toy_datasets(n_train: int = 128, n_eval: int = 48, batch: int = 16, seed: int = 0) -> ToyDatasets:
    def dataset(n: int, s: int) -> tf.data.Dataset:
        return tf.data.Dataset.from_tensor_slices(toy_arrays(n, s)).batch(batch)

    counts = np.bincount(toy_arrays(n_train, seed)[1].argmax(1), minlength=8)
    weights = {i: float(n_train / (8 * c)) for i, c in enumerate(counts) if c}
    steps = {"train": -(-n_train // batch), "val": -(-n_eval // batch), "test": -(-n_eval // batch)}
    sizes = {"train": n_train, "val": n_eval, "test": n_eval}
    return ToyDatasets(
        dataset(n_train, seed), dataset(n_eval, seed + 1), dataset(n_eval, seed + 2), weights, sizes, steps
    )


def run_folder(path: Path) -> RunFolder:
    """A local run's folder, as training.run opens it."""
    return RunFolder(path, str(path), publish=True)


def tiny_model(size: int = SIZE, bn_momentum: float = 0.99) -> tf_keras.Model:
    """build_model's structure in miniature: a nested, frozen conv backbone called with training=False."""
    inputs = tf_keras.Input((size, size, 3))
    x = inputs
    for i, width in enumerate((32, 64, 64)):
        x = tf_keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = tf_keras.layers.BatchNormalization(momentum=bn_momentum, name=f"bn{i}")(x)
        x = tf_keras.layers.ReLU(name=f"relu{i}")(x)
        x = tf_keras.layers.MaxPooling2D(name=f"pool{i}")(x)
    backbone = tf_keras.Model(inputs, tf_keras.layers.GlobalAveragePooling2D()(x), name="backbone")
    backbone.trainable = False
    image = tf_keras.Input((size, size, 3), name="image")
    metadata = tf_keras.Input((28,), name="metadata")
    features = backbone(tf_keras.layers.Rescaling(1 / 255.0, name="scale")(image), training=False)
    image_logits = tf_keras.layers.Dense(8, name="image_logits")(features)
    hidden = tf_keras.layers.Dense(64, activation="relu", name="metadata_dense")(metadata)
    metadata_logits = tf_keras.layers.Dense(8, name="metadata_logits")(hidden)
    probs = FusionLayer(name="fusion")([image_logits, metadata_logits])
    return tf_keras.Model({"image": image, "metadata": metadata}, probs, name="tiny")


def trained_tiny_model(datasets: ToyDatasets, epochs: int = 2) -> tf_keras.Model:
    tf_keras.utils.set_random_seed(0)
    model = tiny_model()
    model.get_layer("backbone").trainable = True  # give the toy backbone real features first
    compile_model(model, 3e-3)
    model.fit(datasets.train, epochs=epochs, class_weight=datasets.class_weights, verbose=0)
    return model


def fine_tuned_tiny_model(datasets: ToyDatasets, learning_rate: float, epochs: int) -> tf_keras.Model:
    """As build_model with --fine-tune: backbone called with training=None, BatchNorm in training mode."""
    tf_keras.utils.set_random_seed(0)
    frozen = tiny_model(bn_momentum=0.9)
    backbone = frozen.get_layer("backbone")
    backbone.trainable = True
    image = tf_keras.Input((SIZE, SIZE, 3), name="image")
    metadata = tf_keras.Input((28,), name="metadata")
    features = backbone(frozen.get_layer("scale")(image))
    logits = [frozen.get_layer(name) for name in ("image_logits", "metadata_dense", "metadata_logits")]
    probs = frozen.get_layer("fusion")([logits[0](features), logits[2](logits[1](metadata))])
    model = tf_keras.Model({"image": image, "metadata": metadata}, probs, name="tiny_fine_tuned")
    compile_model(model, learning_rate)
    model.fit(datasets.train, epochs=epochs, class_weight=datasets.class_weights, verbose=0)
    return model


class ListTracker:
    """Stand-in for utilities.run.tracking.Tracker: keeps the logged rows."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def log(self, metrics: dict[str, Any], step: int | None = None, commit: bool = True) -> None:
        self.rows.append(dict(metrics))


def batchnorm_layers(model: tf_keras.Model) -> list[tf_keras.layers.BatchNormalization]:
    return [layer for _, layer in walk_layers(model) if isinstance(layer, tf_keras.layers.BatchNormalization)]


def snapshot(model: tf_keras.Model) -> list[np.ndarray]:
    return [w.numpy().copy() for w in model.weights]


def unchanged(before: list[np.ndarray], model: tf_keras.Model) -> bool:
    return all(np.array_equal(b, w.numpy()) for b, w in zip(before, model.weights, strict=True))


def student(filters: int = 8, dropout: float = 0.0, seed: int = 0) -> tf_keras.Model:
    tf_keras.utils.set_random_seed(seed)
    return distillation.build_student(SIZE, filters, dropout)


# ---------------------------------------------------------------------- input checks


def _config(**compression: Any) -> Config:
    return Config(
        data=DataConfig(image_size=SIZE),
        model=ModelConfig(fine_tune=False),
        compression=CompressionConfig(**compression),
    )


def test_check_inputs_rejects_bad_combinations_with_one_line_errors(tmp_path):
    corrupt = tmp_path / "teacher.keras"
    corrupt.write_bytes(b"not a model")
    cases = [
        (_config(distill=True, teacher=str(tmp_path / "missing")), None, ModelError, "does not exist"),
        (_config(distill=True, teacher=str(corrupt)), None, ModelError, "cannot load"),
        (_config(quantize=("int8",)), 0, ConfigError, "-q int8 need training examples"),
        (_config(prune=True, quantize=("dynamic",)), 0, ConfigError, "-p need training examples"),
    ]
    for config, train_examples, error, text in cases:
        with pytest.raises(error) as info:
            compression.check_inputs(config, train_examples)
        assert text in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="--teacher is only used with"):  # a config rule: refused by cli.py
        _config(teacher=str(corrupt))
    compression.check_inputs(_config(quantize=("int8",)), 10)  # fine with data
    compression.check_inputs(_config(quantize=("dynamic",)), 0)  # dynamic range needs no calibration


def test_teacher_with_the_wrong_input_size_is_rejected(tmp_path):
    path = tmp_path / "teacher"
    distillation.build_student(64, 4).save(str(path))
    with pytest.raises(ModelError, match=r"takes .* expected") as info:
        compression.check_inputs(_config(distill=True, teacher=str(path)))
    assert "\n" not in str(info.value)
    distillation.load_teacher(str(path), 64)  # the right size loads


# ---------------------------------------------------------------------- pruning


def test_pruning_schedule_reaches_the_target_on_its_last_mask_update():
    for total in (2, 8, 50, 625, 10_000):
        schedule = pruning.pruning_schedule(0.6, total)
        should_prune, sparsity = schedule(tf.constant(schedule.end_step, tf.int64))
        assert bool(should_prune) and float(sparsity) == pytest.approx(0.6)
        assert 1 <= schedule.end_step <= total * pruning.PRUNE_RAMP
    with pytest.raises(CompressionError, match="at least 2 training steps"):
        pruning.pruning_schedule(0.5, 1)


def test_pruned_copy_predicts_like_the_float_model_before_any_pruning_step():
    """Copy, weight transfer, BatchNorm mode and the dropped `training=False` change no prediction."""
    datasets = toy_datasets(n_train=32, n_eval=16)
    features, _ = next(iter(datasets.val))
    frozen, fine_tuned = trained_tiny_model(datasets, epochs=1), fine_tuned_tiny_model(datasets, 3e-3, epochs=1)
    for model, train_batchnorm in ((frozen, False), (fine_tuned, True)):
        pruned, wrapped = pruning.build_pruned_model(model, pruning.pruning_schedule(0.5, 10), train_batchnorm)
        np.testing.assert_allclose(pruned(features, training=False), model(features, training=False), atol=1e-6)
        batchnorm = batchnorm_layers(pruned)
        assert len(batchnorm) == 3 and all(layer.trainable == train_batchnorm for layer in batchnorm)
        assert len(wrapped) == 3


def test_a_mixed_precision_model_is_pruned_in_float32_and_pruning_and_distillation_run_under_xla(
    mixed_precision, tmp_path
):
    """tfmot's masks are float32: the pruned copy of a mixed-precision model computes in float32."""
    import tensorflow_model_optimization as tfmot

    datasets = toy_datasets(n_train=32, n_eval=16)
    model = tiny_model()
    assert model.get_layer("image_logits").compute_dtype == "float16"
    pruned, layer_ids = pruning.build_pruned_model(model, pruning.pruning_schedule(0.5, 4))
    assert {layer.compute_dtype for _, layer in walk_layers(pruned)} == {"float32"}
    compile_model(pruned, 1e-4, jit=True)  # as the pruning step compiles it under --jit
    pruned.fit(datasets.train, epochs=2, callbacks=[tfmot.sparsity.keras.UpdatePruningStep()], verbose=0)
    stripped = tfmot.sparsity.keras.strip_pruning(pruned)
    assert pruning.overall_sparsity(stripped, layer_ids) == pytest.approx(0.5, abs=0.01)

    loss_fn = losses.DistillationLoss(3.0, 0.3, losses.class_weight_vector(datasets.class_weights))
    summary = distillation.train_student(
        student(), model, loss_fn, datasets, strategy=tf.distribute.get_strategy(), epochs=1, patience=0,
        checkpoint_dir=tmp_path, tracker=ListTracker(), jit=True,
    )  # fmt: skip
    assert summary["epochs_run"] == 1


def test_pruning_fine_tunes_at_a_tenth_of_the_rate_with_batchnorm_as_the_backbone_was_trained(tmp_path, monkeypatch):
    """The demo-data collapse (val balanced accuracy 0.77 → 0.125): full training rate, BatchNorm frozen."""
    datasets = toy_datasets(n_train=32, n_eval=16)
    model = fine_tuned_tiny_model(datasets, 3e-3, epochs=1)
    compiled: list[tf_keras.Model] = []

    class Fitting(Exception):
        """The step got as far as its fine-tune."""

    def capture(pruned, *args):  # the model the pruning step is about to fine-tune, compiled
        compiled.append(pruned)
        raise Fitting

    monkeypatch.setattr(pruning, "fine_tune", capture)
    for fine_tune in (False, True):
        config = _run_config(prune=True).replace(model={"fine_tune": fine_tune}, train={"learning_rate": 3e-3})
        step = pruning.Pruning(config, run_folder(tmp_path).checkpoints, ListTracker())
        with pytest.raises(Fitting):
            step.produce(model, datasets, tf.distribute.get_strategy())
        assert float(compiled[-1].optimizer.learning_rate) == pytest.approx(3e-3 * pruning.PRUNE_LR_FACTOR)
        assert all(layer.trainable == fine_tune for layer in batchnorm_layers(compiled[-1]))


@pytest.mark.slow
def test_pruning_reaches_target_sparsity_strips_wrappers_and_shrinks_gzip(tmp_path):
    import tensorflow_model_optimization as tfmot
    from tensorflow_model_optimization.python.core.sparsity.keras.pruning_wrapper import PruneLowMagnitude

    datasets = toy_datasets()
    model = trained_tiny_model(datasets)
    before = snapshot(model)
    schedule = pruning.pruning_schedule(0.7, datasets.steps_per_epoch["train"] * 2)
    pruned, wrapped = pruning.build_pruned_model(model, schedule)
    compile_model(pruned, 1e-3)
    pruned.fit(
        datasets.train,
        epochs=2,
        class_weight=datasets.class_weights,
        callbacks=[tfmot.sparsity.keras.UpdatePruningStep()],
        verbose=0,
    )
    stripped = tfmot.sparsity.keras.strip_pruning(pruned)

    sparsity = pruning.measure_sparsity(stripped, wrapped)
    # conv0 (864 weights) and the 8-wide heads are below MIN_PRUNE_WEIGHTS; the fusion layer is never wrapped
    assert set(sparsity) == {"backbone/conv1", "backbone/conv2", "metadata_dense"}
    # tfmot keeps round(n·(1-s)) weights: the target up to one weight (< 1e-3 for these kernels)
    assert all(value >= 0.7 - 1e-3 for value in sparsity.values()), sparsity
    assert not any(isinstance(layer, PruneLowMagnitude) for _, layer in walk_layers(stripped))
    assert any(isinstance(layer, PruneLowMagnitude) for _, layer in walk_layers(pruned))
    assert unchanged(before, model)  # the float model is not the one being pruned
    save_model(model, tmp_path / "float")
    save_model(stripped, tmp_path / "pruned")
    float_gzip = evaluation.artifact_size(tmp_path / "float")["gzip_bytes"]
    assert evaluation.artifact_size(tmp_path / "pruned")["gzip_bytes"] < float_gzip


# ---------------------------------------------------------------------- distillation: one loss


def test_distillation_loss_combines_softened_kl_and_weighted_hard_labels():
    labels = tf.constant([[1.0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 1.0, 0, 0, 0, 0, 0]])
    teacher = tf.nn.softmax(tf.constant(np.random.default_rng(0).normal(size=(2, 8)), tf.float32))
    student_probs = tf.nn.softmax(tf.constant(np.random.default_rng(1).normal(size=(2, 8)), tf.float32))
    weights = [2.0, 1, 3.0, 1, 1, 1, 1, 1]
    hard = losses.DistillationLoss(4.0, 1.0, weights)(labels, teacher, student_probs).numpy()
    expected_hard = -np.log(student_probs.numpy()[[0, 1], [0, 2]]) * np.array([2.0, 3.0])
    np.testing.assert_allclose(hard, expected_hard, rtol=1e-5)
    # Soft term: KL between p^(1/T)-normalised distributions, times T², zero when student == teacher.
    soft = losses.DistillationLoss(4.0, 0.0, weights)
    assert np.allclose(soft(labels, teacher, teacher).numpy(), 0.0, atol=1e-6)
    p_t = teacher.numpy() ** 0.25 / (teacher.numpy() ** 0.25).sum(1, keepdims=True)
    p_s = student_probs.numpy() ** 0.25 / (student_probs.numpy() ** 0.25).sum(1, keepdims=True)
    np.testing.assert_allclose(
        soft(labels, teacher, student_probs).numpy(), 16 * (p_t * np.log(p_t / p_s)).sum(1), rtol=1e-4
    )
    with pytest.raises(ValueError, match="alpha = 1"):
        soft(labels, None, student_probs)


def test_distiller_and_replica_loop_share_one_loss_and_update():
    datasets = toy_datasets(n_train=16, n_eval=16)
    batch = next(iter(datasets.train))
    teacher = student(filters=4, seed=1)
    loss_fn = losses.DistillationLoss(3.0, 0.3, losses.class_weight_vector(datasets.class_weights))
    keras_student, loop_student = student(), student()  # same seed: same initial weights
    loop_student.set_weights(keras_student.get_weights())

    distiller = distillation.Distiller(keras_student, teacher, loss_fn)
    distiller.compile(optimizer=tf_keras.optimizers.Adam(1e-3))
    keras_loss = float(distiller.train_on_batch(*batch, return_dict=True)["loss"])

    strategy = tf.distribute.get_strategy()
    loop = replica_loop.ReplicaLoop(loop_student, teacher, loss_fn, strategy, 1e-3)
    distributed = next(iter(strategy.experimental_distribute_dataset(datasets.train)))
    loop_loss = loop.train_step(distributed)

    assert loop_loss == pytest.approx(keras_loss, rel=1e-5)
    for a, b in zip(keras_student.get_weights(), loop_student.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # the same gradient step
    assert loop.replica_batch_sizes == [[16]]


def test_mixed_precision_student_outputs_float32_and_both_paths_scale_the_loss(mixed_precision):
    """A loss of 1e-5 × the real one: its float16 gradients underflow to 0 without loss scaling (so
    Adam would leave the weights where they are); with scaling both training paths move them alike."""
    datasets = toy_datasets(n_train=16, n_eval=16)
    batch = next(iter(datasets.train))
    real = losses.DistillationLoss(3.0, 0.3, losses.class_weight_vector(datasets.class_weights))

    def tiny_loss(labels, teacher_probs, student_probs):
        return 1e-5 * real(labels, teacher_probs, student_probs)

    teacher = student(filters=4, seed=1)
    keras_student, loop_student = student(), student()
    loop_student.set_weights(keras_student.get_weights())
    conv = keras_student.get_layer("block1_conv")
    assert conv.compute_dtype == "float16" and conv.kernel.dtype == tf.float32  # float32 master weights
    assert keras_student(batch[0], training=False).dtype == tf.float32  # the fusion layer stays float32
    before = conv.kernel.numpy().copy()
    with tf.GradientTape() as tape:  # the premise: unscaled, every gradient of the first conv is 0
        loss, _ = losses.batch_loss(keras_student, teacher, tiny_loss, batch[0], batch[1], None, True)
    assert not np.any(tape.gradient(loss, conv.kernel).numpy())

    distiller = distillation.Distiller(keras_student, teacher, tiny_loss)
    distiller.compile(optimizer=tf_keras.optimizers.Adam(1e-3))
    distiller.train_on_batch(*batch)
    strategy = tf.distribute.get_strategy()
    loop = replica_loop.ReplicaLoop(loop_student, teacher, tiny_loss, strategy, 1e-3)
    loop.train_step(next(iter(strategy.experimental_distribute_dataset(datasets.train))))

    for optimizer in (distiller.optimizer, loop.optimizer):
        assert isinstance(optimizer, tf_keras.mixed_precision.LossScaleOptimizer)
    moved = np.abs(conv.kernel.numpy() - before)
    assert np.all(moved > 0) and np.median(moved) > 1e-5
    np.testing.assert_allclose(
        loop_student.get_layer("block1_conv").kernel.numpy(), conv.kernel.numpy(), rtol=1e-3, atol=1e-5
    )


# ---------------------------------------------------------------------- distillation: training paths


@pytest.mark.slow
def test_student_batchnorm_statistics_settle_within_a_short_run(tmp_path):
    """24 steps must leave inference-mode statistics that fit the data. With Keras' default momentum
    0.99 the first layer's moving mean was still 80 % off (demo data: val balanced accuracy at chance
    while train accuracy rose to 0.89); with the student's 0.9 it is ~12 % off."""
    datasets = toy_datasets(n_train=128, n_eval=16)  # 8 steps per epoch
    pupil = student()
    loss_fn = losses.DistillationLoss(1.0, 1.0, losses.class_weight_vector(datasets.class_weights))
    distillation.train_student(
        pupil, None, loss_fn, datasets, strategy=tf.distribute.get_strategy(), epochs=3, patience=0,
        checkpoint_dir=tmp_path / "ckpt", tracker=ListTracker(),
    )  # fmt: skip
    batchnorm = pupil.get_layer("block1_bn")
    conv = tf_keras.Model(pupil.inputs, pupil.get_layer("block1_conv").output)
    outputs = np.concatenate([conv(features).numpy().reshape(-1, 8) for features, _ in datasets.train])  # (N·S·S, 8)
    mean, variance = outputs.mean(axis=0), outputs.var(axis=0)
    assert np.abs(batchnorm.moving_mean.numpy() - mean).mean() / np.abs(mean).mean() < 0.3
    assert np.median(batchnorm.moving_variance.numpy() / variance) < 5  # 0.99 left it 15-20× too large


@pytest.mark.slow
def test_distiller_keeps_teacher_fixed_logs_epochs_and_saves_a_reloadable_student(tmp_path):
    datasets = toy_datasets()
    teacher = trained_tiny_model(datasets)
    before = snapshot(teacher)
    pupil, tracker = student(), ListTracker()
    loss_fn = losses.DistillationLoss(4.0, 0.1, losses.class_weight_vector(datasets.class_weights))
    summary = distillation.train_student(
        pupil, teacher, loss_fn, datasets, strategy=tf.distribute.get_strategy(), epochs=2, patience=0,
        checkpoint_dir=tmp_path / "ckpt", tracker=tracker,
    )  # fmt: skip
    assert summary["path"] == "distiller" and summary["epochs_run"] == 2
    assert unchanged(before, teacher)
    assert [row["student/epoch"] for row in tracker.rows] == [0, 1]
    assert {"student/train/loss", "student/val/balanced_accuracy", "student/train/accuracy"} <= set(tracker.rows[0])

    pupil.save(str(tmp_path / "student"))
    reloaded = load_model(tmp_path / "student")
    features, _ = next(iter(datasets.val))
    np.testing.assert_allclose(reloaded(features).numpy(), pupil(features).numpy(), atol=1e-6)


@pytest.mark.slow
def test_replica_loop_checkpoints_each_epoch_and_a_rerun_resumes(tmp_path):
    datasets = toy_datasets(n_train=64, n_eval=32)
    teacher = student(filters=4, seed=1)
    before = snapshot(teacher)
    loss_fn = losses.DistillationLoss(4.0, 0.1, losses.class_weight_vector(datasets.class_weights))
    common = dict(strategy=tf.distribute.get_strategy(), patience=0, checkpoint_dir=tmp_path / "ckpt", force_loop=True)

    first = distillation.train_student(student(), teacher, loss_fn, datasets, epochs=1, tracker=ListTracker(), **common)
    tracker = ListTracker()
    second = distillation.train_student(
        student(seed=5), teacher, loss_fn, datasets, epochs=2, tracker=tracker, **common
    )

    assert first["resumed_from_epoch"] == 0 and first["epochs_run"] == 1
    assert second["resumed_from_epoch"] == 1 and second["epochs_run"] == 2
    assert [row["student/epoch"] for row in tracker.rows] == [1]  # only the missing epoch ran
    assert unchanged(before, teacher)
    with pytest.raises(CompressionError, match="does not match this student and optimizer"):
        distillation.train_student(student(filters=4), teacher, loss_fn, datasets, epochs=3, tracker=tracker, **common)


def test_resuming_a_float32_loop_checkpoint_with_mixed_precision_fails_in_one_line(mixed_precision, tmp_path):
    from utilities.model import float32_policy

    datasets = toy_datasets(n_train=16, n_eval=16)
    weights = losses.class_weight_vector(datasets.class_weights)
    loss_fn = losses.DistillationLoss(4.0, 1.0, weights)  # no teacher
    common = dict(strategy=tf.distribute.get_strategy(), patience=0, checkpoint_dir=tmp_path, force_loop=True)
    with float32_policy():  # written without loss scaling
        distillation.train_student(student(), None, loss_fn, datasets, epochs=1, tracker=ListTracker(), **common)
    with pytest.raises(CompressionError, match="does not match this student and optimizer") as caught:
        distillation.train_student(student(), None, loss_fn, datasets, epochs=2, tracker=ListTracker(), **common)
    assert "\n" not in str(caught.value)


@pytest.mark.slow
def test_replica_loop_stops_early_and_restores_the_best_student(tmp_path):
    datasets = toy_datasets(n_train=64, n_eval=32)
    pupil = student()
    loss_fn = losses.DistillationLoss(1.0, 1.0, losses.class_weight_vector(datasets.class_weights))
    strategy = tf.distribute.get_strategy()
    loop = replica_loop.ReplicaLoop(pupil, None, loss_fn, strategy, learning_rate=0.05)  # a noisy climb
    scores: list[float] = []
    summary = loop.fit(
        datasets, 6, 1, tmp_path / "ckpt", lambda epoch, logs: scores.append(logs["val_balanced_accuracy"])
    )
    assert summary["epochs_run"] == len(scores)
    assert summary["best_val_balanced_accuracy"] == pytest.approx(max(scores))
    if len(scores) < 6:  # stopped early: the last epoch did not improve on the best
        assert scores[-1] <= max(scores[:-1])
    metric = loop.metrics["val"][1]  # BalancedAccuracy of the restored student
    metric.reset_state()
    for features, labels in datasets.val:
        metric.update_state(labels, pupil(features, training=False))
    assert float(metric.result()) == pytest.approx(max(scores), abs=1e-6)


@pytest.mark.slow
def test_student_epochs_reach_the_wandb_offline_history(tmp_path, monkeypatch):
    from utilities.run import tracking
    from utilities.run.config import TrackingConfig

    monkeypatch.setenv("WANDB_MODE", "offline")
    datasets = toy_datasets(n_train=32, n_eval=16)
    tracker = tracking.start_tracking(
        TrackingConfig(enabled=True, mode="offline", wandb_dir=str(tmp_path)), "student-test", "run1", {}, is_chief=True
    )
    tracker.log({"epoch/loss": 1.0})  # the main fit already advanced W&B's step
    loss_fn = losses.DistillationLoss(4.0, 0.1, losses.class_weight_vector(datasets.class_weights))
    distillation.train_student(
        student(), student(seed=1), loss_fn, datasets, strategy=tf.distribute.get_strategy(), epochs=2, patience=0,
        checkpoint_dir=tmp_path / "ckpt", tracker=tracker, force_loop=True,
    )  # fmt: skip
    run_dir = tracker.run_dir
    tracker.finish(0)
    rows = [row for row in tracking.read_offline_history(run_dir) if "student/epoch" in row]
    assert [row["student/epoch"] for row in rows] == [0, 1]
    assert all({"student/train/loss", "student/val/balanced_accuracy"} <= set(row) for row in rows)
    axes = {
        (r.metric.glob_name, r.metric.step_metric)
        for r in tracking.read_offline_records(run_dir)
        if r.WhichOneof("record_type") == "metric"
    }
    assert ("student/*", "student/epoch") in axes  # charts plot student metrics against student epochs


# ---------------------------------------------------------------------- two replicas (own process)

_TWO_REPLICAS = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    from utilities.run import distribution
    distribution.configure_devices(2)  # before any TensorFlow op
    import tensorflow as tf
    from tests.test_compression import ListTracker, run_folder, _run_config, snapshot, toy_datasets, trained_tiny_model, unchanged
    from utilities import compression
    from utilities.compression import distillation, losses, replica_loop

    strategy = distribution.build_strategy(2, None)
    datasets = toy_datasets(n_train=64, n_eval=32, batch=16)
    out = {{"replicas": strategy.num_replicas_in_sync}}
    with strategy.scope():
        teacher = trained_tiny_model(datasets, epochs=1)
    before = snapshot(teacher)

    # The whole pruning step (clone inside the scope, fine-tune, strip, save) and TFLite export.
    config = _run_config(prune=True, prune_epochs=2, quantize=("dynamic",))
    variants = compression.run_variants(config, teacher, datasets, run_folder(Path({tmp!r})), strategy, ListTracker())
    out["variants"] = {{name: result.metrics.to_json() for name, result in variants.items()}}

    # The per-replica distillation loop, with its batch-size hook.
    with strategy.scope():
        student = distillation.build_student(32, 8, 0.0)
    loss_fn = losses.DistillationLoss(4.0, 0.1, losses.class_weight_vector(datasets.class_weights))
    loop = replica_loop.ReplicaLoop(student, teacher, loss_fn, strategy, 1e-3)
    logs = []
    summary = loop.fit(datasets, 2, 0, Path({tmp!r}) / "loop", lambda epoch, row: logs.append(row))
    out.update(replica_batch_sizes=loop.replica_batch_sizes, teacher_unchanged=unchanged(before, teacher))
    out.update(summary=summary, logs=logs)
    print("RESULT " + json.dumps(out, default=str))
    """
)


@pytest.mark.slow
def test_pruning_and_distillation_loop_on_two_replicas(tmp_path):
    script = _TWO_REPLICAS.format(repo=str(REPO), tmp=str(tmp_path))
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600, cwd=REPO
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT ") :])
    assert out["replicas"] == 2
    pruned = out["variants"]["pruned"]
    assert "error" not in pruned, pruned
    assert len(pruned["sparsity"]) == 3 and min(pruned["sparsity"].values()) >= 0.5 - 1e-3
    assert "error" not in out["variants"]["pruned_dynamic"], out["variants"]["pruned_dynamic"]
    assert (tmp_path / "pruned" / "model.keras").exists() and (tmp_path / "model_dynamic.tflite").exists()
    # 64 examples in global batches of 16: 4 steps per epoch, 8 examples on each replica every step.
    assert out["replica_batch_sizes"] == [[8, 8]] * 8
    assert out["teacher_unchanged"]
    assert all(np.isfinite(logs["loss"]) and np.isfinite(logs["val_loss"]) for logs in out["logs"])
    assert out["summary"]["path"] == "replica_loop" and out["summary"]["epochs_run"] == 2


# ---------------------------------------------------------------------- run_variants


def _run_config(**compression: Any) -> Config:
    return Config(
        data=DataConfig(image_size=SIZE),
        model=ModelConfig(weights="none", fcnn_nodes=16, dropout=0.0, fine_tune=False),
        train=TrainConfig(batch_size=16, epochs=1, patience=0),
        compression=CompressionConfig(student_filters=8, **compression),
    )


@pytest.mark.slow
def test_run_variants_records_a_failing_variant_and_keeps_the_others(tmp_path, monkeypatch, caplog):
    datasets = toy_datasets(n_train=64, n_eval=32)
    model = trained_tiny_model(datasets, epochs=1)
    folder = run_folder(tmp_path)
    save_model(model, folder.path("model"))  # as training.run does: the variants' sizes compare like with like

    def broken_student(*args, **kwargs):
        raise RuntimeError("disk full\nsecond line")

    monkeypatch.setattr(distillation, "build_student", broken_student)
    config = _run_config(prune=True, prune_epochs=2, distill=True, quantize=("dynamic",))
    results = compression.run_variants(config, model, datasets, folder, tf.distribute.get_strategy(), ListTracker())
    variants = {name: result.metrics.to_json() for name, result in results.items()}

    assert variants["student"] == {"error": "RuntimeError: disk full"} and not results["student"].probabilities
    assert "variant student failed: RuntimeError: disk full" in caplog.text
    assert set(variants) == {"pruned", "student", "model_dynamic", "pruned_dynamic"}
    for name, artifact in (
        ("pruned", "pruned"),
        ("model_dynamic", "model_dynamic.tflite"),
        ("pruned_dynamic", "pruned_dynamic.tflite"),
    ):
        assert folder.path(artifact).exists()
        assert {"val", "test", "agreement", "gzip_bytes", "latency_ms"} <= set(variants[name])
    assert min(variants["pruned"]["sparsity"].values()) >= 0.5 - 1e-3
    assert variants["pruned"]["gzip_ratio_vs_float"] > 1.0
    assert variants["model_dynamic"]["agreement"] >= 0.9
    reloaded = load_model(folder.path("pruned"))  # a plain model again: no pruning wrappers to register
    features, _ = next(iter(datasets.val))
    np.testing.assert_allclose(reloaded(features).numpy(), results["pruned"].probabilities["val"][:16], atol=1e-5)


@pytest.mark.slow
def test_run_variants_distills_from_a_teacher_file_and_quantizes_the_student(tmp_path):
    datasets = toy_datasets(n_train=64, n_eval=32)
    model = trained_tiny_model(datasets, epochs=1)
    model.save(str(tmp_path / "teacher"))
    folder = run_folder(tmp_path / "run")
    config = _run_config(distill=True, teacher=str(tmp_path / "teacher"), student_epochs=2, quantize=("int8",))
    compression.check_inputs(config, train_examples=64)  # what training.run does before fitting
    tracker = ListTracker()
    results = compression.run_variants(config, model, datasets, folder, tf.distribute.get_strategy(), tracker)
    variants = {name: result.metrics.to_json() for name, result in results.items()}

    assert set(variants) == {"student", "model_int8", "student_int8"}
    assert all("error" not in v for v in variants.values()), variants
    student_variant = variants["student"]
    assert student_variant["teacher"] == str(tmp_path / "teacher")
    assert student_variant["training"]["path"] == "distiller" and student_variant["training"]["epochs_run"] == 2
    assert student_variant["params"] < model.count_params()
    assert [row["student/epoch"] for row in tracker.rows] == [0, 1]
    assert load_model(folder.path("student")).name == "student"
    assert (
        folder.path("student_int8.tflite").stat().st_size
        < evaluation.artifact_size(folder.path("student"))["size_bytes"]
    )


@pytest.mark.slow
def test_densenet_model_pruned_in_backbone_and_heads_shrinks_gzip(tmp_path):
    """The real model (frozen DenseNet121, random weights, 32 px): the backbone is what gets smaller."""
    datasets = toy_datasets(n_train=32, n_eval=16)  # 2 steps: the fewest a pruning schedule accepts
    config = _run_config(prune=True, prune_epochs=1, target_sparsity=0.5)
    model = build_model(config.model, SIZE)
    compile_model(model, 1e-3)
    folder = run_folder(tmp_path)
    # model/model.keras as training.run saves it (seconds; a SavedModel of DenseNet takes ~1 min), so the
    # ratio compares .keras with .keras as in a real run.
    save_model(model, folder.path("model"))
    variants = compression.run_variants(config, model, datasets, folder, tf.distribute.get_strategy(), ListTracker())
    pruned = variants["pruned"].metrics.to_json()
    assert "error" not in pruned, pruned
    backbone_layers = [name for name in pruned["sparsity"] if name.startswith("densenet121/")]
    assert len(backbone_layers) == 120 and "image_logits" in pruned["sparsity"]
    assert min(pruned["sparsity"].values()) >= 0.5 - 1e-3
    print(
        f"\nDenseNet121 32px pruned 50%: gzip {pruned['gzip_bytes']:,} B, ratio vs float {pruned['gzip_ratio_vs_float']}"
    )
    assert pruned["gzip_ratio_vs_float"] >= 1.3


@pytest.mark.slow
def test_distilled_and_scratch_students_both_learn(tmp_path, record_property):
    """Student vs teacher vs the same student from scratch (alpha=1, no teacher); numbers for the report."""
    datasets = toy_datasets(n_train=192, n_eval=96)
    teacher = trained_tiny_model(datasets, epochs=4)
    weights = losses.class_weight_vector(datasets.class_weights)
    common = dict(strategy=tf.distribute.get_strategy(), epochs=4, patience=0, tracker=ListTracker())
    distilled, scratch = student(filters=16), student(filters=16)
    for pupil, mentor, alpha, folder in ((distilled, teacher, 0.1, "d"), (scratch, None, 1.0, "s")):
        loss_fn = losses.DistillationLoss(4.0, alpha, weights)
        distillation.train_student(pupil, mentor, loss_fn, datasets, checkpoint_dir=tmp_path / folder, **common)

    def score(model: tf_keras.Model) -> float:
        result = variant_eval.evaluate_predict_fn(variant_eval.keras_predict_fn(model), datasets)
        return result.metrics.test.balanced_accuracy

    scores = {name: score(m) for name, m in (("teacher", teacher), ("distilled", distilled), ("scratch", scratch))}
    record_property("test_balanced_accuracy", scores)
    print(f"\ntest balanced accuracy: {scores}")
    assert scores["distilled"] > 0.3 and scores["scratch"] > 0.3  # chance is 0.125
