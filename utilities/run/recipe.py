"""The training recipe: the learning-rate schedule, the loss and the optimizer's gradient clipping.

    schedule = recipe.learning_rate(config.train, steps_per_epoch)     # a float or a per-step schedule
    compile_model(model, schedule, loss=recipe.loss(config.train), clip_norm=config.train.clip_norm)
    callbacks += recipe.callbacks(config.train)                         # --lr-schedule plateau only

Schedules (`--lr-schedule`), stepping per batch on the optimizer's own step counter — which the backup
holds, so a resumed run continues the schedule exactly where it stopped:
- `cosine` (default): linear warmup from 0 over `--warmup-epochs`, then cosine decay to 0 at the last
  step of `--epochs` (timm's `--sched cosine --warmup-epochs`, Model Garden's warmup + cosine);
- `step`: ×0.1 at 50 % and again at 75 % of the steps;
- `constant`: `--learning-rate` throughout (the original's);
- `plateau`: constant, halved after an epoch whose validation balanced accuracy did not improve
  (down to 1/64 of it; the factor lives in the optimizer's learning-rate variable, which the backup holds).
Loss (`--loss`): class-weighted cross-entropy (the weights come from `fit(class_weight=…)`), or focal
cross-entropy (γ = 2) with the same weights; both with `--label-smoothing`.
"""

from __future__ import annotations

import math

import tf_keras

from utilities.data.schema import HEADLINE

STEP_DROPS = (0.5, 0.75)  # `step`: fractions of the steps where the rate is multiplied by 0.1
PLATEAU_FACTOR, PLATEAU_FLOOR = 0.5, 1 / 64
FOCAL_GAMMA = 2.0


BATCHNORM_RENEWED = 0.75  # share of a BatchNorm's moving statistics an epoch renews, --bn-momentum 0
BATCHNORM_MOST = 0.99  # DenseNet's own momentum: the most --bn-momentum 0 chooses


def batchnorm_momentum(given: float, steps_per_epoch: int) -> float:
    """`given`, or (0) the momentum m, in hundredths, at which an epoch's steps renew BATCHNORM_RENEWED of the
    moving statistics (m ** steps <= 1/4), at most BATCHNORM_MOST: 0.90 at 14 steps, 0.99 from 138.

    So validation during training (the curves, early stopping) reads statistics of the current weights,
    as the exported model's re-estimated ones are. Measured on the demo data (441 images, -g 2 -b 32: 14 steps
    an epoch, 3 epochs): validation during training 0.30 / 0.19 / 0.15 at 0.99, 0.10 / 0.33 / 0.54 at 0.9;
    0.59 and 0.61 after re-estimation.
    """
    if given:
        return given
    fitting = math.floor(100 * (1 - BATCHNORM_RENEWED) ** (1 / max(steps_per_epoch, 1))) / 100
    return min(BATCHNORM_MOST, fitting)


def learning_rate(train, steps_per_epoch: int) -> float | tf_keras.optimizers.schedules.LearningRateSchedule:
    """`train.learning_rate` shaped by `train.lr_schedule` over `train.epochs` × `steps_per_epoch` steps."""
    rate, total = train.learning_rate, max(1, train.epochs * steps_per_epoch)
    if train.lr_schedule in ("constant", "plateau"):
        return rate
    if train.lr_schedule == "step":
        bounds = sorted({max(0, round(f * total) - 1) for f in STEP_DROPS})  # the last step at each rate
        return tf_keras.optimizers.schedules.PiecewiseConstantDecay(
            bounds, [rate * 0.1**i for i in range(len(bounds) + 1)]
        )
    warmup = min(round(train.warmup_epochs * steps_per_epoch), total - 1)
    if warmup <= 0:
        return tf_keras.optimizers.schedules.CosineDecay(rate, total)
    return tf_keras.optimizers.schedules.CosineDecay(0.0, total - warmup, warmup_target=rate, warmup_steps=warmup)


def loss(train) -> tf_keras.losses.Loss:
    """The training loss over the fused probabilities (the model's output is softmax, not logits)."""
    if train.loss == "focal":
        return tf_keras.losses.CategoricalFocalCrossentropy(
            alpha=1.0, gamma=FOCAL_GAMMA, label_smoothing=train.label_smoothing
        )
    return tf_keras.losses.CategoricalCrossentropy(label_smoothing=train.label_smoothing)


def callbacks(train) -> list[tf_keras.callbacks.Callback]:
    """The schedule's callbacks: `plateau`'s halving on validation balanced accuracy; none otherwise."""
    if train.lr_schedule != "plateau":
        return []
    return [
        tf_keras.callbacks.ReduceLROnPlateau(
            monitor=f"val_{HEADLINE}",
            mode="max",
            factor=PLATEAU_FACTOR,
            patience=0,
            min_lr=train.learning_rate * PLATEAU_FLOOR,
            verbose=0,
        )
    ]


def current_rate(optimizer) -> float:
    """The rate the optimizer applies at its current step (a schedule evaluated, or the variable's value)."""
    rate = optimizer.learning_rate
    if isinstance(rate, tf_keras.optimizers.schedules.LearningRateSchedule):
        rate = rate(optimizer.iterations)
    return float(tf_keras.backend.get_value(rate))
