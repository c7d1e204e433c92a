"""The training recipe: the learning-rate schedule, the loss and the optimizer's gradient clipping.

    schedule = recipe.learning_rate(config.train, steps_per_epoch)     # a float or a per-step schedule
    compile_model(model, schedule, loss=recipe.loss(config.train), clip_norm=config.train.clip_norm)
    callbacks += recipe.callbacks(config.train)                         # --lr-schedule plateau only

Schedules (`--lr-schedule`), stepping per batch on the optimizer's own step counter — which the backup
holds, so a resumed run continues the schedule exactly where it stopped:
- `cosine` (default): linear warmup from 0 over `--warmup-epochs`, then cosine decay to 0 at the last
  step of `--epochs` (timm's `--sched cosine --warmup-epochs`, Model Garden's warmup + cosine); early
  stopping (`--patience`) watches the second half of the epochs only (`patience_start`), as with `step`;
- `step`: ×0.1 at 50 % and again at 75 % of the steps;
- `constant`: `--learning-rate` throughout (the original's);
- `plateau`: constant, halved after an epoch whose validation balanced accuracy did not improve
  (down to 1/64 of it; the factor lives in the optimizer's learning-rate variable, which the backup holds).
Weights (`--ema DECAY`, `WeightAverage`): an exponential moving average of the trainable weights and of the
BatchNorm statistics that train, its decay warmed up as timm's (min(DECAY, (1 + n) / (10 + n)) at update n);
validation during training, early stopping's choice and the export all see the average; the backup holds it.
Loss (`--loss`): class-weighted cross-entropy (the weights come from `fit(class_weight=…)`), or focal
cross-entropy (γ = 2) with the same weights; both with `--label-smoothing`.
"""

from __future__ import annotations

import math

import tensorflow as tf
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


def patience_start(train) -> int:
    """The first epoch (0-based) early stopping watches: with a decaying schedule (cosine, step) the second half,
    once the rate has fallen by half — stopping during the high-rate epochs loses what the decay gives (demo,
    seed 0: stopped at epoch 5 of 10 with test balanced accuracy 0.75; run to the end, 0.95). 0 otherwise."""
    return train.epochs // 2 if train.lr_schedule in ("cosine", "step") else 0


def loss(train) -> tf_keras.losses.Loss:
    """The training loss over the fused probabilities (the model's output is softmax, not logits)."""
    if train.loss == "focal":
        return tf_keras.losses.CategoricalFocalCrossentropy(
            alpha=1.0, gamma=FOCAL_GAMMA, label_smoothing=train.label_smoothing
        )
    return tf_keras.losses.CategoricalCrossentropy(label_smoothing=train.label_smoothing)


def callbacks(train, clean_batches: tf.data.Dataset | None = None) -> list[tf_keras.callbacks.Callback]:
    """The recipe's callbacks: `--ema`'s weight average; BatchNorm statistics re-estimated on `clean_batches`
    before each validation (`FreshBatchNorm`; None: not); `plateau`'s halving on validation balanced accuracy."""
    chosen: list[tf_keras.callbacks.Callback] = [WeightAverage(train.ema)] if train.ema else []
    chosen += [FreshBatchNorm(clean_batches)] if clean_batches is not None else []
    if train.lr_schedule != "plateau":
        return chosen
    return [
        *chosen,
        tf_keras.callbacks.ReduceLROnPlateau(
            monitor=f"val_{HEADLINE}",
            mode="max",
            factor=PLATEAU_FACTOR,
            patience=0,
            min_lr=train.learning_rate * PLATEAU_FLOOR,
            verbose=0,
        ),
    ]


def current_rate(optimizer) -> float:
    """The rate the optimizer applies at its current step (a schedule evaluated, or the variable's value)."""
    rate = optimizer.learning_rate
    if isinstance(rate, tf_keras.optimizers.schedules.LearningRateSchedule):
        rate = rate(optimizer.iterations)
    return float(tf_keras.backend.get_value(rate))


