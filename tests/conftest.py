"""Shared test set-up: offline W&B, quiet TensorFlow, fixtures from tests/fixtures/."""

import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["TF_USE_LEGACY_KERAS"] = "1"

pytest_plugins = ["tests.fixtures.data", "tests.fixtures.gcs"]


@pytest.fixture
def mixed_precision():
    """mixed_float16 as the global Keras policy for one test (the policy is process-global)."""
    import tf_keras

    tf_keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    tf_keras.mixed_precision.set_global_policy("float32")
