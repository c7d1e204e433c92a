"""The callbacks every fit path shares (main model, pruning fine-tune, Distiller)."""

import logging
import re
import signal

import numpy as np
import pytest
import tf_keras

from utilities.run.callbacks import (
    Backup,
    LearningRateLog,
    NanGuard,
    NanLossError,
    Preempted,
    PreemptionWatch,
    ProgressLog,
    ResumeProbe,
    epoch_row,
    fit_callbacks,
    resume_position,
)


def _tiny() -> tf_keras.Model:
    model = tf_keras.Sequential([tf_keras.Input((3,)), tf_keras.layers.Dense(2, activation="softmax")])
    model.compile("adam", "categorical_crossentropy")
    return model


def test_nan_guard_stops_at_the_first_non_finite_loss_naming_step_and_what():
    x = np.ones((8, 3), "float32")
    x[5] = np.nan  # the third batch of two
    y = np.eye(2, dtype="float32")[np.arange(8) % 2]
    probe = ResumeProbe()
    with pytest.raises(NanLossError, match=r"^pruning fine-tune loss became nan at epoch 1, step 3;"):
        _tiny().fit(
            x, y, batch_size=2, epochs=2, shuffle=False, callbacks=[probe, NanGuard("pruning fine-tune")], verbose=0
        )
    assert probe.start_epoch == 0
    history = _tiny().fit(np.ones((8, 3)), y, batch_size=2, epochs=2, callbacks=[NanGuard()], verbose=0)
    assert len(history.history["loss"]) == 2  # finite losses: untouched


def test_progress_lines_in_a_log_name_epoch_step_loss_rate_and_eta(caplog, tmp_path):
    x, y = np.ones((8, 3), "float32"), np.eye(2, dtype="float32")[np.arange(8) % 2]
    with caplog.at_level(logging.INFO, logger="utilities.progress"):
        _tiny().fit(x, y, batch_size=2, epochs=2, callbacks=[ProgressLog(0.0)], verbose=0)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 8 and all("\r" not in line for line in lines)  # every step (0 s), two epochs of 4
    assert re.fullmatch(r"training epoch 2/2 step 4/4 loss \d+\.\d{4} \(\d+\.\d\d steps/s, ETA 0 s\)", lines[-1])


def test_a_preempted_fit_saves_the_step_and_resumes_after_it(tmp_path):
    x, y = np.arange(24, dtype="float32").reshape(8, 3), np.eye(2, dtype="float32")[np.arange(8) % 2]
    watch = PreemptionWatch()

    class Term(tf_keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 1 and not watch.signalled:  # epoch 1, step 2 of 4: SIGTERM as the signal would
                watch._handle(signal.SIGTERM, None)

    with pytest.raises(Preempted, match="backup saved at epoch 1 step 2"), watch.deferred():
        _tiny().fit(x, y, batch_size=2, epochs=2, callbacks=[Term(), Backup(str(tmp_path), watch=watch)], verbose=0)
    assert resume_position(str(tmp_path), 4) == (0, 2)  # Keras resumes at the next step
    probe = ResumeProbe()
    _tiny().fit(x, y, batch_size=2, epochs=2, callbacks=[probe, Backup(str(tmp_path))], verbose=0)
    assert probe.start_epoch == 0 and resume_position(str(tmp_path), 4) == (2, 0)  # the end: nothing left


def test_fit_callbacks_restore_first_backup_last_and_early_stopping_only_with_patience(tmp_path):
    """The one order every fit path uses: a restore before the hooks that read restored state, Backup last."""
    hook, logger, backup = ResumeProbe(), tf_keras.callbacks.Callback(), Backup(str(tmp_path / "backup"))
    verbose, callbacks = fit_callbacks(
        "distillation", restore_dir=tmp_path / "restore", hooks=[hook], loggers=[logger], patience=2, backup=backup
    )
    assert verbose in (1, 2)
    assert type(callbacks[0]) is tf_keras.callbacks.BackupAndRestore and callbacks[1] is hook
    assert isinstance(callbacks[2], NanGuard) and callbacks[2].what == "distillation"
    assert isinstance(callbacks[3], LearningRateLog) and callbacks[4] is logger  # lr in the logs the loggers read
    assert isinstance(callbacks[5], tf_keras.callbacks.EarlyStopping) and callbacks[-1] is backup
    _, plain = fit_callbacks(history_csv=tmp_path / "history.csv")
    assert isinstance(plain[0], NanGuard) and isinstance(plain[1], LearningRateLog)
    assert isinstance(plain[2], tf_keras.callbacks.CSVLogger)
    assert not any(isinstance(c, tf_keras.callbacks.EarlyStopping | tf_keras.callbacks.BackupAndRestore) for c in plain)


def test_epoch_logger_rows_split_train_and_val_under_a_prefix():
    assert epoch_row("pruned", 1, {"loss": 0.5, "val_balanced_accuracy": 0.75}) == {
        "pruned/epoch": 1,
        "pruned/train/loss": 0.5,
        "pruned/val/balanced_accuracy": 0.75,
    }


def test_history_csv_numbers_epochs_from_one(tmp_path):
    """As the log lines, the report and its figure count them (Keras' CSVLogger starts at 0)."""
    model = tf_keras.Sequential([tf_keras.Input((2,)), tf_keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    _, callbacks = fit_callbacks(history_csv=tmp_path / "history.csv")
    model.fit(np.zeros((4, 2)), np.zeros((4, 1)), epochs=2, verbose=0, callbacks=callbacks)
    rows = (tmp_path / "history.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows] == ["epoch", "1", "2"]
