"""Evaluate a model variant (Keras model, TFLite file, …) the same way: metrics, size, latency.

Every variant's entry in metrics.json has `val` and `test` metric dicts (utilities.evaluation),
`size_bytes`, `gzip_bytes`, `latency_ms` (batch 1), `params` and, for compressed variants,
`agreement` (top-1 agreement with the float model on validation). Keys starting with `_` hold
arrays for later comparisons and are dropped before writing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from utilities import evaluation

PredictFn = Callable[[dict[str, Any]], np.ndarray]  # features dict (B, …) → probs (B, 8)


def keras_predict_fn(model) -> PredictFn:
    """Batch prediction as a traced function: the model in inference mode, outside any strategy."""
    fn = tf.function(lambda features: model(features, training=False), reduce_retracing=True)
    return lambda features: fn(features).numpy()


def first_example(dataset) -> dict[str, tf.Tensor]:
    """One example (batch of 1) for latency measurement."""
    features, _ = next(iter(dataset.unbatch().batch(1).take(1)))
    return features


def evaluate_predict_fn(predict: PredictFn, datasets, reference: dict | None = None) -> dict[str, Any]:
    """Val and test metrics for any batch predictor; top-1 agreement with `reference`'s val probs."""
    result: dict[str, Any] = {}
    for split in ("val", "test"):
        y_true, probs = evaluation.predict(predict, getattr(datasets, split))
        result[split] = evaluation.compute_metrics(y_true, probs)
        result[f"_{split}_probs"] = probs
    if reference is not None:
        result["agreement"] = evaluation.agreement(reference["_val_probs"], result["_val_probs"])
    return result


def evaluate_variant(
    predict: PredictFn, datasets, artifact: Path, params: int | None, reference: dict | None = None
) -> dict[str, Any]:
    """Metrics plus size of the exported artifact and batch-1 latency (median of repeats)."""
    result = evaluate_predict_fn(predict, datasets, reference)
    one = first_example(datasets.val)
    result.update(evaluation.artifact_size(artifact))
    result["latency_ms"] = evaluation.latency_ms(lambda: predict(one))
    result["params"] = params
    return result


def evaluate_keras(model, datasets, artifact: Path, reference: dict | None = None) -> dict[str, Any]:
    return evaluate_variant(keras_predict_fn(model), datasets, artifact, int(model.count_params()), reference)


def public(metrics: dict[str, Any]) -> dict[str, Any]:
    """metrics.json content: drop the arrays kept for agreement computations."""
    variants = {
        name: {k: v for k, v in values.items() if not k.startswith("_")} for name, values in metrics["variants"].items()
    }
    return {**metrics, "variants": variants}
