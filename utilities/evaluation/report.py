"""The run's `report.md`: summary, variant and per-class tables, warnings, and its figures.

    write_report(run_dir, metrics, record, history, gallery=None)
    # RunMetrics (metrics.json), run record, Keras history, optional most-confident-mistakes thumbnails

Sections and figures from the optional analysis fields (bootstrap intervals, calibration, subgroups)
appear only when those fields are there. The figures are drawn by `utilities.evaluation.figures`;
no TensorFlow.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from utilities.data.schema import CLASS_NAMES, HEADLINE, MALIGNANT_CLASSES
from utilities.evaluation.analysis import largest_gap
from utilities.evaluation.comparison import collapse_warnings, comparison_rows
from utilities.evaluation.figures import (
    CONFUSION_MATRIX_PNG,
    ERROR_GALLERY_PNG,
    MIN_SUBGROUP_SUPPORT,
    RELIABILITY_PNG,
    SUBGROUPS_PNG,
    TRAINING_CURVES_PNG,
    plot_confusion_matrix,
    plot_error_gallery,
    plot_reliability,
    plot_subgroups,
    plot_training_curves,
)
from utilities.evaluation.results import GroupMetrics, Reliability, RunMetrics, SplitMetrics, VariantMetrics
from utilities.run.folder import RunRecord

REPORT_MD = "report.md"
HEADLINE_VARIANT = "model"  # the trained (uncompressed) model; its confusion matrix goes in the report


# ── report ────────────────────────────────────────────────────────────────────────────────────


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


def _interval_note(metrics: RunMetrics) -> list[str]:
    """One line saying what the headline intervals are (level and resamples), if any variant has them."""
    settings = {(m.ci95.level, m.ci95.resamples) for m in _tests(metrics).values() if m.ci95}
    if not settings:
        return []
    how = "; ".join(
        f"{level:.0%} stratified bootstrap over the test images, {_fmt(resamples, 'int')} resamples"
        for level, resamples in sorted(settings, key=str)
    )
    return [f"Brackets: {how}.", ""]


def _headline_section(metrics: RunMetrics) -> list[str]:
    rows = [[_cell(row, key, kind) for _, key, kind in _HEADLINE_COLUMNS] for row in comparison_rows(metrics)]
    warnings = [f"> **Warning:** {line}." for line in collapse_warnings(metrics)]
    table = _md_table([h for h, _, _ in _HEADLINE_COLUMNS], rows)
    return ["## Variants", "", *table, "", *_interval_note(metrics), *warnings, ""]


def _tests(metrics: RunMetrics) -> dict[str, SplitMetrics]:
    """Each scored variant's test metrics (its val metrics when it was not tested), the headline variant first."""
    scored = metrics.scored()
    first = {HEADLINE_VARIANT: scored[HEADLINE_VARIANT]} if HEADLINE_VARIANT in scored else {}
    return {name: v.test or v.val for name, v in {**first, **scored}.items()}


def _per_class_section(
    metrics: RunMetrics, key: str = "per_class_recall", title: str = "Per-class recall"
) -> list[str]:
    """Table class × variant of a per-class metric (recall, AUC) of each variant's test split."""
    tests = {name: m for name, m in _tests(metrics).items() if getattr(m, key) is not None}
    if not tests:
        return []
    reference = next(iter(tests.values()))
    by_variant = {name: getattr(m, key) for name, m in _ordered(metrics, tests).items()}
    rows = [
        [c, _fmt(reference.support.get(c), "int"), *(_fmt(values.get(c)) for values in by_variant.values())]
        for c in getattr(reference, key)
    ]
    return [f"## {title} (test)", "", *_md_table(["class", "support", *by_variant], rows), ""]


def _ordered(metrics: RunMetrics, by_name: dict[str, Any]) -> dict[str, Any]:
    """`by_name` in metrics.json's variant order."""
    return {name: by_name[name] for name in metrics.variants if name in by_name}


# ── calibration, triage, subgroups (metrics.json's analysis keys; each section only with its data) ──


def _calibration_section(metrics: RunMetrics, run_dir: Path) -> list[str]:
    """ECE per variant and split; for temperature-scaled variants, before → after; the reliability figure."""
    variants = metrics.scored()
    calibrated = {name: v for name, v in variants.items() if v.calibration}
    lines = [*_ece_table(variants), *(_temperature_table(calibrated) if calibrated else [])]
    if not lines:
        return []
    if panels := _reliability_panels(metrics):
        before = {name: v.calibration.reliability_before for name, v in calibrated.items() if name in panels}
        plot_reliability(panels, run_dir / RELIABILITY_PNG, before, _reliability_panels(metrics, "val"))
        lines += [f"![reliability diagrams]({RELIABILITY_PNG})", ""]
    return ["## Calibration", "", *lines]


