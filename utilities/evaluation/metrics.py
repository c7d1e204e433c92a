"""Evaluation of trained variants: metrics, agreement, size and latency (the report is `utilities.evaluation.report`).

Pure numpy / scikit-learn; nothing here imports TensorFlow, so it also evaluates TFLite runners and
works in tools without a model:

    y_true, probs = predict(model.predict_on_batch, test_ds)
    metrics = compute_metrics(y_true, probs)              # JSON-ready (results.SplitMetrics reads it)

Conventions: `y_true` are integer class ids (N,), `probs` class probabilities (N, C) in
`CLASS_NAMES` order; the headline metric is balanced accuracy (mean recall over the classes that
occur in `y_true`, as in the ISIC challenge).
"""

from __future__ import annotations

import gzip
import os
import statistics
import tarfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, precision_score, recall_score, roc_auc_score

from utilities.data.schema import CLASS_NAMES

_CHUNK = 1 << 20  # bytes per read when gzipping files


# ── metrics ───────────────────────────────────────────────────────────────────────────────────


def _check_inputs(y_true: np.ndarray, probs: np.ndarray, num_classes: int) -> None:
    if y_true.ndim != 1 or probs.ndim != 2:
        raise ValueError(f"expected y_true (N,) and probs (N, C); got shapes {y_true.shape} and {probs.shape}")
    if len(y_true) != len(probs) or len(y_true) == 0:
        raise ValueError(f"y_true and probs need the same non-zero length; got {len(y_true)} and {len(probs)}")
    if probs.shape[1] != num_classes:
        raise ValueError(f"probs have {probs.shape[1]} columns but there are {num_classes} class names")
    if y_true.min() < 0 or y_true.max() >= num_classes:
        raise ValueError(f"class ids must be in 0..{num_classes - 1}; got {y_true.min()}..{y_true.max()}")
    if not np.isfinite(probs).all():
        raise ValueError("probs contain NaN or infinite values; the model diverged or its input is broken")


def _per_class_auc(y_true: np.ndarray, probs: np.ndarray) -> list[float | None]:
    """One-vs-rest ROC AUC per class column; None for a class without positives or without negatives."""
    aucs: list[float | None] = []
    for c in range(probs.shape[1]):
        positives = y_true == c
        has_both = positives.any() and not positives.all()
        aucs.append(float(roc_auc_score(positives, probs[:, c])) if has_both else None)
    return aucs


def _balanced_accuracy(cm: np.ndarray) -> float:
    """Mean recall over the classes that occur in y_true (rows with support), from a C×C matrix."""
    support = cm.sum(axis=1)
    present = support > 0
    return float(np.mean(np.diag(cm)[present] / support[present]))


def compute_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str] = CLASS_NAMES) -> dict:
    """Classification metrics of one split, all plain Python numbers/lists/dicts (JSON-ready).

    Per-class values are keyed by class name and computed with `labels=range(C)`, so a class absent
    from `y_true` keeps its slot (recall/precision 0 there; `support` tells it apart). `macro_f1`
    averages over the classes present in `y_true` or in the predictions (sklearn's default), so a
    class that neither occurs nor is predicted does not count as a zero.
    """
    y_true = np.asarray(y_true).astype(np.int64).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    _check_inputs(y_true, probs, len(class_names))
    labels = list(range(len(class_names)))
    y_pred = probs.argmax(axis=1)
    aucs = _per_class_auc(y_true, probs)
    known_aucs = [auc for auc in aucs if auc is not None]  # classes with both positives and negatives
    cm = confusion_matrix(y_true, y_pred, labels=labels)  # rows = true class, columns = predicted
    recall = recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    precision = precision_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    seen = sorted(set(y_true.tolist()) | set(y_pred.tolist()))
    predicted = np.bincount(y_pred, minlength=len(class_names))
    return {
        "n": len(y_true),
        # The most often predicted class and its share of the predictions: near 1, the model answers one
        # class whatever the image, and accuracy-like numbers (agreement included) say little.
        "top_class": class_names[int(predicted.argmax())],
        "top_class_share": float(predicted.max() / len(y_true)),
        "accuracy": float(np.mean(y_true == y_pred)),
        "balanced_accuracy": _balanced_accuracy(cm),
        "macro_f1": float(f1_score(y_true, y_pred, labels=seen, average="macro", zero_division=0)),
        "macro_auc": float(np.mean(known_aucs)) if known_aucs else None,
        # None where a class lacks positives or negatives in this split (macro_auc skips those too).
        "per_class_auc": dict(zip(class_names, aucs, strict=True)),
        "per_class_recall": {name: float(v) for name, v in zip(class_names, recall, strict=True)},
        "per_class_precision": {name: float(v) for name, v in zip(class_names, precision, strict=True)},
        "support": {name: int(v) for name, v in zip(class_names, cm.sum(axis=1), strict=True)},
        "confusion_matrix": cm.astype(int).tolist(),
    }


