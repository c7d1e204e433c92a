"""The training recipe: schedules step per batch and end where they say, plateau halves, the losses smooth.

.venv/bin/python -m pytest tests/test_recipe.py -q
"""

from __future__ import annotations

import typing

import numpy as np
import pytest
import tf_keras

from utilities.run import recipe
from utilities.run.config import TrainConfig
from utilities.run.fields import ConfigError


def rates(train: TrainConfig, steps: int) -> np.ndarray:
    schedule = recipe.learning_rate(train, steps)
    total = train.epochs * steps
    if not callable(schedule):
        return np.full(total, schedule)
    return np.array([float(schedule(i)) for i in range(total)])


def test_cosine_warms_up_linearly_then_decays_to_zero_at_the_last_step():
    train = TrainConfig(epochs=4, learning_rate=1e-3, warmup_epochs=1.0)
    r = rates(train, steps=10)
    np.testing.assert_allclose(r[:11], np.linspace(0, 1e-3, 11), rtol=1e-5, atol=1e-12)  # 0 → peak over 10 steps
    assert np.all(np.diff(r[10:]) < 0) and r[-1] < 1e-3 * 0.01  # then down, to ~0 at the end
    np.testing.assert_allclose(r[25], 1e-3 * 0.5 * (1 + np.cos(np.pi * 15 / 30)), rtol=1e-5)
    no_warmup = rates(TrainConfig(epochs=2, learning_rate=1e-3, warmup_epochs=0), steps=5)
    assert no_warmup[0] == pytest.approx(1e-3) and np.all(np.diff(no_warmup) < 0)
    one_epoch = rates(TrainConfig(epochs=1, learning_rate=1e-3), steps=3)  # warmup capped: a step is left to decay
    assert one_epoch[0] == 0 and one_epoch.max() == pytest.approx(1e-3)


def test_step_drops_tenfold_twice_and_constant_and_plateau_start_at_the_rate():
    r = rates(TrainConfig(epochs=4, learning_rate=1e-2, lr_schedule="step"), steps=10)
    np.testing.assert_allclose(r[[0, 19, 20, 29, 30, 39]], [1e-2, 1e-2, 1e-3, 1e-3, 1e-4, 1e-4], rtol=1e-6)
    for name in ("constant", "plateau"):
        assert recipe.learning_rate(TrainConfig(learning_rate=3e-4, lr_schedule=name), 10) == 3e-4
    assert recipe.callbacks(TrainConfig()) == []
    starts = [recipe.patience_start(TrainConfig(epochs=10, lr_schedule=n)) for n in ("cosine", "step", "constant")]
    assert starts == [5, 5, 0]  # a decaying rate: early stopping waits for the second half


def test_plateau_halves_the_rate_after_an_epoch_without_progress_down_to_its_floor():
    (plateau,) = recipe.callbacks(TrainConfig(learning_rate=1e-3, lr_schedule="plateau"))
    model = tf_keras.Sequential([tf_keras.Input((2,)), tf_keras.layers.Dense(2)])
    model.compile(optimizer=tf_keras.optimizers.Adam(1e-3), loss="mse")
    plateau.set_model(model)
    plateau.on_train_begin()
    seen = []
    for epoch, score in enumerate([0.5, 0.6, 0.6, 0.55, 0.7] + [0.1] * 8):
        plateau.on_epoch_end(epoch, {"val_balanced_accuracy": score})
        seen.append(recipe.current_rate(model.optimizer))
    np.testing.assert_allclose(seen[:5], [1e-3, 1e-3, 5e-4, 2.5e-4, 2.5e-4], rtol=1e-6)
    assert seen[-1] == pytest.approx(1e-3 / 64)