def _ece_table(variants: dict[str, VariantMetrics]) -> list[str]:
    """Variant × (val ECE, test ECE) and what ECE is; nothing when no variant has one."""
    eces = {name: tuple(m.ece if m else None for m in (v.val, v.test)) for name, v in variants.items()}
    rows = [
        [name, _fmt(val, "p3"), _fmt(test, "p3")] for name, (val, test) in eces.items() if (val, test) != (None, None)
    ]
    if not rows:
        return []
    diagrams = [m.reliability for v in variants.values() for m in v.splits().values() if m.reliability]
    binning = f"{diagrams[0].bins} equal-width confidence bins" if diagrams else "equal-width confidence bins"
    note = (
        f"ECE: expected calibration error, the image-weighted mean |accuracy − confidence| over {binning}; "
        "0 is perfectly calibrated. A temperature-scaled variant's values are those after scaling."
    )
    return [*_md_table(["variant", "val ECE", "test ECE"], rows), "", note, ""]


def _before_after(before: Any, after: Any) -> str:
    return f"{_fmt(before, 'p3')} → {_fmt(after, 'p3')}"


def _temperature_table(calibrated: dict[str, VariantMetrics]) -> list[str]:
    """Temperature, ECE and balanced accuracy before → after scaling; a warning if the accuracy moved."""
    header = ["variant", "temperature", "val ECE", "test ECE", "val bal. acc.", "test bal. acc.", "test macro AUC"]
    rows, warnings = [], []
    for name, variant in calibrated.items():
        cal, splits = variant.calibration, variant.splits()
        row = [name, _fmt(cal.temperature, "p3")]
        row += [_before_after(cal.ece_before.get(s), cal.ece_after.get(s, m.ece)) for s, m in splits.items()]
        row += [_before_after(cal.balanced_accuracy_before.get(s), m.balanced_accuracy) for s, m in splits.items()]
        row.append(
            _before_after(cal.macro_auc_before.get("test"), splits["test"].macro_auc if "test" in splits else None)
        )
        rows.append(row)
        for split, m in splits.items():
            before, after = cal.balanced_accuracy_before.get(split), m.balanced_accuracy
            if before is not None and abs(before - after) > 1e-9:
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


def _reliability_panels(metrics: RunMetrics, split: str = "test") -> dict[str, Reliability]:
    """Variant → its `split`'s reliability diagram, for scored variants with at least one filled bin."""
    panels = {name: getattr(v, split) for name, v in metrics.scored().items()}
    panels = {name: m.reliability for name, m in panels.items() if m is not None and m.reliability is not None}
    return {name: r for name, r in panels.items() if any(c is not None for c in r.confidence)}


_MALIGNANT = ", ".join(MALIGNANT_CLASSES)
_TRIAGE_TASKS = {"melanoma": "melanoma vs rest", "malignant": f"malignant ({_MALIGNANT}) vs benign"}


def _spec_label(key: str) -> str:
    return f"sens. @ {float(key):.0%} spec."


def _triage_section(metrics: RunMetrics) -> list[str]:
    """Per variant and binary task (test): positives, negatives, AUC, sensitivity at fixed specificities."""
    triage = {name: m.triage for name, m in _ordered(metrics, _tests(metrics)).items() if m.triage}
    if not triage:
        return []
    specs = sorted(
        {k for t in triage.values() for task in t.values() for k in task.sensitivity_at_specificity}, key=float
    )
    rows = []
    for name, tasks in triage.items():
        for task, label in _TRIAGE_TASKS.items():
            if task not in tasks:
                continue
            t = tasks[task]
            rows.append(
                [
                    name,
                    label,
                    _fmt(t.positives, "int"),
                    _fmt(t.negatives, "int"),
                    _fmt(t.auc, "p3"),
                    *(_fmt(t.sensitivity_at_specificity.get(k), "p3") for k in specs),
                ]
            )
    header = ["variant", "task", "positives", "negatives", "AUC", *map(_spec_label, specs)]
    note = (
        "Sensitivity at a specificity: the share of positives caught when the threshold on the task's probability "
        "is set so that that share of negatives is cleared (thresholds in metrics.json)."
    )
    return ["## Triage (test)", "", *_md_table(header, rows), "", note, ""]


def _gap_sentence(subgroups: dict[str, dict[str, GroupMetrics]], min_support: int = MIN_SUBGROUP_SUPPORT) -> str:
    gap = largest_gap(subgroups, min_support)
    if gap is None:
        return f"No attribute has two groups with ≥ {min_support} test images, so no gap between groups is named."
    groups = subgroups[gap["attribute"]]
    best, worst = groups[gap["best"]], groups[gap["worst"]]
    return (
        f"Largest gap between groups with ≥ {min_support} test images: by {gap['attribute']}, "
        f"{gap['worst']} {worst.balanced_accuracy:.3f} (n={worst.n}) vs {gap['best']} "
        f"{best.balanced_accuracy:.3f} (n={best.n}), {gap['gap']:.3f} balanced accuracy apart."
    )


