"""The run's `report.md`: summary, variant and per-class tables, warnings, and its figures.

    write_report(run_dir, metrics, record, history)   # metrics.json content, run record, Keras history

Matplotlib on the Agg canvas (no pyplot state); no TensorFlow.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from utilities.runs import RunRecord
from utilities.schema import CLASS_NAMES

CONFUSION_MATRIX_PNG = "confusion_matrix.png"
TRAINING_CURVES_PNG = "training_curves.png"
REPORT_MD = "report.md"
HEADLINE_VARIANT = "model"  # the trained (uncompressed) model; its confusion matrix goes in the report

# Panels of the training-curves figure: title → history key (validation key is "val_" + key).
_CURVE_PANELS = {"loss": "loss", "accuracy": "accuracy", "balanced accuracy": "balanced_accuracy"}


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


def _fusion_weights(metrics: dict, record: RunRecord | None, history: dict) -> dict[str, float]:
    """Final fusion branch weights: metrics' or the record's `fusion_weights`, else the last `fusion/*` epoch."""
    weights = metrics.get("fusion_weights") or (record.fusion_weights if record else None)
    if weights:
        return dict(weights)
    return {key.split("/", 1)[1]: values[-1] for key, values in history.items() if key.startswith("fusion/") and values}


def _fusion_section(weights: dict[str, float]) -> list[str]:
    if not weights:
        return []
    rows = [[branch, _fmt(float(w))] for branch, w in weights.items()]
    return ["## Fusion weights", "", *_md_table(["branch", "weight"], rows), ""]


def _summary_section(record: RunRecord | None) -> list[str]:
    if record is None:
        return []
    devices, data = record.devices, record.data
    fields = {
        "model name": record.model_name,
        "run id": record.run_id,
        "data tag": data.tag if data else None,
        "manifest sha256": data.manifest_sha256 if data else None,
        "git commit": record.code.get("git_commit"),
        "devices": ", ".join(map(str, devices)) if isinstance(devices, list | tuple) else devices,
        "started": record.started,
        "finished": record.finished,
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


def write_report(run_dir: Path, metrics: dict, record: RunRecord | None, history: dict[str, list[float]]) -> Path:
    """Write `report.md` plus its `confusion_matrix.png` and `training_curves.png` into `run_dir`.

    `metrics` is metrics.json, `record` the run's record (None: no run section), `history` Keras
    `History.history` (may be empty).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    title = record.model_name if record else "model"
    lines = [f"# Training report: {title}", "", *_summary_section(record), *_headline_section(metrics)]
    lines += [*_recall_section(metrics), *_fusion_section(_fusion_weights(metrics, record, history))]
    lines += ["## Figures", ""]
    confusion = _headline_confusion(metrics)
    if confusion is not None:
        plot_confusion_matrix(confusion[0], confusion[1], run_dir / CONFUSION_MATRIX_PNG)
        lines.append(f"![confusion matrix]({CONFUSION_MATRIX_PNG})")
    plot_training_curves(history, run_dir / TRAINING_CURVES_PNG)
    lines += [f"![training curves]({TRAINING_CURVES_PNG})", ""]
    if record and record.training and record.training.batchnorm_batches:
        lines += [
            "The curves' validation values were measured during training, before the fine-tuned backbone's "
            "BatchNorm statistics were re-estimated; the tables above evaluate the exported model.",
            "",
        ]
    path = run_dir / REPORT_MD
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
