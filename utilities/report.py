"""The run's `report.md`: summary, variant and per-class tables, warnings, and its figures.

    write_report(run_dir, metrics, record, history, gallery=None)
    # metrics.json content, run record, Keras history, optional most-confident-mistakes thumbnails

Sections and figures from metrics.json's analysis keys (bootstrap intervals, calibration, triage,
subgroups) appear only when those keys are there, so an older metrics.json renders as before.
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
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from utilities.analysis import MIN_SUPPORT, largest_gap
from utilities.runs import RunRecord
from utilities.schema import CLASS_NAMES

CONFUSION_MATRIX_PNG = "confusion_matrix.png"
TRAINING_CURVES_PNG = "training_curves.png"
RELIABILITY_PNG = "reliability.png"
SUBGROUPS_PNG = "subgroups.png"
ERROR_GALLERY_PNG = "error_gallery.png"
REPORT_MD = "report.md"
HEADLINE_VARIANT = "model"  # the trained (uncompressed) model; its confusion matrix goes in the report

# Panels of the training-curves figure: title → history key (validation key is "val_" + key).
_CURVE_PANELS = {"loss": "loss", "accuracy": "accuracy", "balanced accuracy": "balanced_accuracy"}
MIN_SUBGROUP_SUPPORT = MIN_SUPPORT  # subgroups with fewer test images are shown but not compared (too noisy)
_MAX_PANEL_COLUMNS = 4  # reliability panels per row


# ── plots ─────────────────────────────────────────────────────────────────────────────────────


def plot_confusion_matrix(
    cm: Sequence[Sequence[int]], class_names: Sequence[str], path: str | os.PathLike, title: str = "test"
) -> Path:
    """PNG of a confusion matrix: colour = row-normalised recall, text = counts; rows = true class.

    Each row's label carries its image count, so a dark one-image row is not read as a dark 500-image one;
    `title` names what was scored (variant, split, data tag).
    """
    counts = np.asarray(cm, dtype=np.int64)
    support = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, support, out=np.zeros(counts.shape, dtype=float), where=support > 0)
    fig = Figure(figsize=(1.6 + 0.7 * len(class_names), 0.8 + 0.6 * len(class_names)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    ticks = range(len(class_names))
    ax.set(xticks=ticks, yticks=ticks, xlabel="predicted", ylabel="true (images)")
    ax.set_title(f"Confusion matrix: {title}", fontsize=10)
    ax.set_xticklabels(class_names, rotation=45, ha="right")
    ax.set_yticklabels([f"{name} ({int(n)})" for name, n in zip(class_names, support[:, 0], strict=True)])
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
    fig.colorbar(image, ax=ax, label="fraction of the true class's images")
    return _save(fig, path)


def plot_training_curves(
    history: dict[str, list[float]], path: str | os.PathLike, exported_val: float | None = None
) -> Path:
    """PNG with one panel per tracked metric (loss, accuracy, balanced accuracy): train vs val by epoch.

    A dotted line marks the best epoch by val balanced accuracy (the weights early stopping keeps);
    `exported_val`, the exported model's val balanced accuracy (after a fine-tuned backbone's BatchNorm
    re-estimation, so it may differ from the curve), is a star at that epoch.
    """
    panels = {title: key for title, key in _CURVE_PANELS.items() if key in history or f"val_{key}" in history}
    fig = Figure(figsize=(4.0 * max(len(panels), 1), 3.4), layout="constrained")
    axes = fig.subplots(1, max(len(panels), 1), squeeze=False)[0]
    if not panels:
        axes[0].text(0.5, 0.5, "no training history", ha="center", va="center")
        axes[0].set_axis_off()
    epochs = max((len(values) for values in history.values()), default=1)
    best = _best_epoch(history.get("val_balanced_accuracy") or [])
    for ax, (title, key) in zip(axes, panels.items(), strict=False):
        ax.set_xlim(0.5, epochs + 0.5)  # whole epochs, also for a one-epoch run
        for label, name in (("train", key), ("val (during training)", f"val_{key}")):
            values = [math.nan if v is None else float(v) for v in history.get(name, [])]
            if values:
                ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=label)
        if best is not None:
            ax.axvline(best, color="0.4", linestyle=":", linewidth=1, label=f"best epoch ({best})")
        if key == "balanced_accuracy" and exported_val is not None:
            ax.plot(
                [best or epochs],
                [exported_val],
                marker="*",
                markersize=11,
                color="C3",
                linestyle="none",
                label=f"exported model, val ({exported_val:.2f})",
            )
        ax.set(title=title, xlabel="epoch", ylabel=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def _best_epoch(values: Sequence[float | None]) -> int | None:
    """1-based epoch of the highest value (the first of ties, as Keras' EarlyStopping keeps it), or None."""
    scored = [(v, -i) for i, v in enumerate(values) if v is not None and not math.isnan(v)]
    return None if not scored else 1 - max(scored)[1]


def _grid(n: int, max_columns: int) -> tuple[int, int]:
    """(rows, columns) of a grid holding n panels, at most `max_columns` wide."""
    columns = max(1, min(n, max_columns))
    return math.ceil(n / columns), columns


def plot_reliability(
    panels: dict[str, dict],
    path: str | os.PathLike,
    before: dict[str, dict] | None = None,
    val: dict[str, dict] | None = None,
) -> Path:
    """PNG with one reliability diagram per variant: accuracy vs mean confidence per bin, and the diagonal.

    `panels` maps variant name → the test split's `reliability` dict (`bins`, `ece`, per-bin
    `confidence`, `accuracy` (None for an empty bin) and `count`); point area grows with the bin's count.
    `val`: the same for the validation split, drawn as a thinner line; `before`: for temperature-scaled
    variants, the test split before scaling, in grey. Under each diagram, on its own axis, the share of
    the test images in each equal-width confidence bin.
    """
    before, val, legend = before or {}, val or {}, {}
    rows, columns = _grid(len(panels), _MAX_PANEL_COLUMNS)
    fig = Figure(figsize=(max(6.4, 0.6 + 2.9 * columns), 0.8 + 3.6 * rows), layout="constrained")
    fig.get_layout_engine().set(w_pad=0.06, wspace=0.04)  # keeps one panel's "1" off the next one's "0"
    grid = fig.add_gridspec(2 * rows, columns, height_ratios=[3, 1] * rows)
    for i, (name, reliability) in enumerate(panels.items()):
        row, column = divmod(i, columns)
        ax = fig.add_subplot(grid[2 * row, column])
        share_ax = fig.add_subplot(grid[2 * row + 1, column], sharex=ax)
        _reliability_share(share_ax, reliability, first=column == 0)
        if name in before:
            _reliability_curve(ax, before[name], "0.55", "test, before calibration")
        if name in val:
            _reliability_curve(ax, val[name], "C1", "val")
        _reliability_points(ax, reliability)
        ax.plot([0, 1], [0, 1], linestyle="--", color="0.35", linewidth=1, label="perfectly calibrated")
        ece = reliability.get("ece")
        was = f"{before[name]['ece']:.3f} → " if name in before and before[name].get("ece") is not None else ""
        val_ece = val.get(name, {}).get("ece")
        title = name if ece is None else f"{name}  test ECE {was}{ece:.3f}"
        ax.set_title(title if val_ece is None else f"{title}, val {val_ece:.3f}", fontsize=10)
        ax.set(xlim=(0, 1), ylim=(0, 1))
        ax.set_yticks([0, 0.25, 0.5, 0.75, 1], ["0", "", "0.5", "", "1"])
        ax.tick_params(labelbottom=False)
        if column == 0:
            ax.set_ylabel("accuracy", fontsize=9)
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        for label, handle in zip(labels, handles, strict=True):
            legend.setdefault(label, handle)
    # Outside the panels: inside, it hid the points of an under-confident model (upper left).
    fig.legend(legend.values(), legend.keys(), loc="outside lower center", ncols=2, fontsize=7, markerscale=0.6)
    fig.suptitle("Reliability (test; val where shown)")
    return _save(fig, path)


def _reliability_curve(ax, reliability: dict, colour: str, label: str) -> None:
    """Accuracy per filled bin as a line with small markers."""
    points = [
        (c, a) for c, a in zip(reliability["confidence"], reliability["accuracy"], strict=False) if None not in (c, a)
    ]
    if points:
        conf, acc = zip(*points, strict=True)
        ax.plot(conf, acc, color=colour, linewidth=1, marker="o", markersize=3, zorder=2, label=label)


def _reliability_points(ax, reliability: dict) -> None:
    """The test curve: accuracy per filled bin, point area ∝ the bin's images."""
    counts = np.asarray(reliability["count"], dtype=float)
    filled = [
        (conf, acc, count)
        for conf, acc, count in zip(reliability["confidence"], reliability["accuracy"], counts, strict=False)
        if conf is not None and acc is not None
    ]
    if filled:
        conf, acc, count = (np.asarray(column, dtype=float) for column in zip(*filled, strict=True))
        ax.plot(conf, acc, color="C0", linewidth=1, zorder=3)
        area = 12 + 120 * count / count.max()
        ax.scatter(conf, acc, s=area, color="C0", zorder=4, clip_on=False, label="test (area ∝ images)")


def _reliability_share(ax, reliability: dict, first: bool) -> None:
    """Bars: the share of images in each confidence bin, on an axis of their own under the diagram."""
    bins = int(reliability.get("bins") or len(reliability["count"]))
    counts = np.asarray(reliability["count"], dtype=float)
    ax.bar(
        (np.arange(bins) + 0.5) / bins, counts / max(counts.sum(), 1.0), width=1.0 / bins, color="0.8", edgecolor="0.6"
    )
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1], ["0", "", "0.5", "", "1"])
    ax.set_xlabel("confidence (top-1 probability)", fontsize=8)
    ax.yaxis.set_major_locator(MaxNLocator(2))
    ax.tick_params(labelsize=7)
    if first:
        ax.set_ylabel("share of\nimages", fontsize=8)
    ax.grid(alpha=0.3)


