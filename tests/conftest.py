"""Shared test set-up: offline W&B, quiet TensorFlow, fixtures from tests/fixtures/."""

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["TF_USE_LEGACY_KERAS"] = "1"

pytest_plugins = ["tests.fixtures.data", "tests.fixtures.gcs"]