def test_losses_smooth_the_labels_and_focal_down_weights_easy_examples():
    labels = np.array([[1.0, 0, 0, 0, 0, 0, 0, 0]] * 2)
    probs = np.array([[0.9] + [0.1 / 7] * 7, [0.3] + [0.1] * 7])
    plain = recipe.loss(TrainConfig(label_smoothing=0.0))
    smooth = recipe.loss(TrainConfig(label_smoothing=0.1))
    focal = recipe.loss(TrainConfig(loss="focal", label_smoothing=0.0))
    per = tf_keras.losses.Reduction.NONE
    for loss in (plain, smooth, focal):
        loss.reduction = per
    easy, hard = plain(labels, probs).numpy()
    assert easy == pytest.approx(-np.log(0.9), rel=1e-5)
    assert smooth(labels, probs).numpy()[0] > easy  # smoothing penalises the confident, right answer
    focal_easy, focal_hard = focal(labels, probs).numpy()
    assert focal_easy == pytest.approx((1 - 0.9) ** 2 * easy, rel=1e-4)  # (1 - p)^γ · CE
    assert focal_easy / easy < focal_hard / hard


def test_ema_validates_and_leaves_the_warmed_up_average_of_every_step():
    tf_keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 4)).astype("float32"), rng.normal(size=(64, 2)).astype("float32")
    model = tf_keras.Sequential([tf_keras.Input((4,)), tf_keras.layers.Dense(2)])
    model.compile(optimizer=tf_keras.optimizers.SGD(0.1), loss="mse")
    start = [w.copy() for w in model.get_weights()]

    class Raw(tf_keras.callbacks.Callback):  # the raw weights after each step
        steps: typing.ClassVar[list] = []

        def on_train_batch_end(self, batch, logs=None):
            self.steps.append([w.copy() for w in self.model.get_weights()])

    decay = 0.8
    history = model.fit(
        x, y, batch_size=16, epochs=3, verbose=0, validation_data=(x, y), callbacks=[recipe.WeightAverage(decay), Raw()]
    )
    expected = start
    for n, weights in enumerate(Raw.steps, start=1):
        rate = min(decay, (1 + n) / (10 + n))
        expected = [rate * e + (1 - rate) * w for e, w in zip(expected, weights, strict=True)]
    for got, want in zip(model.get_weights(), expected, strict=True):  # what is left (and exported): the average
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(model.get_weights()[0], Raw.steps[-1][0])
    # the last epoch's validation scored the average, not the raw weights of its last step
    assert history.history["val_loss"][-1] == pytest.approx(model.evaluate(x, y, verbose=0), rel=1e-5)
    assert model.count_params() == 10  # the average hangs off the optimizer, not the model's weights


def test_batchnorm_statistics_are_those_of_clean_batches_at_each_validation():
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x, y = rng.normal(3, 2, size=(64, 4)).astype("float32"), rng.normal(size=(64, 2)).astype("float32")
    model = tf_keras.Sequential([tf_keras.Input((4,)), tf_keras.layers.BatchNormalization(momentum=0.99)])
    model.add(tf_keras.layers.Dense(2))
    model.compile(optimizer=tf_keras.optimizers.SGD(0.01), loss="mse")
    clean = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    noisy = clean.map(lambda a, b: (a * 3.0 + 5.0, b))  # "augmented": other statistics
    model.fit(noisy, epochs=2, verbose=0, validation_data=clean, callbacks=[recipe.FreshBatchNorm(clean, count=4)])
    bn = model.layers[0]  # momentum 0.99 over 8 noisy steps would sit near the initial 0 / 1
    np.testing.assert_allclose(bn.moving_mean.numpy(), x.mean(axis=0), rtol=1e-4)
    within = np.mean([x[i : i + 16].var(axis=0) for i in range(0, 64, 16)], axis=0)  # per-batch variance, averaged
    np.testing.assert_allclose(bn.moving_variance.numpy(), within, rtol=1e-3)
    assert bn.momentum == 0.99


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr_schedule": "linear"}, "--lr-schedule must be one of"),
        ({"loss": "hinge"}, "--loss must be one of"),
        ({"warmup_epochs": -1}, "--warmup-epochs"),
        ({"label_smoothing": 1.0}, "--label-smoothing"),
        ({"clip_norm": -0.5}, "--clip-norm"),
        ({"ema": 1.0}, "--ema"),
    ],
)
def test_bad_recipe_values_are_refused_in_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**kwargs)