def _bar_colour(value: float | None, count: int, low: float | None, min_support: int) -> str:
    """Grey: too few images to compare; orange: below `low`, the split's 95 % interval; blue: otherwise.
    (Below the point estimate alone would flag half the groups by chance.)"""
    if count < min_support:
        return "0.82"
    return "C1" if low is not None and value is not None and value < low else "C0"


def plot_subgroups(
    subgroups: dict[str, dict[str, dict]],
    path: str | os.PathLike,
    overall: float | None = None,
    min_support: int = MIN_SUBGROUP_SUPPORT,
    low: float | None = None,
) -> Path:
    """PNG with one panel per attribute (sex, age, site): balanced accuracy per group as horizontal bars.

    `subgroups` is a split's `subgroups` dict (attribute → group → {"n", "balanced_accuracy", …});
    `overall` (the split's balanced accuracy) is a dashed line; groups below `low` (the lower end of its
    95 % interval) are orange, groups with fewer than `min_support` images grey and hatched (shown, not
    compared). Each bar ends in a tick, so a group at 0 is still seen; values and counts stand right of
    the 0..1 axis; the legend names only the kinds of bar drawn.
    """
    attributes = {name: groups for name, groups in subgroups.items() if groups}
    heights = [len(groups) + 1.0 for groups in attributes.values()]
    fig = Figure(figsize=(7.2, 1.4 + 0.28 * sum(heights)), layout="constrained")
    grid = {"height_ratios": heights}
    axes = fig.subplots(len(attributes), 1, squeeze=False, sharex=True, gridspec_kw=grid)[:, 0]
    drawn: set[str] = set()
    for ax, (attribute, groups) in zip(axes, attributes.items(), strict=True):
        values = [stats.get("balanced_accuracy") for stats in groups.values()]
        counts = [int(stats.get("n") or 0) for stats in groups.values()]
        colours = [_bar_colour(v, n, low, min_support) for v, n in zip(values, counts, strict=True)]
        drawn.update(c for c, v in zip(colours, values, strict=True) if v is not None)
        positions = np.arange(len(groups))
        ends = [v or 0.0 for v in values]
        bars = ax.barh(positions, ends, color=colours, edgecolor="0.45", linewidth=0.6)
        for bar, count in zip(bars, counts, strict=True):
            bar.set_hatch("///" if count < min_support else "")
        scored = [(e, y, c) for e, y, c, v in zip(ends, positions, colours, values, strict=True) if v is not None]
        if scored:
            x, y, c = zip(*scored, strict=True)
            ticks = ["0.35" if colour == "0.82" else colour for colour in c]  # a grey tick on grey bars is lost
            ax.scatter(x, y, marker="|", s=140, c=ticks, linewidths=2, zorder=3, clip_on=False)
        if overall is not None:
            ax.axvline(overall, color="0.25", linestyle="--", linewidth=1)
        for y, value, count in zip(positions, values, counts, strict=True):
            label = f"no value  n={count}" if value is None else f"{value:.2f}  n={count}"
            ax.text(1.02, y, label, va="center", fontsize=8, transform=ax.get_yaxis_transform())
        ax.set_yticks(positions, list(groups), fontsize=9)
        ax.invert_yaxis()  # groups top to bottom in their metrics.json order
        ax.set_xlim(0, 1)
        ax.set_title(attribute, loc="left", fontsize=10, fontweight="bold")
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlabel("balanced accuracy (test)")
    axes[-1].set_xticks(np.linspace(0, 1, 6))
    fig.legend(
        handles=_subgroup_legend(drawn, overall, low, min_support),
        loc="outside lower center",
        ncols=2,
        fontsize=8,
        frameon=False,
    )
    fig.suptitle("Balanced accuracy by subgroup (test)")
    return _save(fig, path)