def _subgroup_section(metrics: RunMetrics, run_dir: Path) -> list[str]:
    """Per attribute a table group × (n, balanced accuracy, per-class recall), the largest gap, the figure."""
    model = metrics.variants.get(HEADLINE_VARIANT)
    test = model.test if model else None
    subgroups = {attribute: groups for attribute, groups in (test.subgroups or {}).items() if groups} if test else {}
    if test is None or not subgroups:
        return []
    low = (test.interval("balanced_accuracy") or (None,))[0]
    plot_subgroups(subgroups, run_dir / SUBGROUPS_PNG, test.balanced_accuracy, low=low)
    lines = [f"## Subgroups ({HEADLINE_VARIANT}, test)", ""]
    for attribute, groups in subgroups.items():
        classes = list(next(iter(groups.values())).per_class_recall)
        rows = [
            [
                group,
                _fmt(s.n, "int"),
                _fmt(s.balanced_accuracy, "p3"),
                *(_fmt(s.per_class_recall.get(c), "p3") for c in classes),
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


def _fusion_weights(record: RunRecord | None, history: dict) -> dict[str, float]:
    """Final fusion branch weights: the record's `fusion_weights`, else the last `fusion/*` epoch."""
    weights = record.fusion_weights if record else None
    if weights:
        return dict(weights)
    return {key.split("/", 1)[1]: values[-1] for key, values in history.items() if key.startswith("fusion/") and values}


def _metadata_section(metrics: RunMetrics) -> list[str]:
    """Does metadata help? The model's balanced accuracy as recorded and with every field unknown, per split."""
    model = metrics.variants.get("model")
    if model is None or not model.image_only:
        return []

    def shown(value: float | None, interval: Any) -> str:
        return _fmt(value) + ("" if interval is None else f" [{_fmt(interval[0])}, {_fmt(interval[1])}]")

    rows = []
    for split, blind in model.image_only.items():
        scored = model.splits().get(split)
        if scored is not None:
            with_metadata = shown(scored.balanced_accuracy, scored.interval(HEADLINE))
            rows.append([split, with_metadata, shown(blind.balanced_accuracy, blind.ci95)])
    header = ["split", "balanced accuracy, metadata as recorded", "image only (metadata unknown)"]
    return ["## Does metadata help? (model)", "", *_md_table(header, rows), ""]


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


def _headline_confusion(metrics: RunMetrics) -> tuple[list[list[int]], list[str], str] | None:
    """(confusion matrix, class names, variant) of the headline variant's test split, else of any variant."""
    for name, split in _tests(metrics).items():
        return split.confusion_matrix, list(split.per_class_recall or CLASS_NAMES), name
    return None


def write_report(
    run_dir: Path,
    metrics: RunMetrics,
    record: RunRecord | None,
    history: dict[str, list[float]],
    gallery: Sequence[dict] | None = None,
) -> Path:
    """Write `report.md` plus its figures into `run_dir`; returns the report's path.

    Always `training_curves.png`; `confusion_matrix.png`, `subgroups.png`, `reliability.png` and
    `error_gallery.png` only when their data is there. `metrics` is metrics.json's RunMetrics, `record` the run's
    record (None: no run section), `history` Keras `History.history` (may be empty), `gallery` the
    headline variant's most confident test mistakes (see `plot_error_gallery`), or None.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    title = record.model_name if record else "model"
    lines = [f"# Training report: {title}", "", *_summary_section(record), *_headline_section(metrics)]
    lines += [*_per_class_section(metrics), *_per_class_section(metrics, "per_class_auc", "Per-class AUC")]
    lines += [*_subgroup_section(metrics, run_dir), *_triage_section(metrics), *_calibration_section(metrics, run_dir)]
    lines += [*_metadata_section(metrics), *_fusion_section(_fusion_weights(record, history)), "## Figures", ""]
    lines += _gallery_lines(gallery, run_dir)
    confusion = _headline_confusion(metrics)
    if confusion is not None:
        tag = record.data.tag if record and record.data and record.data.tag else None
        title = ", ".join(filter(None, [confusion[2], "test split", tag]))
        plot_confusion_matrix(confusion[0], confusion[1], run_dir / CONFUSION_MATRIX_PNG, title)
        lines.append(f"![confusion matrix]({CONFUSION_MATRIX_PNG})")
    model = metrics.variants.get(HEADLINE_VARIANT)
    exported_val = model.val.balanced_accuracy if model and model.val else None
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