class WeightAverage(tf_keras.callbacks.Callback):
    """`--ema DECAY`: the model is trained on its raw weights and judged (validated, chosen by early stopping,
    exported) on their exponential moving average.

    The raw weights are in the model during every training step (and in every mid-epoch backup); from the
    epoch's validation to the next epoch's first step the average is (so EarlyStopping's snapshot at the
    epoch's end, and the weights left when training ends, are averages). The average and its update count
    hang off the model's optimizer, so `BackupAndRestore` saves and restores them with it (a resumed run
    continues the same average) while `model.weights` and the saved model hold only the model's own.
    """

    def __init__(self, decay: float):
        super().__init__()
        self.decay = float(decay)
        self._averaged = False

    def _variables(self) -> list[tf.Variable]:
        from utilities.model import trainable_batchnorms  # utilities.model imports utilities.run.config

        stats = [v for layer in trainable_batchnorms(self.model) for v in (layer.moving_mean, layer.moving_variance)]
        return list(self.model.trainable_variables) + stats

    def on_train_begin(self, logs=None):
        self._averaged = False
        self._pairs = None
        variables = self._variables()
        optimizer = self.model.optimizer
        state = getattr(optimizer, "dermaid_weight_average", None)
        if state is None:  # created before BackupAndRestore (a later callback) restores into it
            state = tf.Module(name="weight_average")
            with self.model.distribute_strategy.scope():
                state.updates = tf.Variable(0, dtype=tf.int64, trainable=False, name="ema_updates")
                state.shadow = [tf.Variable(v, trainable=False, name=f"ema_{i}") for i, v in enumerate(variables)]
            optimizer.dermaid_weight_average = state  # in the backup with the optimizer, not in model.weights
        updates, shadow = state.updates, list(state.shadow)
        pairs = list(zip(shadow, variables, strict=True))
        decay = self.decay

        @tf.function
        def update():
            n = tf.cast(updates.assign_add(1), tf.float32)
            rate = tf.minimum(decay, (1.0 + n) / (10.0 + n))
            for average, variable in pairs:
                average.assign(rate * average + (1.0 - rate) * tf.cast(variable, average.dtype))

        @tf.function
        def swap():
            for average, variable in pairs:
                value = tf.identity(variable)
                variable.assign(average)
                average.assign(value)

        self._update, self._swap = update, swap

    def _use(self, averaged: bool) -> None:
        if self._averaged != averaged:
            self._swap()
            self._averaged = averaged

    def on_train_batch_begin(self, batch, logs=None):
        self._use(False)

    def on_train_batch_end(self, batch, logs=None):
        self._update()

    def on_test_begin(self, logs=None):  # the epoch's validation inside fit
        self._use(True)

    def on_epoch_begin(self, epoch, logs=None):
        self._use(False)

    def on_epoch_end(self, epoch, logs=None):
        self._use(True)


FRESH_BATCHES = 8  # clean training batches behind the BatchNorm statistics of each validation during training


class FreshBatchNorm(tf_keras.callbacks.Callback):
    """Before each validation during training, the trainable BatchNorm layers' statistics are re-estimated on up
    to FRESH_BATCHES clean (un-augmented) training batches at the current weights, as the exported model's are
    (`utilities.model.recalibrate_batchnorm`, which sees up to 100): the curves and early stopping then judge
    what would be exported, not statistics gathered on augmented batches (colour jitter widens them) under
    weights that have moved. Forward passes only, per replica (`strategy.run`: each replica's statistics, read
    back as their mean); training itself is untouched (it normalises by the batch's own statistics).
    """

    def __init__(self, batches: tf.data.Dataset, count: int = FRESH_BATCHES):
        super().__init__()
        self.batches, self.count = batches, count
        self._forward = None

    def on_test_begin(self, logs=None):
        from utilities.model import recalibrate_batchnorm

        strategy = self.model.distribute_strategy
        if self._forward is None:  # traced once, inside recalibrate_batchnorm (momentum 0), kept for every epoch
            model = self.model
            self._forward = tf.function(lambda f: strategy.run(lambda x: model(x, training=True), args=(f,)))
        batches = strategy.experimental_distribute_dataset(self.batches.take(self.count))
        recalibrate_batchnorm(self.model, batches, self.count, self._forward)