def _subgroup_legend(drawn: set[str], overall: float | None, low: float | None, min_support: int) -> list:
    """Legend entries for the bar colours in `drawn` and the dashed whole-split line."""
    above = f"n ≥ {min_support}" + (", within or above the interval" if low is not None else "")
    kinds = {
        "C0": Patch(facecolor="C0", edgecolor="0.45", label=above),
        "C1": Patch(
            facecolor="C1", edgecolor="0.45", label=f"n ≥ {min_support}, below its 95% interval (< {low or 0:.2f})"
        ),
        "0.82": Patch(facecolor="0.82", edgecolor="0.45", hatch="///", label=f"n < {min_support}: too few to compare"),
    }
    handles = [patch for colour, patch in kinds.items() if colour in drawn]
    if overall is not None:
        handles.append(
            Line2D([], [], color="0.25", linestyle="--", linewidth=1, label=f"all test images ({overall:.2f})")
        )
    return handles


def _short(text: str, limit: int = 18) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def plot_error_gallery(items: Sequence[dict], path: str | os.PathLike, columns: int = 6) -> Path:
    """PNG grid of thumbnails, in the given order, each captioned name, `true MEL → predicted AK` and the
    probabilities the model gave the predicted and the true class.

    `items`: dicts with "image" (uint8 (H, W, 3)), "name", "true", "predicted", "probability" (the
    predicted class's) and optionally "true_probability", already sorted most confident first.
    """
    if not items:
        raise ValueError("plot_error_gallery needs at least one item; skip the figure when there are no mistakes")
    rows, columns = _grid(len(items), columns)
    fig = Figure(figsize=(1.7 * columns, 2.0 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, item in zip(axes.flat, items, strict=False):
        ax.imshow(np.asarray(item["image"], dtype=np.uint8))
        odds = f"p(pred) {item['probability']:.2f}"
        if item.get("true_probability") is not None:
            odds += f" · p(true) {item['true_probability']:.2f}"
        caption = f"{_short(str(item['name']))}\ntrue {item['true']} → pred {item['predicted']}\n{odds}"
        ax.set_title(caption, fontsize=7, linespacing=1.2)
    fig.suptitle("Most confident mistakes (test): true class → predicted class, and the probability of each")
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
        bal_low, bal_high = _interval(test, "balanced_accuracy")
        auc_low, auc_high = _interval(test, "macro_auc")
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
                "test_balanced_accuracy_ci95_low": bal_low,
                "test_balanced_accuracy_ci95_high": bal_high,
                "test_macro_auc_ci95_low": auc_low,
                "test_macro_auc_ci95_high": auc_high,
                "test_ece": test.get("ece"),
            }
        )
    return rows