def _label_ids(labels: Any) -> np.ndarray:
    """Class ids (B,) from one-hot labels (B, C) or from ids (B,)."""
    labels = np.asarray(labels)
    return labels.argmax(axis=-1) if labels.ndim == 2 else labels.reshape(-1).astype(np.int64)


def predict(model_fn: Callable[[Any], Any], dataset: Iterable) -> tuple[np.ndarray, np.ndarray]:
    """Run `model_fn(features) -> probs (B, C)` over `(features, onehot_labels[, weights])` batches.

    `model_fn` is e.g. a Keras model's `predict_on_batch` or a TFLite runner wrapper; the dataset is
    a finite tf.data dataset (or any iterable of such tuples). Returns (y_true ids (N,), probs (N, C)).
    """
    ids, outputs = [], []
    for batch in dataset:
        features, labels = batch[0], batch[1]
        probs = np.asarray(model_fn(features), dtype=np.float32)
        ids.append(_label_ids(labels))
        outputs.append(probs.reshape(len(ids[-1]), -1))
    if not ids:
        raise ValueError("the evaluation dataset is empty")
    return np.concatenate(ids), np.concatenate(outputs)


def agreement(probs_a: np.ndarray, probs_b: np.ndarray) -> float:
    """Fraction of examples on which two models predict the same top-1 class."""
    probs_a, probs_b = np.asarray(probs_a), np.asarray(probs_b)
    if probs_a.shape != probs_b.shape or probs_a.size == 0:
        raise ValueError(
            f"agreement needs two non-empty prob arrays of one shape; got {probs_a.shape} and {probs_b.shape}"
        )
    return float(np.mean(probs_a.argmax(axis=-1) == probs_b.argmax(axis=-1)))


# ── size and latency ──────────────────────────────────────────────────────────────────────────


class _ByteCounter:
    """A write-only file object that counts bytes instead of storing them."""

    def __init__(self) -> None:
        self.count = 0

    def write(self, data: bytes) -> int:
        self.count += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def _normalized(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """Strip owner and time so the tar (and its gzip size) depends on names and contents only."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    return info


def _gzip_size(path: Path) -> int:
    """Bytes of `gzip -9` of a file, or of a deterministic tar of a folder (sorted names, no mtimes)."""
    counter = _ByteCounter()
    with gzip.GzipFile(fileobj=counter, mode="wb", compresslevel=9, mtime=0) as gz:
        if path.is_file():
            with path.open("rb") as src:
                while chunk := src.read(_CHUNK):
                    gz.write(chunk)
        else:
            with tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for file in sorted(p for p in path.rglob("*") if p.is_file()):
                    tar.add(file, arcname=file.relative_to(path).as_posix(), filter=_normalized)
    return counter.count


def artifact_size(path: str | os.PathLike) -> dict[str, int]:
    """On-disk size of a model file or folder (e.g. a SavedModel) and its gzip-compressed size.

    `size_bytes` sums the regular files; `gzip_bytes` is the size of one gzip stream: the file
    itself, or for a folder a deterministic tar of it (sorted paths, zeroed owners and mtimes), so
    the number is reproducible and comparable between pruned and dense models.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"cannot measure {path}: no such file or directory")
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return {"size_bytes": sum(f.stat().st_size for f in files), "gzip_bytes": _gzip_size(path)}


def latency_ms(predict_one: Callable[[], Any], warmup: int = 3, repeats: int = 20) -> dict[str, float]:
    """Wall-clock milliseconds of `predict_one()` (one batch-1 prediction): median and 90th percentile.

    The first `warmup` calls (tracing, allocation) are discarded.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"latency needs repeats >= 1 and warmup >= 0; got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        predict_one()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predict_one()
        times.append((time.perf_counter() - start) * 1000.0)
    return {"median": float(statistics.median(times)), "p90": float(np.percentile(times, 90))}
