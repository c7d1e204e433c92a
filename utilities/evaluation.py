"""Evaluation of trained variants: metrics, size and latency, plots and the run's `report.md`.

Pure numpy / scikit-learn / matplotlib (Agg canvas, no pyplot state); nothing here imports
TensorFlow, so it also evaluates TFLite runners and works in tools without a model:

    y_true, probs = predict(model.predict_on_batch, test_ds)
    metrics = compute_metrics(y_true, probs)              # JSON-serialisable
    write_report(run_dir, {"variants": {"model": {"test": metrics}}}, lineage, history.history)

Conventions: `y_true` are integer class ids (N,), `probs` class probabilities (N, C) in
`CLASS_NAMES` order; the headline metric is balanced accuracy (mean recall over the classes that
occur in `y_true`, as in the ISIC challenge).
"""

from __future__ import annotations

import gzip
import math
import os
import statistics
import tarfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import confusion_matrix, f1_score, precision_score, recall_score, roc_auc_score

from utilities.schema import CLASS_NAMES

CONFUSION_MATRIX_PNG = "confusion_matrix.png"
TRAINING_CURVES_PNG = "training_curves.png"
REPORT_MD = "report.md"
HEADLINE_VARIANT = "model"  # the trained (uncompressed) model; its confusion matrix goes in the report

# Panels of the training-curves figure: title → history key (validation key is "val_" + key).
_CURVE_PANELS = {"loss": "loss", "accuracy": "accuracy", "balanced accuracy": "balanced_accuracy"}
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


def _macro_auc(y_true: np.ndarray, probs: np.ndarray) -> float | None:
    """One-vs-rest ROC AUC averaged over classes with both positives and negatives; None if none has."""
    aucs = []
    for c in range(probs.shape[1]):
        positives = y_true == c
        if positives.any() and not positives.all():
            aucs.append(roc_auc_score(positives, probs[:, c]))
    return float(np.mean(aucs)) if aucs else None


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
        "macro_auc": _macro_auc(y_true, probs),
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


# ── plots ─────────────────────────────────────────────────────────────────────────────────────