def _interval(split: dict, key: str) -> tuple[float | None, float | None]:
    """(low, high) of a split's bootstrap interval of `key`, or (None, None) when it has none."""
    bounds = (split.get("ci95") or {}).get(key)
    return (bounds[0], bounds[1]) if bounds else (None, None)


def _fmt(value: Any, kind: str = "float") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if kind == "mb":
        return f"{value / 1e6:.2f}"
    if kind == "ms":
        return f"{value:.2f}"
    if kind == "int":
        return f"{int(value):,}"
    if kind == "p3":
        return f"{value:.3f}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


_HEADLINE_COLUMNS = (  # (header, row key, format); "ci": the value with its interval when there is one
    ("variant", "variant", "str"),
    ("test bal. acc.", "test_balanced_accuracy", "ci"),
    ("test acc.", "test_accuracy", "float"),
    ("test macro F1", "test_macro_f1", "float"),
    ("test macro AUC", "test_macro_auc", "ci"),
    ("val bal. acc.", "val_balanced_accuracy", "float"),
    ("size MB", "size_bytes", "mb"),
    ("gzip MB", "gzip_bytes", "mb"),
    ("latency ms (median)", "latency_ms_median", "ms"),
    ("params", "params", "int"),
    ("agreement", "agreement", "float"),
)


