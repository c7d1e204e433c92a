"""Tests of utilities/run/tracking.py: secret redaction, no-op tracking, real offline W&B runs.

.venv/bin/python -m pytest tests/test_tracking.py -q
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf  # conftest selects Keras 2 first; only tf.nn is used here
import tf_keras

from utilities.run import tracking
from utilities.run.config import TrackingConfig
from utilities.run.tracking import FusionWeightLogger, NullTracker, WandbTracker, sanitize, start_tracking

FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # looks like a W&B API key (40 hex)
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Every W&B folder inside tmp_path, offline, and a (fake) key in the environment."""
    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        path = tmp_path / var.lower()
        path.mkdir()
        monkeypatch.setenv(var, str(path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    return tmp_path


def _start(wandb_env: Path, run_id: str, config_dict: dict | None = None) -> WandbTracker:
    config = TrackingConfig(enabled=True, mode="offline", project="dermaid-test", wandb_dir=str(wandb_env / "runs"))
    tracker = start_tracking(config, "test-run", run_id, config_dict or {})
    assert isinstance(tracker, WandbTracker)
    return tracker


def test_sanitize_redacts_secret_keys_and_url_credentials_recursively():
    config = {
        "train": {"epochs": 2, "learning_rate": 1e-4},
        "tracking": {"wandb_api_key": FAKE_KEY, "project": "dermaid"},
        "GIT_TOKEN": "ghp_secret",
        "workers": [{"Password": "hunter2", "host": "w0"}],
        "nested": {"deeper": {"gcp_credentials": {"private_key": "x"}}},
        "repo": "https://oauth2:glpat-secret@gitlab.example.com/team/registry.git",
        "output": "gs://bucket/models",
    }
    clean = sanitize(config)
    assert clean["train"] == {"epochs": 2, "learning_rate": 1e-4}
    assert clean["tracking"] == {"wandb_api_key": tracking.REDACTED, "project": "dermaid"}
    assert clean["GIT_TOKEN"] == tracking.REDACTED
    assert clean["workers"] == [{"Password": tracking.REDACTED, "host": "w0"}]
    assert clean["nested"]["deeper"]["gcp_credentials"] == tracking.REDACTED
    assert clean["repo"] == "https://***@gitlab.example.com/team/registry.git"
    assert clean["output"] == "gs://bucket/models"
    assert config["GIT_TOKEN"] == "ghp_secret"  # the input is not modified


def test_disabled_or_non_chief_tracking_never_imports_wandb():
    code = (
        "import sys\n"
        "from utilities.run.config import TrackingConfig\n"
        "from utilities.run.tracking import NullTracker, start_tracking\n"
        "off = start_tracking(TrackingConfig(enabled=False), 'n', 'id', {})\n"
        "worker = start_tracking(TrackingConfig(enabled=True), 'n', 'id', {}, is_chief=False)\n"
        "assert isinstance(off, NullTracker) and isinstance(worker, NullTracker)\n"
        "off.log({'a': 1}); off.log_model(None, 'm', None, None); off.finish()\n"
        "assert off.run_dir is None\n"
        "print('wandb' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_offline_run_end_to_end_without_secrets(wandb_env, caplog):
    config_dict = {"train": {"epochs": 2}, "tracking": {"wandb_api_key": FAKE_KEY}, "data": {"data_tag": "dataset_v01"}}
    model_file = wandb_env / "model.tflite"
    model_file.write_bytes(b"\0tiny model")
    with caplog.at_level(logging.INFO, logger="utilities.run.tracking"):
        tracker = _start(wandb_env, "e2e-run", config_dict)
    run_dir = tracker.run_dir
    tracker.log({"loss": 1.0, "val/balanced_accuracy": 0.25}, step=0)
    tracker.log({"loss": 0.5, "val/balanced_accuracy": 0.5}, step=1)
    tracker.log_table("variants", [{"variant": "model", "acc": 0.5}, {"variant": "int8", "size_bytes": 10}])
    tracker.log_summary({"test/balanced_accuracy": 0.5, "secret_token": FAKE_KEY})
    tracker.log_model(model_file, "base_model", "dataset_v01", "ab" * 32)
    with pytest.raises(FileNotFoundError, match="no such file"):
        tracker.log_model(wandb_env / "missing", "base_model", None, None)
    tracker.finish()
    tracker.finish()  # idempotent

    assert f"`wandb sync {run_dir}`" in caplog.text
    assert run_dir.name.startswith("offline-run-") and list(run_dir.glob("run-e2e-run.wandb"))
    history = tracking.read_offline_history(run_dir)
    metric_rows = [row for row in history if "loss" in row]
    assert [(r["_step"], r["loss"], r["val/balanced_accuracy"]) for r in metric_rows] == [(0, 1.0, 0.25), (1, 0.5, 0.5)]
    tables = [row["variants"] for row in history if "variants" in row]
    assert tables and tables[0]["_type"] == "table-file" and tables[0]["nrows"] == 2

    records = list(tracking.read_offline_records(run_dir))
    artifacts = {r.artifact.type: r.artifact for r in records if r.WhichOneof("record_type") == "artifact"}
    assert artifacts["model"].name == "base_model" and "dataset_v01" in artifacts["model"].aliases
    assert json.loads(artifacts["model"].metadata) == {"data_tag": "dataset_v01", "manifest_sha256": "ab" * 32}
    assert artifacts["dataset"].name == tracking.DATASET_ARTIFACT and "dataset_v01" in artifacts["dataset"].metadata

    leaks = [p for p in wandb_env.rglob("*") if p.is_file() and FAKE_KEY.encode() in p.read_bytes()]
    assert leaks == []


def test_reader_rejects_a_missing_or_corrupt_run(wandb_env):
    with pytest.raises(FileNotFoundError, match="run-"):
        tracking.read_offline_history(wandb_env)
    assert not tracking.wait_for_offline_run(wandb_env, timeout_s=0.1)
    tracker = _start(wandb_env, "corrupt-run")
    tracker.log({"loss": 1.0})
    tracker.finish()
    wandb_file = next(tracker.run_dir.glob("run-*.wandb"))
    data = bytearray(wandb_file.read_bytes())
    data[40] ^= 0xFF  # inside the first record's payload
    wandb_file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        tracking.read_offline_history(tracker.run_dir)


def test_failing_init_continues_untracked(wandb_env, monkeypatch, caplog):
    import wandb

    def broken_init(**kwargs):
        raise wandb.errors.CommError("network is unreachable\nretry later")

    monkeypatch.setattr(wandb, "init", broken_init)
    config = TrackingConfig(enabled=True, mode="online", wandb_dir=str(wandb_env / "runs"))
    with caplog.at_level(logging.WARNING, logger="utilities.run.tracking"):
        assert isinstance(start_tracking(config, "n", "failing", {}), NullTracker)
    assert "W&B init failed" in caplog.text and "network is unreachable" in caplog.text
    assert "retry later" not in caplog.text  # one line


class _Fusion(tf_keras.layers.Layer):
    """Stand-in for the model's fusion layer: a learned 2-way mix of two copies of its input."""

    def build(self, input_shape):
        self.branch_logits = self.add_weight(name="branch_logits", shape=(2,), initializer="zeros")

    def call(self, inputs):
        weights = tf.nn.softmax(self.branch_logits)
        return weights[0] * inputs + weights[1] * 2.0 * inputs

    def branch_weights(self) -> dict[str, float]:
        return dict(zip(("image", "metadata"), tf.nn.softmax(self.branch_logits).numpy().tolist(), strict=True))


def _fit(callbacks: list, epochs: int = 2) -> dict[str, list[float]]:
    tf_keras.utils.set_random_seed(0)
    inputs = tf_keras.Input((4,))
    logits = _Fusion(name="fusion")(tf_keras.layers.Dense(3)(inputs))
    model = tf_keras.Model(inputs, tf_keras.layers.Softmax()(logits))
    model.compile(tf_keras.optimizers.Adam(0.1), "categorical_crossentropy", metrics=["accuracy"])
    x = np.random.default_rng(0).random((16, 4), dtype=np.float32)
    y = np.eye(3, dtype=np.float32)[np.arange(16) % 3]
    return model.fit(x, y, batch_size=8, epochs=epochs, validation_data=(x, y), verbose=0, callbacks=callbacks).history


def test_keras_callbacks_log_epochs_and_fusion_weights(wandb_env):
    tracker = _start(wandb_env, "keras-run")
    history = _fit(tracker.callbacks())
    tracker.finish()

    assert len(history["fusion/image"]) == 2
    assert history["fusion/image"][-1] != pytest.approx(0.5)  # the weights were learned, and read each epoch
    assert history["fusion/image"][-1] + history["fusion/metadata"][-1] == pytest.approx(1.0)
    epochs = [row for row in tracking.read_offline_history(tracker.run_dir) if "epoch/epoch" in row]
    assert [row["epoch/epoch"] for row in epochs] == [0, 1]
    for row, image_weight in zip(epochs, history["fusion/image"], strict=True):
        assert {"epoch/loss", "epoch/val_loss", "epoch/accuracy"} <= row.keys()
        assert row["fusion/image"] == pytest.approx(image_weight)  # same W&B row as the epoch metrics


def test_null_tracker_callbacks_still_record_fusion_weights():
    history = _fit(NullTracker().callbacks(), epochs=1)
    assert set(history) >= {"loss", "fusion/image", "fusion/metadata"}
    assert FusionWeightLogger().tracker is not None


def test_the_wandb_folder_is_wandb_dir_else_the_run_folder_never_the_cwd(tmp_path):
    run = tmp_path / "out" / "m" / "r1"
    assert tracking.wandb_folder(TrackingConfig(wandb_dir=str(tmp_path / "wb")), run) == tmp_path / "wb"
    assert tracking.wandb_folder(TrackingConfig(), run) == run
    fallback = tracking.wandb_folder(TrackingConfig(), None)  # a library call without a run folder
    assert fallback.is_dir() and fallback.name.startswith("dermaid-wandb-") and fallback != Path.cwd()
    fallback.rmdir()


def test_without_wandb_dir_the_offline_run_goes_into_the_run_folder(wandb_env, monkeypatch, caplog):
    monkeypatch.delenv("WANDB_DIR")
    cwd, run = wandb_env / "cwd", wandb_env / "out" / "m" / "r1"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    config = TrackingConfig(enabled=True, mode="offline", project="dermaid-test")  # wandb_dir None: WANDB_DIR unset
    with caplog.at_level(logging.INFO, logger="utilities.run.tracking"):
        tracker = start_tracking(config, "test-run", "no-dir-run", {}, local_dir=Path("../out/m/r1"))
    tracker.log({"loss": 1.0})
    tracker.finish()
    assert tracker.run_dir.parent == run.resolve() / "wandb" and tracker.run_dir.is_absolute()
    assert [r["loss"] for r in tracking.read_offline_history(tracker.run_dir) if "loss" in r] == [1.0]
    assert list(cwd.iterdir()) == []  # no ./wandb
    assert f"W&B offline run: {tracker.run_dir}; upload it with `wandb sync {tracker.run_dir}`" in caplog.text
    assert FAKE_KEY not in caplog.text
    assert [p for p in run.rglob("*") if p.is_file() and FAKE_KEY.encode() in p.read_bytes()] == []
