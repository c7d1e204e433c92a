"""The training recipe: schedules step per batch and end where they say, plateau halves, the losses smooth.

.venv/bin/python -m pytest tests/test_recipe.py -q
"""

from __future__ import annotations

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


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr_schedule": "linear"}, "--lr-schedule must be one of"),
        ({"loss": "hinge"}, "--loss must be one of"),
        ({"warmup_epochs": -1}, "--warmup-epochs"),
        ({"label_smoothing": 1.0}, "--label-smoothing"),
        ({"clip_norm": -0.5}, "--clip-norm"),
    ],
)
def test_bad_recipe_values_are_refused_in_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**kwargs)