def _cell(row: dict, key: str, kind: str) -> str:
    """A headline cell; a "ci" column reads `0.716 [0.61, 0.80]` when the row has the interval."""
    low, high = row.get(f"{key}_ci95_low"), row.get(f"{key}_ci95_high")
    if kind != "ci" or row[key] is None or low is None or high is None:
        return _fmt(row[key], "float" if kind == "ci" else kind)
    return f"{row[key]:.3f} [{low:.2f}, {high:.2f}]"


def _interval_note(metrics: dict) -> list[str]:
    """One line saying what the headline intervals are (level and resamples), if any variant has them."""
    settings = {
        (ci.get("level", 0.95), ci.get("resamples"))
        for variant in metrics.get("variants", {}).values()
        if (ci := (variant.get("test") or {}).get("ci95"))
    }
    if not settings:
        return []
    how = "; ".join(
        f"{level:.0%} stratified bootstrap over the test images, {_fmt(resamples, 'int')} resamples"
        for level, resamples in sorted(settings, key=str)
    )
    return [f"Brackets: {how}.", ""]


def _headline_section(metrics: dict) -> list[str]:
    rows = [[_cell(row, key, kind) for _, key, kind in _HEADLINE_COLUMNS] for row in comparison_rows(metrics)]
    warnings = [f"> **Warning:** {line}." for line in collapse_warnings(metrics)]
    table = _md_table([h for h, _, _ in _HEADLINE_COLUMNS], rows)
    return ["## Variants", "", *table, "", *_interval_note(metrics), *warnings, ""]


def _split_metrics(variant: dict) -> dict:
    """The variant's test metrics, or its val metrics when it was not tested."""
    return variant.get("test") or variant.get("val") or {}


def _per_class_section(metrics: dict, key: str = "per_class_recall", title: str = "Per-class recall") -> list[str]:
    """Table class × variant of a per-class metric (recall, AUC) of each variant's test split."""
    variants = {name: _split_metrics(v) for name, v in metrics.get("variants", {}).items()}
    variants = {name: m for name, m in variants.items() if m.get(key)}
    if not variants:
        return []
    reference = variants.get(HEADLINE_VARIANT) or next(iter(variants.values()))
    classes = list(reference[key])
    support = reference.get("support", {})
    rows = [[c, _fmt(support.get(c), "int"), *(_fmt(m[key].get(c)) for m in variants.values())] for c in classes]
    return [f"## {title} (test)", "", *_md_table(["class", "support", *variants], rows), ""]


# ── calibration, triage, subgroups (metrics.json's analysis keys; each section only with its data) ──


