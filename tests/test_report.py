"""Tests of utilities/evaluation/report.py: report.md sections and figures, from old and analysis-rich metrics.json.

.venv/bin/python -m pytest tests/test_report.py -q
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from utilities.data.schema import CLASS_NAMES, SITES
from utilities.evaluation import comparison as cmp
from utilities.evaluation import figures as fg
from utilities.evaluation import metrics as ev
from utilities.evaluation import report as rp
from utilities.evaluation.results import RunMetrics
from utilities.run.folder import DataRecord, RunRecord

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAMES = ("A", "B", "C", "D")  # D never occurs in y_true nor in the predictions
NEW_FIGURES = (fg.RELIABILITY_PNG, fg.SUBGROUPS_PNG, fg.ERROR_GALLERY_PNG)


def _probs_for(predicted: list[int], num_classes: int = len(NAMES)) -> np.ndarray:
    """Rows with 0.7 on the predicted class and the rest spread evenly (rows sum to 1)."""
    probs = np.full((len(predicted), num_classes), 0.3 / (num_classes - 1))
    probs[np.arange(len(predicted)), predicted] = 0.7
    return probs


def _assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 2000, path


def _linked_pngs(text: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)


def _headings(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("#")]


# ── old-style metrics.json (no analysis keys) ─────────────────────────────────────────────────


def _metrics() -> dict:
    y_true = np.array([0, 0, 0, 1, 1, 2])
    model = {
        "val": ev.compute_metrics(y_true, _probs_for([0, 0, 0, 1, 2, 2]), NAMES),
        "test": ev.compute_metrics(y_true, _probs_for([0, 0, 1, 1, 2, 2]), NAMES),
        "size_bytes": 28_500_000,
        "gzip_bytes": 26_000_000,
        "latency_ms": {"median": 41.5, "p90": 44.0},
        "params": 7_100_000,
    }
    tflite = {
        "test": ev.compute_metrics(y_true, _probs_for([0, 1, 1, 1, 2, 2]), NAMES),
        "latency_ms": {"median": 12.0, "p90": 12.5},
    }
    return {"variants": {"model": model, "int8": {**tflite, "agreement": 0.8333}}}


def test_plots_write_pngs(tmp_path):
    cm = [[5, 1, 0, 0], [0, 3, 2, 0], [0, 0, 4, 0], [0, 0, 0, 0]]  # last class without support
    _assert_png(fg.plot_confusion_matrix(cm, NAMES, tmp_path / "cm.png"))
    history = {"loss": [1.0, 0.7], "val_loss": [1.1, 0.9], "accuracy": [0.5, 0.6], "balanced_accuracy": [0.3, None]}
    _assert_png(fg.plot_training_curves(history, tmp_path / "sub" / "curves.png"))
    _assert_png(fg.plot_training_curves({}, tmp_path / "empty.png"))  # resumed run without history


def test_comparison_rows_are_flat_and_tolerate_missing_keys():
    rows = cmp.comparison_rows(RunMetrics.from_json(_metrics()))
    assert [r["variant"] for r in rows] == ["model", "int8"]
    assert rows[0]["test_balanced_accuracy"] == pytest.approx(13 / 18)
    assert rows[0]["latency_ms_median"] == 41.5 and rows[0]["latency_ms_p90"] == 44.0
    assert rows[1]["latency_ms_median"] == 12.0 and rows[1]["size_bytes"] is None
    assert rows[1]["val_balanced_accuracy"] is None
    assert rows[0]["test_balanced_accuracy_ci95_low"] is None and rows[0]["test_ece"] is None
    assert all(not isinstance(v, dict | list) for row in rows for v in row.values())


def test_report_has_summary_tables_and_figures(tmp_path):
    record = RunRecord(
        run_id="20240101-abc",
        model_name="base_model",
        uri="",
        started="",
        data=DataRecord(tag="dataset_v01", manifest="", manifest_sha256="f" * 64),
        code={"git_commit": "b4d23f8"},
        devices=["/cpu:0", "/cpu:1"],
    )
    history = {"loss": [1.0, 0.8], "val_loss": [1.2, 1.0], "fusion/image": [0.5, 0.62], "fusion/metadata": [0.5, 0.38]}
    path = rp.write_report(tmp_path / "run", RunMetrics.from_json(_metrics()), record, history)

    text = path.read_text()
    assert path.name == "report.md"
    for expected in ("base_model", "20240101-abc", "dataset_v01", "f" * 64, "b4d23f8", "/cpu:0, /cpu:1"):
        assert expected in text, expected
    assert "| variant | test bal. acc. |" in text
    assert "| model | 0.7222 | 0.6667 |" in text  # balanced accuracy 13/18, accuracy 4/6
    assert "| int8 | 0.6111 |" in text and "| 12.00 | — | 0.8333 |" in text  # missing params → —
    assert "| A | 3 | 0.6667 | 0.3333 |" in text  # per-class recall: class, support, model, int8
    assert "| image | 0.6200 |" in text  # fusion weights from the last epoch of the history
    assert _linked_pngs(text) == ["confusion_matrix.png", "training_curves.png"]
    _assert_png(tmp_path / "run" / "confusion_matrix.png")
    _assert_png(tmp_path / "run" / "training_curves.png")


def test_old_metrics_render_only_the_old_sections_and_figures(tmp_path):
    metrics = _metrics()
    for variant in metrics["variants"].values():  # metrics.json before per-class AUCs existed
        for split in ("val", "test"):
            variant.get(split, {}).pop("per_class_auc", None)
    text = rp.write_report(tmp_path, RunMetrics.from_json(metrics), None, {"loss": [1.0]}).read_text()
    assert _headings(text) == ["# Training report: model", "## Variants", "## Per-class recall (test)", "## Figures"]
    assert "Brackets" not in text and "[0." not in text
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["confusion_matrix.png", "training_curves.png"]


def test_report_without_test_metrics_or_history(tmp_path):
    path = rp.write_report(tmp_path, RunMetrics.from_json({"variants": {"student": {"size_bytes": 1000}}}), None, {})
    text = path.read_text()
    assert "| student | — |" in text
    assert "confusion_matrix.png" not in text and (tmp_path / "training_curves.png").exists()


def test_a_variant_answering_one_class_is_flagged_with_its_agreement(tmp_path):
    y_true = np.array([0, 0, 0, 1, 1, 2, 2, 3, 3, 3])
    constant = ev.compute_metrics(y_true, _probs_for([1] * 10), NAMES)
    assert (constant["top_class"], constant["top_class_share"]) == ("B", 1.0)
    metrics = _metrics()
    metrics["variants"]["int8"] = {"val": constant, "agreement": 1.0}  # "agreement" with a constant model
    (line,) = cmp.collapse_warnings(RunMetrics.from_json(metrics))
    assert (
        line
        == "int8 predicts B for 100% of val (balanced accuracy 0.250); its agreement 1.000 with the float model means as little"
    )
    text = rp.write_report(tmp_path, RunMetrics.from_json(metrics), None, {}).read_text()
    assert f"> **Warning:** {line}." in text
    assert cmp.collapse_warnings(RunMetrics.from_json(_metrics())) == []  # mixed predictions: nothing to flag


# ── metrics.json with the analysis keys (intervals, calibration, triage, subgroups) ────────────


def _reliability(rng: np.random.Generator, ece: float, bins: int = 15) -> dict:
    """A plausible reliability dict: over-confident, low bins empty (top-1 confidence ≥ 1/8)."""
    confidence, accuracy, count = [], [], []
    for b in range(bins):
        if b < 2:
            confidence.append(None), accuracy.append(None), count.append(0)
            continue
        mid = (b + 0.5) / bins
        confidence.append(mid)
        accuracy.append(float(np.clip(mid - ece * (0.5 + rng.random()), 0.0, 1.0)))
        count.append(int(5 + 60 * mid**3))
    return {"bins": bins, "ece": ece, "confidence": confidence, "accuracy": accuracy, "count": count}


def _triage(auc: float, positives: int) -> dict:
    return {
        "positives": positives,
        "negatives": 400 - positives,
        "auc": auc,
        "sensitivity_at_specificity": {"0.80": round(auc - 0.1, 3), "0.95": round(auc - 0.35, 3)},
        "threshold_at_specificity": {"0.80": 0.31, "0.95": 0.62},
    }


def _group(rng: np.random.Generator, n: int, balanced_accuracy: float | None) -> dict:
    recall = {c: (None if i == 6 else round(float(rng.random()), 3)) for i, c in enumerate(CLASS_NAMES)}
    support = {c: (0 if i == 6 else n // 8) for i, c in enumerate(CLASS_NAMES)}
    return {"n": n, "balanced_accuracy": balanced_accuracy, "per_class_recall": recall, "support": support}


def _subgroups(rng: np.random.Generator) -> dict:
    sites = {
        site: _group(rng, n, 0.55 + 0.04 * i)
        for i, (site, n) in enumerate(zip(SITES, (90, 60, 12, 80, 3, 8, 70, 45), strict=True))
    }
    return {
        "sex": {"female": _group(rng, 180, 0.702), "male": _group(rng, 200, 0.681), "unknown": _group(rng, 20, 0.5)},
        "age": {
            "<30": _group(rng, 40, 0.61),
            "30-59": _group(rng, 190, 0.74),
            ">=60": _group(rng, 160, 0.66),
            "unknown": _group(rng, 10, None),
        },
        "site": {**sites, "unknown": _group(rng, 32, 0.6)},
    }


def _split(rng: np.random.Generator, balanced_accuracy: float, ece: float, subgroups: bool = False) -> dict:
    split = {
        "n": 400,
        "top_class": "NV",
        "top_class_share": 0.3,
        "accuracy": balanced_accuracy + 0.08,
        "balanced_accuracy": balanced_accuracy,
        "macro_f1": balanced_accuracy - 0.02,
        "macro_auc": balanced_accuracy + 0.2,
        "per_class_recall": {c: round(float(rng.random()), 3) for c in CLASS_NAMES},
        "per_class_precision": {c: round(float(rng.random()), 3) for c in CLASS_NAMES},
        "support": {c: 50 for c in CLASS_NAMES},
        "confusion_matrix": rng.integers(0, 20, (8, 8)).tolist(),
        "per_class_auc": {
            c: (None if c == "VASC" else round(0.8 + 0.15 * float(rng.random()), 3)) for c in CLASS_NAMES
        },
        "ci95": {
            "balanced_accuracy": [balanced_accuracy - 0.105, balanced_accuracy + 0.084],
            "macro_auc": [balanced_accuracy + 0.14, balanced_accuracy + 0.25],
            "resamples": 1000,
            "level": 0.95,
        },
        "ece": ece,
        "reliability": _reliability(rng, ece),
        "triage": {"melanoma": _triage(0.9, 12), "malignant": _triage(0.86, 97)},
    }
    if subgroups:
        split["subgroups"] = _subgroups(rng)
    return split


def analysis_metrics(extra_variants: int = 0, seed: int = 0) -> dict:
    """model (temperature-scaled, with subgroups), int8, a failed variant, and `extra_variants` more."""
    rng = np.random.default_rng(seed)
    model = {
        "val": _split(rng, 0.731, 0.031),
        "test": _split(rng, 0.716, 0.048, subgroups=True),
        "size_bytes": 28_500_000,
        "params": 7_100_000,
        "calibration": {
            "temperature": 1.7,
            "ece_before": {"val": 0.12, "test": 0.13},
            "ece_after": {"val": 0.031, "test": 0.048},
            "balanced_accuracy_before": {"val": 0.731, "test": 0.716},
            "macro_auc_before": {"val": 0.93, "test": 0.91},
            "reliability_before": _reliability(rng, 0.13),
        },
    }
    variants = {"model": model, "int8": {"val": _split(rng, 0.70, 0.09), "test": _split(rng, 0.69, 0.083)}}
    for i in range(extra_variants):
        variants[f"pruned_{i}"] = {"val": _split(rng, 0.68, 0.1), "test": _split(rng, 0.66 - 0.02 * i, 0.1 + 0.01 * i)}
    variants["distilled"] = {"error": "ValueError: teacher checkpoint missing"}
    return {"variants": variants}


def _gallery(count: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "image": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
            "name": f"ISIC_{24_306 + i:07d}",
            "true": CLASS_NAMES[i % 8],
            "predicted": CLASS_NAMES[(i + 1) % 8],
            "probability": 0.99 - 0.02 * i,
            "true_probability": 0.004 * i,
        }
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def rich_report(tmp_path_factory):
    """(run folder, report text) of analysis_metrics() with a 12-image gallery; written once for the tests below."""
    run_dir = tmp_path_factory.mktemp("rich")
    text = rp.write_report(
        run_dir, RunMetrics.from_json(analysis_metrics()), None, {"loss": [1.0, 0.8]}, gallery=_gallery(12)
    ).read_text()
    return run_dir, text


def test_every_linked_figure_is_written(rich_report):
    run_dir, text = rich_report
    linked = _linked_pngs(text)
    assert set(linked) == {*NEW_FIGURES, fg.CONFUSION_MATRIX_PNG, fg.TRAINING_CURVES_PNG}
    for name in linked:
        _assert_png(run_dir / name)
    assert text.index(fg.ERROR_GALLERY_PNG) < text.index(fg.CONFUSION_MATRIX_PNG)  # first in Figures
    assert "test mistakes it was most sure about" in text


def test_headline_shows_intervals_and_what_they_are(rich_report):
    _, text = rich_report
    assert "| model | 0.716 [0.61, 0.80] |" in text
    assert "0.916 [0.86, 0.97]" in text  # macro AUC 0.716 + 0.2 with its interval
    assert "Brackets: 95% stratified bootstrap over the test images, 1,000 resamples." in text
    assert "| distilled | — |" in text  # the failed variant keeps its row


def test_comparison_rows_carry_intervals_and_ece():
    row = cmp.comparison_rows(RunMetrics.from_json(analysis_metrics()))[0]
    assert row["test_balanced_accuracy_ci95_low"] == pytest.approx(0.611)
    assert row["test_balanced_accuracy_ci95_high"] == pytest.approx(0.8)
    assert row["test_macro_auc_ci95_low"] == pytest.approx(0.856)
    assert row["test_ece"] == 0.048


def test_calibration_section(rich_report):
    _, text = rich_report
    assert "## Calibration" in text and "| int8 | 0.090 | 0.083 |" in text
    assert "| model | 1.700 | 0.120 → 0.031 | 0.130 → 0.048 | 0.731 → 0.731 | 0.716 → 0.716 |" in text
    assert "Warning" not in text  # temperature scaling left the predictions alone


def test_calibration_that_moved_balanced_accuracy_is_flagged(tmp_path):
    metrics = analysis_metrics()
    metrics["variants"]["model"]["calibration"]["balanced_accuracy_before"]["test"] = 0.7
    text = rp.write_report(tmp_path, RunMetrics.from_json(metrics), None, {}).read_text()
    assert "> **Warning:** model's test balanced accuracy changed with temperature scaling (0.7000 → 0.7160)" in text


def test_triage_section(rich_report):
    _, text = rich_report
    assert "| variant | task | positives | negatives | AUC | sens. @ 80% spec. | sens. @ 95% spec. |" in text
    assert "| model | melanoma vs rest | 12 | 388 | 0.900 | 0.800 | 0.550 |" in text
    assert "| int8 | malignant (MEL, BCC, SCC, AK) vs benign | 97 | 303 | 0.860 | 0.760 | 0.510 |" in text


def test_subgroup_tables_and_largest_gap(rich_report):
    _, text = rich_report
    assert "## Subgroups (model, test)" in text and "### site" in text
    assert "| group | n | bal. acc. | MEL recall |" in text
    assert "| unknown | 10 | — |" in text  # age group without a value
    assert re.search(
        r"\| female \| 180 \| 0\.702 \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| — \|", text
    )
    # site: palms/soles (0.75, n=8) and oral/genital (n=3) are too small; anterior torso 0.55 … upper extremity 0.83
    assert (
        "Largest gap between groups with ≥ 20 test images: by site, anterior torso 0.550 (n=90) vs "
        "upper extremity 0.830 (n=45), 0.280 balanced accuracy apart." in text
    )


def test_small_subgroups_are_not_compared(tmp_path):
    metrics = analysis_metrics()
    for groups in metrics["variants"]["model"]["test"]["subgroups"].values():
        for stats in groups.values():
            stats["n"] = 10
    text = rp.write_report(tmp_path, RunMetrics.from_json(metrics), None, {}).read_text()
    assert "No attribute has two groups with ≥ 20 test images" in text
    _assert_png(tmp_path / fg.SUBGROUPS_PNG)


def test_gallery_is_written_only_when_given(tmp_path):
    metrics = analysis_metrics()
    text = rp.write_report(tmp_path, RunMetrics.from_json(metrics), None, {}, gallery=[]).read_text()
    assert fg.ERROR_GALLERY_PNG not in text and not (tmp_path / fg.ERROR_GALLERY_PNG).exists()
    _assert_png(fg.plot_error_gallery(_gallery(3), tmp_path / "g.png", columns=2))
    with pytest.raises(ValueError, match="at least one item"):
        fg.plot_error_gallery([], tmp_path / "none.png")


def test_sections_without_their_data_are_left_out(tmp_path):
    metrics = analysis_metrics()
    for split in ("val", "test"):
        for key in ("ece", "reliability", "triage", "subgroups"):
            metrics["variants"]["model"][split].pop(key, None)
            metrics["variants"]["int8"][split].pop(key, None)
    del metrics["variants"]["model"]["calibration"]
    text = rp.write_report(tmp_path, RunMetrics.from_json(metrics), None, {}).read_text()
    assert "0.716 [0.61, 0.80]" in text  # intervals stay
    for heading in ("## Calibration", "## Triage", "## Subgroups"):
        assert heading not in text
    assert not any((tmp_path / name).exists() for name in NEW_FIGURES)


def test_reliability_grid_wraps_after_four_variants(tmp_path):
    panels = rp._reliability_panels(
        RunMetrics.from_json(analysis_metrics(extra_variants=3))
    )  # model, int8, pruned_0..2: 2 rows of 4
    assert list(panels) == ["model", "int8", "pruned_0", "pruned_1", "pruned_2"]  # not the failed variant
    _assert_png(fg.plot_reliability(panels, tmp_path / "reliability.png"))


def test_best_epoch_is_the_first_of_the_highest_val_scores():
    assert fg._best_epoch([0.2, 0.5, None, 0.5, 0.4]) == 2  # 1-based; ties keep the first, as EarlyStopping
    assert fg._best_epoch([math.nan, None]) is None


def test_subgroup_legend_names_only_the_bars_drawn():
    """A run whose every group scores 0 has no group below the interval: no "(< 0.00)" entry, no orange."""
    labels = [h.get_label() for h in fg._subgroup_legend({"C0"}, 0.0, 0.0, 20)]
    assert labels == ["n ≥ 20, within or above the interval", "all test images (0.00)"]
    labels = [h.get_label() for h in fg._subgroup_legend({"C0", "C1", "0.82"}, 0.7, 0.61, 20)]
    assert any("below its 95% interval (< 0.61)" in label for label in labels) and len(labels) == 4
