"""Evaluate a model variant (Keras model, TFLite file, …) the same way: metrics, size, latency.

Every variant's entry in metrics.json (`VariantResult.metrics`, a `results.VariantMetrics`) has `val`
and `test` `SplitMetrics` (utilities.evaluation.metrics, plus utilities.evaluation.analysis: intervals,
calibration, triage, subgroups), `size_bytes`, `gzip_bytes`, `latency_ms` (batch 1), `params` and, for
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

from utilities.data.records import Identities
from utilities.data.schema import CLASS_NAMES
from utilities.data.shards import DataError
from utilities.evaluation import analysis
from utilities.evaluation import metrics as evaluation
from utilities.evaluation.results import ImageOnly, SplitMetrics, VariantMetrics

RESAMPLES = 1000  # bootstrap resamples behind each 95 % interval (--bootstrap)
PredictFn = Callable[[dict[str, Any]], np.ndarray]  # features dict (B, …) → probs (B, 8)


@dataclass
class VariantResult:
    """One evaluated variant: what metrics.json holds for it, and the probabilities later comparisons need (never written)."""

    metrics: VariantMetrics  # val/test, size_bytes, gzip_bytes, latency_ms, params, agreement, … or only error
    probabilities: dict[str, np.ndarray] = field(default_factory=dict)  # split ("val", "test") → (N, 8)
    labels: dict[str, np.ndarray] = field(default_factory=dict)  # split → true class ids (N,), same order


def keras_predict_fn(model) -> PredictFn:
    """Batch prediction as a traced function: the model in inference mode, outside any strategy."""
    fn = tf.function(lambda features: model(features, training=False), reduce_retracing=True)
    return lambda features: fn(features).numpy()


def first_example(dataset) -> dict[str, tf.Tensor]:
    """One example (batch of 1) for latency measurement."""
    features, _ = next(iter(dataset.unbatch().batch(1).take(1)))
    return features


def split_metrics(
    y_true: np.ndarray, probs: np.ndarray, who: Identities | None, resamples: int = RESAMPLES
) -> SplitMetrics:
    """One split's metrics (utilities.evaluation.metrics) and analysis (utilities.evaluation.analysis): 95 % intervals
    (`resamples` 0: none), calibration, triage and, when the records' metadata is known (`who`), subgroups."""
    if who is not None and not np.array_equal(who.labels, y_true):
        raise DataError("the evaluated labels differ from the records' labels read before: a shard changed meanwhile")
    metrics = evaluation.compute_metrics(y_true, probs)
    metrics.update(analysis.analyse(y_true, probs, None if who is None else who.metadata, resamples))
    return SplitMetrics.from_json(metrics)


def evaluate_predict_fn(
    predict: PredictFn, datasets, reference: VariantResult | None = None, resamples: int = RESAMPLES
) -> VariantResult:
    """Val and test metrics for any batch predictor; top-1 agreement with `reference`'s val probs.

    `datasets` has `.val`, `.test` and, for subgroups and a label check, `.identities` (utilities.data.pipeline).
    """
    result = VariantResult(VariantMetrics())
    identities = getattr(datasets, "identities", None) or {}
    scored = {}
    for split in ("val", "test"):
        y_true, probs = evaluation.predict(predict, getattr(datasets, split))
        scored[split] = split_metrics(y_true, probs, identities.get(split), resamples)
        result.probabilities[split], result.labels[split] = probs, y_true
    agreement = None
    if reference is not None:
        agreement = evaluation.agreement(reference.probabilities["val"], result.probabilities["val"])
    result.metrics = VariantMetrics(**scored, agreement=agreement)
    return result


def image_only(predict: PredictFn, datasets, resamples: int = RESAMPLES) -> dict[str, ImageOnly]:
    """Val and test balanced accuracy (with its interval) of `predict` fed every metadata field as unknown."""

    def blind(features: dict[str, Any]) -> np.ndarray:
        return predict({**features, "metadata": tf.zeros_like(features["metadata"])})

    scored = {}
    for split in ("val", "test"):
        y_true, probs = evaluation.predict(blind, getattr(datasets, split))
        interval = analysis.bootstrap_ci(y_true, probs, resamples)["balanced_accuracy"] if resamples else None
        balanced = evaluation.compute_metrics(y_true, probs)["balanced_accuracy"]
        scored[split] = ImageOnly(balanced, None if interval is None else tuple(interval))
    return scored


def evaluate_variant(
    predict: PredictFn,
    datasets,
    artifact: Path,
    params: int | None,
    reference: VariantResult | None = None,
    resamples: int = RESAMPLES,
) -> VariantResult:
    """Metrics plus size of the exported artifact and batch-1 latency (median of repeats)."""
    result = evaluate_predict_fn(predict, datasets, reference, resamples)
    one = first_example(datasets.val)
    latency = evaluation.latency_ms(lambda: predict(one))
    result.metrics = result.metrics.with_values(**evaluation.artifact_size(artifact), latency_ms=latency, params=params)
    return result


def evaluate_keras(
    model, datasets, artifact: Path, reference: VariantResult | None = None, resamples: int = RESAMPLES
) -> VariantResult:
    return evaluate_variant(
        keras_predict_fn(model), datasets, artifact, int(model.count_params()), reference, resamples
    )


def most_confident_mistakes(
    dataset, result: VariantResult, names: tuple[str, ...], count: int, split: str = "test"
) -> list[dict[str, Any]]:
    """The `count` wrong predictions of `split` made with the highest probability, with their pixels
    (uint8, read again from `dataset`, the split's evaluation batches): the report's error gallery."""
    probs, labels = result.probabilities.get(split), result.labels.get(split)
    if not count or probs is None:
        return []
    predicted, confidence = probs.argmax(axis=1), probs.max(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    chosen = wrong[np.argsort(-confidence[wrong], kind="stable")][:count]
    wanted, images, offset = set(chosen.tolist()), {}, 0
    for features, *_ in dataset:
        if len(images) == len(wanted):
            break
        batch = features["image"].numpy()
        for row in wanted.intersection(range(offset, offset + len(batch))):
            images[row] = np.clip(batch[row - offset], 0, 255).astype(np.uint8)
        offset += len(batch)
    return [
        {
            "image": images[i],
            "name": names[i],
            "true": CLASS_NAMES[labels[i]],
            "predicted": CLASS_NAMES[predicted[i]],
            "probability": float(confidence[i]),
            "true_probability": float(probs[i, labels[i]]),
        }
        for i in chosen
    ]