def _splits(variant: dict) -> tuple[dict, dict]:
    return variant.get("val") or {}, variant.get("test") or {}


def _calibration_section(metrics: dict, run_dir: Path) -> list[str]:
    """ECE per variant and split; for temperature-scaled variants, before → after; the reliability figure."""
    variants = metrics.get("variants", {})
    calibrated = {name: v for name, v in variants.items() if v.get("calibration")}
    lines = [*_ece_table(variants), *(_temperature_table(calibrated) if calibrated else [])]
    if not lines:
        return []
    if panels := _reliability_panels(metrics):
        before = {
            name: v["calibration"]["reliability_before"]
            for name, v in calibrated.items()
            if name in panels and v["calibration"].get("reliability_before")
        }
        plot_reliability(panels, run_dir / RELIABILITY_PNG, before, _reliability_panels(metrics, "val"))
        lines += [f"![reliability diagrams]({RELIABILITY_PNG})", ""]
    return ["## Calibration", "", *lines]


def _ece_table(variants: dict[str, dict]) -> list[str]:
    """Variant × (val ECE, test ECE) and what ECE is; nothing when no variant has one."""
    eces = {name: tuple(split.get("ece") for split in _splits(v)) for name, v in variants.items()}
    rows = [
        [name, _fmt(val, "p3"), _fmt(test, "p3")] for name, (val, test) in eces.items() if (val, test) != (None, None)
    ]
    if not rows:
        return []
    reliability = [split.get("reliability") or {} for v in variants.values() for split in _splits(v)]
    bins = next((r["bins"] for r in reliability if r.get("bins")), None)
    binning = f"{bins} equal-width confidence bins" if bins else "equal-width confidence bins"
    note = (
        f"ECE: expected calibration error, the image-weighted mean |accuracy − confidence| over {binning}; "
        "0 is perfectly calibrated. A temperature-scaled variant's values are those after scaling."
    )
    return [*_md_table(["variant", "val ECE", "test ECE"], rows), "", note, ""]


def _before_after(before: Any, after: Any) -> str:
    return f"{_fmt(before, 'p3')} → {_fmt(after, 'p3')}"


def _temperature_table(calibrated: dict[str, dict]) -> list[str]:
    """Temperature, ECE and balanced accuracy before → after scaling; a warning if the accuracy moved."""
    header = ["variant", "temperature", "val ECE", "test ECE", "val bal. acc.", "test bal. acc.", "test macro AUC"]
    rows, warnings = [], []
    for name, variant in calibrated.items():
        cal, splits = variant["calibration"], dict(zip(("val", "test"), _splits(variant), strict=True))
        ece_before, ece_after = cal.get("ece_before") or {}, cal.get("ece_after") or {}
        acc_before = cal.get("balanced_accuracy_before") or {}
        row = [name, _fmt(cal.get("temperature"), "p3")]
        row += [_before_after(ece_before.get(s), ece_after.get(s, splits[s].get("ece"))) for s in splits]
        row += [_before_after(acc_before.get(s), splits[s].get("balanced_accuracy")) for s in splits]
        row.append(_before_after((cal.get("macro_auc_before") or {}).get("test"), splits["test"].get("macro_auc")))
        rows.append(row)
        for split, m in splits.items():
            before, after = acc_before.get(split), m.get("balanced_accuracy")
            if before is not None and after is not None and abs(before - after) > 1e-9:
                warnings.append(
                    f"> **Warning:** {name}'s {split} balanced accuracy changed with temperature scaling "
                    f"({before:.4f} → {after:.4f}); one temperature cannot change a prediction."
                )
    intro = (
        "Temperature scaling divides the log-probabilities by one fitted temperature: it changes confidence, "
        "not predictions (balanced accuracy is unchanged). AUCs can move: each image's probabilities are "
        "renormalised on their own, so one class's ranking across images may change."
    )
    return [
        "### Temperature scaling",
        "",
        intro,
        "",
        *_md_table(header, rows),
        "",
        *warnings,
        *([""] if warnings else []),
    ]


