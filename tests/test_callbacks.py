"""The callbacks every fit path shares (main model, pruning fine-tune, Distiller)."""

import numpy as np
import pytest
import tf_keras

from utilities.callbacks import NanGuard, NanLossError, ResumeProbe


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