def plot_confusion_matrix(cm: Sequence[Sequence[int]], class_names: Sequence[str], path: str | os.PathLike) -> Path:
    """PNG of a confusion matrix: colour = row-normalised recall, text = counts; rows = true class."""
    counts = np.asarray(cm, dtype=np.int64)
    support = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, support, out=np.zeros(counts.shape, dtype=float), where=support > 0)
    fig = Figure(figsize=(1.0 + 0.7 * len(class_names), 0.8 + 0.6 * len(class_names)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    ticks = range(len(class_names))
    ax.set(xticks=ticks, yticks=ticks, xlabel="predicted", ylabel="true", title="Confusion matrix (test)")
    ax.set_xticklabels(class_names, rotation=45, ha="right")
    ax.set_yticklabels(class_names)
    for (row, col), count in np.ndenumerate(counts):
        ax.text(
            col,
            row,
            str(count),
            ha="center",
            va="center",
            fontsize=8,
            color="white" if rates[row, col] > 0.5 else "black",
        )
    fig.colorbar(image, ax=ax, label="fraction of true class")
    return _save(fig, path)


def plot_training_curves(history: dict[str, list[float]], path: str | os.PathLike) -> Path:
    """PNG with one panel per tracked metric (loss, accuracy, balanced accuracy): train vs val by epoch."""
    panels = {title: key for title, key in _CURVE_PANELS.items() if key in history or f"val_{key}" in history}
    fig = Figure(figsize=(4.0 * max(len(panels), 1), 3.2), layout="constrained")
    axes = fig.subplots(1, max(len(panels), 1), squeeze=False)[0]
    if not panels:
        axes[0].text(0.5, 0.5, "no training history", ha="center", va="center")
        axes[0].set_axis_off()
    epochs = max((len(values) for values in history.values()), default=1)
    for ax, (title, key) in zip(axes, panels.items(), strict=False):
        ax.set_xlim(0.5, epochs + 0.5)  # whole epochs, also for a one-epoch run
        for label, name in (("train", key), ("val", f"val_{key}")):
            values = [math.nan if v is None else float(v) for v in history.get(name, [])]
            if values:
                ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=label)
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# ── report ────────────────────────────────────────────────────────────────────────────────────


def _latency_parts(latency: Any) -> tuple[float | None, float | None]:
    """(median, p90) from `latency_ms()`'s dict or a bare number of milliseconds."""
    if isinstance(latency, dict):
        return latency.get("median"), latency.get("p90")
    return (float(latency), None) if isinstance(latency, int | float) else (None, None)


COLLAPSE_SHARE = 0.9  # a variant predicting one class for at least this share of a split is flagged


def collapse_warnings(metrics: dict) -> list[str]:
    """One line per variant and split whose predictions are (nearly) all one class, with its agreement."""
    lines = []
    for name, variant in metrics.get("variants", {}).items():
        for split in ("val", "test"):
            m = variant.get(split) or {}
            share = m.get("top_class_share")
            if share is not None and share >= COLLAPSE_SHARE:
                agreement = variant.get("agreement")
                beside = (
                    "" if agreement is None else f"; its agreement {agreement:.3f} with the float model means as little"
                )
                lines.append(
                    f"{name} predicts {m['top_class']} for {share:.0%} of {split} "
                    f"(balanced accuracy {m['balanced_accuracy']:.3f}){beside}"
                )
    return lines


def comparison_rows(metrics: dict) -> list[dict]:
    """One flat row per variant for tables (report and W&B); absent values are None.

    `metrics` is metrics.json: `{"variants": {name: {"val": {...}, "test": {...}, "size_bytes", ...}}}`.
    """
    rows = []
    for name, variant in metrics.get("variants", {}).items():
        test, val = variant.get("test") or {}, variant.get("val") or {}
        median, p90 = _latency_parts(variant.get("latency_ms"))
        rows.append(
            {
                "variant": name,
                "test_balanced_accuracy": test.get("balanced_accuracy"),
                "test_accuracy": test.get("accuracy"),
                "test_macro_f1": test.get("macro_f1"),
                "test_macro_auc": test.get("macro_auc"),
                "val_balanced_accuracy": val.get("balanced_accuracy"),
                "size_bytes": variant.get("size_bytes"),
                "gzip_bytes": variant.get("gzip_bytes"),
                "latency_ms_median": median,
                "latency_ms_p90": p90,
                "params": variant.get("params"),
                "agreement": variant.get("agreement"),
            }
        )
    return rows


def _fmt(value: Any, kind: str = "float") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if kind == "mb":
        return f"{value / 1e6:.2f}"
    if kind == "ms":
        return f"{value:.2f}"
    if kind == "int":
        return f"{int(value):,}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


_HEADLINE_COLUMNS = (  # (header, row key, format)
    ("variant", "variant", "str"),
    ("test bal. acc.", "test_balanced_accuracy", "float"),
    ("test acc.", "test_accuracy", "float"),
    ("test macro F1", "test_macro_f1", "float"),
    ("test macro AUC", "test_macro_auc", "float"),
    ("val bal. acc.", "val_balanced_accuracy", "float"),
    ("size MB", "size_bytes", "mb"),
    ("gzip MB", "gzip_bytes", "mb"),
    ("latency ms (median)", "latency_ms_median", "ms"),
    ("params", "params", "int"),
    ("agreement", "agreement", "float"),
)


def _headline_section(metrics: dict) -> list[str]:
    rows = [[_fmt(row[key], kind) for _, key, kind in _HEADLINE_COLUMNS] for row in comparison_rows(metrics)]
    warnings = [f"> **Warning:** {line}." for line in collapse_warnings(metrics)]
    return ["## Variants", "", *_md_table([h for h, _, _ in _HEADLINE_COLUMNS], rows), "", *warnings, ""]


def _split_metrics(variant: dict) -> dict:
    """The variant's test metrics, or its val metrics when it was not tested."""
    return variant.get("test") or variant.get("val") or {}


def _recall_section(metrics: dict) -> list[str]:
    variants = {name: _split_metrics(v) for name, v in metrics.get("variants", {}).items()}
    variants = {name: m for name, m in variants.items() if m.get("per_class_recall")}
    if not variants:
        return []
    reference = variants.get(HEADLINE_VARIANT) or next(iter(variants.values()))
    classes = list(reference["per_class_recall"])
    support = reference.get("support", {})
    rows = [
        [c, _fmt(support.get(c), "int"), *(_fmt(m["per_class_recall"].get(c)) for m in variants.values())]
        for c in classes
    ]
    return ["## Per-class recall (test)", "", *_md_table(["class", "support", *variants], rows), ""]


def _fusion_weights(metrics: dict, lineage: dict, history: dict) -> dict[str, float]:
    """Final fusion branch weights: metrics or lineage `fusion_weights`, else the last `fusion/*` epoch."""
    weights = metrics.get("fusion_weights") or lineage.get("fusion_weights")
    if weights:
        return dict(weights)
    return {key.split("/", 1)[1]: values[-1] for key, values in history.items() if key.startswith("fusion/") and values}


def _fusion_section(weights: dict[str, float]) -> list[str]:
    if not weights:
        return []
    rows = [[branch, _fmt(float(w))] for branch, w in weights.items()]
    return ["## Fusion weights", "", *_md_table(["branch", "weight"], rows), ""]


def _lineage_value(lineage: dict, key: str, *config_path: str) -> Any:
    """`lineage[key]`, else the value at `lineage["config"][config_path...]`, else None."""
    if lineage.get(key) is not None:
        return lineage[key]
    node: Any = lineage.get("config") or {}
    for part in config_path:
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _summary_section(lineage: dict) -> list[str]:
    devices = lineage.get("devices")
    fields = {
        "model name": _lineage_value(lineage, "model_name", "output", "model_name"),
        "run id": _lineage_value(lineage, "run_id", "output", "run_id"),
        "data tag": _lineage_value(lineage, "data_tag", "data", "data_tag"),
        "manifest sha256": lineage.get("manifest_sha256"),
        "git commit": lineage.get("git_commit"),
        "devices": ", ".join(map(str, devices)) if isinstance(devices, list | tuple) else devices,
        "started": lineage.get("start_time"),
        "finished": lineage.get("end_time"),
    }
    lines = [f"- **{name}**: `{value}`" for name, value in fields.items() if value not in (None, "")]
    return ["## Run", "", *lines, ""]


def _headline_confusion(metrics: dict) -> tuple[list[list[int]], list[str]] | None:
    """(confusion matrix, class names) of the headline variant's test split, else of any variant."""
    variants = metrics.get("variants", {})
    ordered = [variants[HEADLINE_VARIANT]] if HEADLINE_VARIANT in variants else []
    for variant in [*ordered, *variants.values()]:
        split = _split_metrics(variant)
        if split.get("confusion_matrix"):
            names = list(split.get("per_class_recall") or CLASS_NAMES)
            return split["confusion_matrix"], names
    return None


def write_report(run_dir: Path, metrics: dict, lineage: dict, history: dict[str, list[float]]) -> Path:
    """Write `report.md` plus its `confusion_matrix.png` and `training_curves.png` into `run_dir`.

    `metrics` is metrics.json, `lineage` run.json (keys read: model_name, run_id, data_tag,
    manifest_sha256, git_commit, devices, start_time, end_time, fusion_weights; names and tag fall
    back to `lineage["config"]`), `history` Keras `History.history` (may be empty).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    title = _lineage_value(lineage, "model_name", "output", "model_name") or "model"
    lines = [f"# Training report: {title}", "", *_summary_section(lineage), *_headline_section(metrics)]
    lines += [*_recall_section(metrics), *_fusion_section(_fusion_weights(metrics, lineage, history))]
    lines += ["## Figures", ""]
    confusion = _headline_confusion(metrics)
    if confusion is not None:
        plot_confusion_matrix(confusion[0], confusion[1], run_dir / CONFUSION_MATRIX_PNG)
        lines.append(f"![confusion matrix]({CONFUSION_MATRIX_PNG})")
    plot_training_curves(history, run_dir / TRAINING_CURVES_PNG)
    lines += [f"![training curves]({TRAINING_CURVES_PNG})", ""]
    if (lineage.get("training") or {}).get("batchnorm_batches"):
        lines += [
            "The curves' validation values were measured during training, before the fine-tuned backbone's "
            "BatchNorm statistics were re-estimated; the tables above evaluate the exported model.",
            "",
        ]
    path = run_dir / REPORT_MD
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