def _reliability_panels(metrics: dict, split: str = "test") -> dict[str, dict]:
    """Variant → its `split`'s `reliability` dict, for variants that have one with at least one filled bin."""
    panels = {}
    for name, variant in metrics.get("variants", {}).items():
        reliability = (variant.get(split) or {}).get("reliability")
        if reliability and any(c is not None for c in reliability.get("confidence", [])):
            panels[name] = {"ece": (variant.get(split) or {}).get("ece"), **reliability}
    return panels


_MALIGNANT = "MEL, BCC, SCC, AK"
_TRIAGE_TASKS = {"melanoma": "melanoma vs rest", "malignant": f"malignant ({_MALIGNANT}) vs benign"}


def _spec_label(key: str) -> str:
    return f"sens. @ {float(key):.0%} spec."


def _triage_section(metrics: dict) -> list[str]:
    """Per variant and binary task (test): positives, negatives, AUC, sensitivity at fixed specificities."""
    triage = {name: (v.get("test") or {}).get("triage") for name, v in metrics.get("variants", {}).items()}
    triage = {name: t for name, t in triage.items() if t}
    if not triage:
        return []
    specs = sorted(
        {k for t in triage.values() for task in t.values() for k in task.get("sensitivity_at_specificity", {})},
        key=float,
    )
    rows = []
    for name, tasks in triage.items():
        for task, label in _TRIAGE_TASKS.items():
            if task not in tasks:
                continue
            t = tasks[task]
            sens = t.get("sensitivity_at_specificity") or {}
            rows.append(
                [
                    name,
                    label,
                    _fmt(t.get("positives"), "int"),
                    _fmt(t.get("negatives"), "int"),
                    _fmt(t.get("auc"), "p3"),
                    *(_fmt(sens.get(k), "p3") for k in specs),
                ]
            )
    header = ["variant", "task", "positives", "negatives", "AUC", *map(_spec_label, specs)]
    note = (
        "Sensitivity at a specificity: the share of positives caught when the threshold on the task's probability "
        "is set so that that share of negatives is cleared (thresholds in metrics.json)."
    )
    return ["## Triage (test)", "", *_md_table(header, rows), "", note, ""]


def _gap_sentence(subgroups: dict[str, dict[str, dict]], min_support: int = MIN_SUBGROUP_SUPPORT) -> str:
    gap = largest_gap(subgroups, min_support)
    if gap is None:
        return f"No attribute has two groups with ≥ {min_support} test images, so no gap between groups is named."
    groups = subgroups[gap["attribute"]]
    best, worst = groups[gap["best"]], groups[gap["worst"]]
    return (
        f"Largest gap between groups with ≥ {min_support} test images: by {gap['attribute']}, "
        f"{gap['worst']} {worst['balanced_accuracy']:.3f} (n={worst['n']}) vs {gap['best']} "
        f"{best['balanced_accuracy']:.3f} (n={best['n']}), {gap['gap']:.3f} balanced accuracy apart."
    )


def _headline_subgroups(metrics: dict) -> dict[str, dict[str, dict]]:
    return ((metrics.get("variants", {}).get(HEADLINE_VARIANT) or {}).get("test") or {}).get("subgroups") or {}


def _subgroup_section(metrics: dict, run_dir: Path) -> list[str]:
    """Per attribute a table group × (n, balanced accuracy, per-class recall), the largest gap, the figure."""
    subgroups = {attribute: groups for attribute, groups in _headline_subgroups(metrics).items() if groups}
    if not subgroups:
        return []
    test = metrics["variants"][HEADLINE_VARIANT].get("test") or {}
    low = ((test.get("ci95") or {}).get("balanced_accuracy") or [None])[0]
    plot_subgroups(subgroups, run_dir / SUBGROUPS_PNG, test.get("balanced_accuracy"), low=low)
    lines = [f"## Subgroups ({HEADLINE_VARIANT}, test)", ""]
    for attribute, groups in subgroups.items():
        classes = list(next((s["per_class_recall"] for s in groups.values() if s.get("per_class_recall")), {}))
        rows = [
            [
                group,
                _fmt(s.get("n"), "int"),
                _fmt(s.get("balanced_accuracy"), "p3"),
                *(_fmt((s.get("per_class_recall") or {}).get(c), "p3") for c in classes),
            ]
            for group, s in groups.items()
        ]
        header = ["group", "n", "bal. acc.", *(f"{c} recall" for c in classes)]
        lines += [f"### {attribute}", "", *_md_table(header, rows), ""]
    return [
        *lines,
        _gap_sentence(subgroups),
        "",
        f"Groups with fewer than {MIN_SUBGROUP_SUPPORT} test images are listed but too small to compare "
        "(hatched grey in the figure); orange bars are groups below the whole test split's 95% interval.",
        "",
        f"![balanced accuracy by subgroup]({SUBGROUPS_PNG})",
        "",
    ]


