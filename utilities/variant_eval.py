"""Evaluate a model variant (Keras model, TFLite file, …) the same way: metrics, size, latency.

Every variant's entry in metrics.json (`VariantResult.metrics`) has `val` and `test` metric dicts
(utilities.evaluation), `size_bytes`, `gzip_bytes`, `latency_ms` (batch 1), `params` and, for
compressed variants, `agreement` (top-1 agreement with the float model on validation). The
predicted probabilities that agreement needs travel beside it (`VariantResult.probabilities`) and
are never written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from utilities import evaluation

PredictFn = Callable[[dict[str, Any]], np.ndarray]  # features dict (B, …) → probs (B, 8)


@dataclass
class VariantResult:
    """One evaluated variant: what metrics.json holds for it, and the probabilities later comparisons need (never written)."""

    # val/test metric dicts, size_bytes, gzip_bytes, latency_ms, params, agreement, … or {"error": "..."}
    metrics: dict[str, Any]
    probabilities: dict[str, np.ndarray] = field(default_factory=dict)  # split ("val", "test") → (N, 8)


def keras_predict_fn(model) -> PredictFn:
    """Batch prediction as a traced function: the model in inference mode, outside any strategy."""
    fn = tf.function(lambda features: model(features, training=False), reduce_retracing=True)
    return lambda features: fn(features).numpy()


def first_example(dataset) -> dict[str, tf.Tensor]:
    """One example (batch of 1) for latency measurement."""
    features, _ = next(iter(dataset.unbatch().batch(1).take(1)))
    return features


def evaluate_predict_fn(predict: PredictFn, datasets, reference: VariantResult | None = None) -> VariantResult:
    """Val and test metrics for any batch predictor; top-1 agreement with `reference`'s val probs."""
    result = VariantResult({})
    for split in ("val", "test"):
        y_true, probs = evaluation.predict(predict, getattr(datasets, split))
        result.metrics[split] = evaluation.compute_metrics(y_true, probs)
        result.probabilities[split] = probs
    if reference is not None:
        result.metrics["agreement"] = evaluation.agreement(reference.probabilities["val"], result.probabilities["val"])
    return result


def evaluate_variant(
    predict: PredictFn, datasets, artifact: Path, params: int | None, reference: VariantResult | None = None
) -> VariantResult:
    """Metrics plus size of the exported artifact and batch-1 latency (median of repeats)."""
    result = evaluate_predict_fn(predict, datasets, reference)
    one = first_example(datasets.val)
    result.metrics.update(evaluation.artifact_size(artifact))
    result.metrics["latency_ms"] = evaluation.latency_ms(lambda: predict(one))
    result.metrics["params"] = params
    return result


def evaluate_keras(model, datasets, artifact: Path, reference: VariantResult | None = None) -> VariantResult:
    return evaluate_variant(keras_predict_fn(model), datasets, artifact, int(model.count_params()), reference)
