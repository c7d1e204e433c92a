"""`training.run(Config(...))` in this process, in the style of flax's `train_test.py`: one tiny epoch,
asserting on the returned result (the CLI tests in test_training.py run the same job as subprocesses)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from utilities.data.schema import NUM_CLASSES


@pytest.mark.slow
@pytest.mark.xdist_group("scored_run")  # the worker that makes the session's scored_run for test_evaluate
def test_one_tiny_epoch_returns_its_record_and_every_variant(prepared, scored_run):
    config, result, out = scored_run.config, scored_run.result, scored_run.run_dir.parent.parent
    record = result.record
    assert result.uri == str(out / "scored" / "r1") and record.uri == result.uri
    assert (record.run_id, record.model_name) == ("r1", "scored")
    assert record.started <= record.finished
    assert record.data.manifest_sha256 == hashlib.sha256(prepared.manifest_path.read_bytes()).hexdigest()
    assert record.data.counts == prepared.manifest["counts"]
    assert (record.training.resumed_from_epoch, record.training.resumed_from_step) == (0, 0)
    assert record.training.epochs_run == 1 and record.training.batchnorm_batches is None  # frozen backbone
    assert set(record.fusion_weights) == {"image", "metadata"}
    assert record.config == config.to_dict() and record.devices["replicas"] == 1

    model = result.variants["model"]
    for split in ("val", "test"):
        probs = model.probabilities[split]
        assert probs.shape == (sum(prepared.manifest["counts"][split].values()), NUM_CLASSES)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
        scored = model.metrics.splits()[split]
        assert scored.support and 0.0 <= scored.balanced_accuracy <= 1.0
    assert set(result.variants) == {"model", "model_dynamic", "model_tta"}  # the float model and those asked for
    tta = result.variants["model_tta"].metrics  # two views averaged: scored, sized and compared like any variant
    assert tta.test.ci95 and tta.agreement is not None and tta.gzip_bytes and tta.latency_ms.median > 0
    for split, blind in model.metrics.image_only.items():  # the same model, every metadata field unknown
        low, high = blind.ci95
        assert low <= blind.balanced_accuracy <= high and split in ("val", "test")

    # What the run wrote is what it returned.
    run_dir = out / "scored" / "r1"
    assert json.loads((run_dir / "run.json").read_text()) == json.loads(json.dumps(record.to_json(), default=str))
    assert json.loads((run_dir / "metrics.json").read_text()) == result.metrics.to_json()
    assert (run_dir / "model" / "model.keras").is_file() and (run_dir / "report.md").is_file()
    assert "## Does metadata help? (model)" in (run_dir / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.xdist_group("scored_run")
def test_the_model_card_is_written_from_the_records(prepared, scored_run):
    from utilities.evaluation.model_card import MODEL_CARD_JSON, MODEL_CARD_MD

    result, run_dir = scored_run.result, scored_run.run_dir
    card = json.loads((run_dir / MODEL_CARD_JSON).read_text())
    model = result.metrics.variants["model"]
    assert card["data"]["manifest_sha256"] == result.record.data.manifest_sha256
    assert card["data"]["images_per_class"]["test"] == prepared.manifest["counts"]["test"]
    assert card["metrics"]["test"]["balanced_accuracy"] == model.test.balanced_accuracy
    assert card["metrics"]["test"]["balanced_accuracy_ci95"] == list(model.test.interval("balanced_accuracy"))
    assert card["calibration"]["temperature"] == model.calibration.temperature  # the fixture runs --calibrate
    dynamic = result.metrics.variants["model_dynamic"]
    assert card["variants"]["model_dynamic"]["agreement_with_model"] == dynamic.agreement
    assert card["gate"] is None and card["signatures"] is None  # no latest run to compare with; --no-saved-model
    assert card["tflite"]["files"] == ["model_dynamic.tflite"] and "age_approx" in card["tflite"]["inputs"]
    assert card["training"]["lr_schedule"] == "cosine" and card["training"]["weights_exported"] == "as trained"
    text = (run_dir / MODEL_CARD_MD).read_text()
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == [
        "## Model",
        "## Data",
        "## Training",
        "## Metrics",
        "## Triage operating points",
        "## Other variants (compressed, test-time augmented)",
        "## Release gate",
        "## How to call it",
        "## Intended use and limits",
    ]
    assert "Not a diagnostic device" in text and f"{model.test.balanced_accuracy:.3f} [" in text