def _gallery_lines(gallery: Sequence[dict] | None, run_dir: Path) -> list[str]:
    """The error gallery figure and its one-line caption, when there are items."""
    if not gallery:
        return []
    plot_error_gallery(gallery, run_dir / ERROR_GALLERY_PNG)
    return [
        f"The {HEADLINE_VARIANT} variant's test mistakes it was most sure about "
        "(highest probability on the wrong class), most confident first:",
        "",
        f"![most confident mistakes]({ERROR_GALLERY_PNG})",
        "",
    ]


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


def _headline_confusion(metrics: dict) -> tuple[list[list[int]], list[str], str] | None:
    """(confusion matrix, class names, variant) of the headline variant's test split, else of any variant."""
    variants = metrics.get("variants", {})
    ordered = [HEADLINE_VARIANT] if HEADLINE_VARIANT in variants else []
    for name in [*ordered, *variants]:
        split = _split_metrics(variants[name])
        if split.get("confusion_matrix"):
            names = list(split.get("per_class_recall") or CLASS_NAMES)
            return split["confusion_matrix"], names, name
    return None


def write_report(
    run_dir: Path,
    metrics: dict,
    record: RunRecord | None,
    history: dict[str, list[float]],
    gallery: Sequence[dict] | None = None,
) -> Path:
    """Write `report.md` plus its figures into `run_dir`; returns the report's path.

    Always `training_curves.png`; `confusion_matrix.png`, `subgroups.png`, `reliability.png` and
    `error_gallery.png` only when their data is there. `metrics` is metrics.json, `record` the run's
    record (None: no run section), `history` Keras `History.history` (may be empty), `gallery` the
    headline variant's most confident test mistakes (see `plot_error_gallery`), or None.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    title = record.model_name if record else "model"
    lines = [f"# Training report: {title}", "", *_summary_section(record), *_headline_section(metrics)]
    lines += [*_per_class_section(metrics), *_per_class_section(metrics, "per_class_auc", "Per-class AUC")]
    lines += [*_subgroup_section(metrics, run_dir), *_triage_section(metrics), *_calibration_section(metrics, run_dir)]
    lines += [*_fusion_section(_fusion_weights(metrics, record, history)), "## Figures", ""]
    lines += _gallery_lines(gallery, run_dir)
    confusion = _headline_confusion(metrics)
    if confusion is not None:
        tag = record.data.tag if record and record.data and record.data.tag else None
        title = ", ".join(filter(None, [confusion[2], "test split", tag]))
        plot_confusion_matrix(confusion[0], confusion[1], run_dir / CONFUSION_MATRIX_PNG, title)
        lines.append(f"![confusion matrix]({CONFUSION_MATRIX_PNG})")
    exported_val = ((metrics.get("variants", {}).get(HEADLINE_VARIANT) or {}).get("val") or {}).get("balanced_accuracy")
    plot_training_curves(history, run_dir / TRAINING_CURVES_PNG, exported_val if history else None)
    lines += [f"![training curves]({TRAINING_CURVES_PNG})", ""]
    if record and record.training and record.training.batchnorm_batches:
        lines += [
            "The curves' validation values were measured during training, before the fine-tuned backbone's "
            "BatchNorm statistics were re-estimated; the tables above evaluate the exported model (its val "
            "balanced accuracy is the star at the best epoch).",
            "",
        ]
    path = run_dir / REPORT_MD
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
