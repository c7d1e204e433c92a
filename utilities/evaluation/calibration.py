"""--calibrate: one temperature per Keras variant, fitted on validation and folded into the saved model.

    calibrate(model, result, folder.path("model"), datasets.identities, resamples=1000)

Temperature scaling (Guo et al., 2017) of the output probabilities: p' = softmax(log p / T), T fitted by
minimising the validation NLL (`analysis.fit_temperature`). The FusionLayer applies the same formula
(`model.set_temperature`), so the exported `.keras` file — loaded with plain `load_model` — and every
TFLite file converted from it afterwards output p'. The argmax, hence balanced accuracy, is unchanged.
The variant's val/test metrics are recomputed from p' (exactly what the saved model outputs, up to
float rounding; tests/test_evaluate checks it) and `calibration` records T and ECE before → after.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import tf_keras

from utilities.data.records import Identities
from utilities.evaluation import analysis
from utilities.evaluation.results import Calibration
from utilities.evaluation.variants import RESAMPLES, VariantResult, split_metrics
from utilities.model import load_model, save_model, set_temperature

log = logging.getLogger(__name__)


def calibrate(
    model: tf_keras.Model,
    result: VariantResult,
    saved: Path,
    identities: Mapping[str, Identities] | None = None,
    resamples: int = RESAMPLES,
) -> float:
    """Fit T on `result`'s validation probabilities; fold it into `model` and into the model saved in
    `saved`; replace `result`'s val/test metrics and probabilities by the calibrated ones. Returns T."""
    temperature = analysis.fit_temperature(result.labels["val"], result.probabilities["val"])
    if any(abs(np.log(temperature / bound)) < 1e-3 for bound in analysis.TEMPERATURE_BOUNDS):
        log.warning(
            "%s: temperature %.3f is at the end of its search range: validation has no interior optimum (with "
            "no validation error, sharper is always better), so the calibration is not identified; check the "
            "test ECE before relying on it",
            saved.name,
            temperature,
        )
    set_temperature(model, temperature)
    exported = load_model(saved)  # the saved file, BatchNorm statistics re-estimated as exported
    set_temperature(exported, temperature)
    save_model(exported, saved)
    before = {"val": result.metrics.val, "test": result.metrics.test}
    after = {}
    for split in before:
        probs = analysis.apply_temperature(result.probabilities[split], temperature).astype(np.float32)
        who = (identities or {}).get(split)
        after[split] = split_metrics(result.labels[split], probs, who, resamples)
        result.probabilities[split] = probs
    record = Calibration(
        temperature=temperature,
        ece_before={split: m.ece for split, m in before.items()},
        ece_after={split: m.ece for split, m in after.items()},
        balanced_accuracy_before={split: m.balanced_accuracy for split, m in before.items()},
        macro_auc_before={split: m.macro_auc for split, m in before.items()},  # AUCs may move (README)
        reliability_before=before["test"].reliability,  # the report draws it beside the calibrated one
    )
    result.metrics = dataclasses.replace(result.metrics, **after, calibration=record)
    log.info(
        "calibrated %s: temperature %.3f, val ECE %.3f → %.3f",
        saved.name,
        temperature,
        before["val"].ece,
        after["val"].ece,
    )
    return temperature
