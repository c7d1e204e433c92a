"""The run's figures: confusion matrix, training curves, reliability, subgroups, error gallery.

    plot_confusion_matrix(matrix, names, path, title=...)   # each plot_* writes one PNG and returns its path

Matplotlib on the Agg canvas (no pyplot state); no TensorFlow. `report` decides which figures a
report has and links them; these functions only draw.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from utilities.evaluation.analysis import MIN_SUPPORT
from utilities.evaluation.results import GroupMetrics, Reliability

MIN_SUBGROUP_SUPPORT = MIN_SUPPORT  # subgroups with fewer test images are shown but not compared (too noisy)
CONFUSION_MATRIX_PNG = "confusion_matrix.png"
TRAINING_CURVES_PNG = "training_curves.png"
RELIABILITY_PNG = "reliability.png"
SUBGROUPS_PNG = "subgroups.png"
ERROR_GALLERY_PNG = "error_gallery.png"

# Panels of the training-curves figure: title → history key (validation key is "val_" + key).
_CURVE_PANELS = {
    "loss": "loss",
    "accuracy": "accuracy",
    "balanced accuracy": "balanced_accuracy",
    "learning rate": "lr",  # at each epoch's end (history.csv's lr)
}
_MAX_PANEL_COLUMNS = 4  # reliability panels per row


# ── figures ─────────────────────────────────────────────────────────────────────────────────────


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
    """PNG with one panel per tracked metric (loss, accuracy, balanced accuracy; the learning rate): train vs
    val by epoch.

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
        own = "at the epoch's end" if key == "lr" else "train"
        for label, name in ((own, key), ("val (during training)", f"val_{key}")):
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
        if key == "lr":
            ax.set_ylim(bottom=0)  # a constant rate is a flat line at its height, not noise around an offset
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
    panels: dict[str, Reliability],
    path: str | os.PathLike,
    before: dict[str, Reliability] | None = None,
    val: dict[str, Reliability] | None = None,
) -> Path:
    """PNG with one reliability diagram per variant: accuracy vs mean confidence per bin, and the diagonal.

    `panels` maps variant name → the test split's `Reliability` (`bins`, `ece`, per-bin `confidence`,
    `accuracy` (None for an empty bin) and `count`); point area grows with the bin's count.
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
        ece = reliability.ece
        was = f"{before[name].ece:.3f} → " if name in before else ""
        val_ece = val[name].ece if name in val else None
        title = f"{name}\ntest ECE {was}{ece:.3f}"  # two lines: a long variant name never runs into the next panel
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


def _reliability_curve(ax, reliability: Reliability, colour: str, label: str) -> None:
    """Accuracy per filled bin as a line with small markers."""
    points = [(c, a) for c, a in zip(reliability.confidence, reliability.accuracy, strict=False) if None not in (c, a)]
    if points:
        conf, acc = zip(*points, strict=True)
        ax.plot(conf, acc, color=colour, linewidth=1, marker="o", markersize=3, zorder=2, label=label)


def _reliability_points(ax, reliability: Reliability) -> None:
    """The test curve: accuracy per filled bin, point area ∝ the bin's images."""
    counts = np.asarray(reliability.count, dtype=float)
    filled = [
        (conf, acc, count)
        for conf, acc, count in zip(reliability.confidence, reliability.accuracy, counts, strict=False)
        if conf is not None and acc is not None
    ]
    if filled:
        conf, acc, count = (np.asarray(column, dtype=float) for column in zip(*filled, strict=True))
        ax.plot(conf, acc, color="C0", linewidth=1, zorder=3)
        area = 12 + 120 * count / count.max()
        ax.scatter(conf, acc, s=area, color="C0", zorder=4, clip_on=False, label="test (area ∝ images)")


def _reliability_share(ax, reliability: Reliability, first: bool) -> None:
    """Bars: the share of images in each confidence bin, on an axis of their own under the diagram."""
    bins = reliability.bins
    counts = np.asarray(reliability.count, dtype=float)
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
    subgroups: dict[str, dict[str, GroupMetrics]],
    path: str | os.PathLike,
    overall: float | None = None,
    min_support: int = MIN_SUBGROUP_SUPPORT,
    low: float | None = None,
) -> Path:
    """PNG with one panel per attribute (sex, age, site): balanced accuracy per group as horizontal bars.

    `subgroups` is a split's `subgroups` (attribute → group → GroupMetrics);
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
        values = [stats.balanced_accuracy for stats in groups.values()]
        counts = [stats.n for stats in groups.values()]
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
    fig = Figure(figsize=(max(1.7 * columns, 5.2), 2.0 * rows + 0.4), layout="constrained")  # the title fits
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
    title = "Most confident mistakes (test): true class → predicted class, and the probability of each"
    # Fewer than 5 columns are narrower than the one-line title: two lines then, or it is cut at both edges.
    fig.suptitle(title if columns >= 5 else title.replace(": ", ":\n", 1))
    return _save(fig, path)


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
