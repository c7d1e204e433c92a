"""Tests of utilities/evaluation/analysis.py: bootstrap CIs, calibration, triage and subgroups on small synthetic data.

.venv/bin/python -m pytest tests/test_analysis.py -q
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from utilities.data.schema import CLASS_NAMES, METADATA_SIZE, NUM_CLASSES, SITES, encode_metadata
from utilities.evaluation import analysis as an
from utilities.evaluation import metrics as ev
from utilities.evaluation.results import GroupMetrics

MEL, NV, BCC, AK, BKL, DF, VASC, SCC = range(NUM_CLASSES)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _model(n: int, seed: int = 0, right: float = 0.7, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(y_true, probs) of a toy model that predicts the true class a fraction `right` of the time.

    Logits are small noise plus 2.8 on the predicted class, so its probability is ≈ 0.7 among 8
    classes (about calibrated at right = 0.7); `scale` multiplies the logits (×5 = over-confident).
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, NUM_CLASSES, n)
    wrong = (y + rng.integers(1, NUM_CLASSES, n)) % NUM_CLASSES  # any class but the true one
    predicted = np.where(rng.random(n) < right, y, wrong)
    logits = rng.normal(0.0, 0.3, (n, NUM_CLASSES))
    rows = np.arange(n)
    logits[rows, predicted] = np.maximum(logits[rows, predicted] + 2.8, logits.max(axis=1) + 0.01)  # stays top-1
    return y, _softmax(scale * logits)


def _calibrated(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities from a Dirichlet and labels drawn from them: calibrated by construction."""
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(NUM_CLASSES, 0.3), n)
    y = (probs.cumsum(axis=1) < rng.random((n, 1))).sum(axis=1).clip(max=NUM_CLASSES - 1)
    return y, probs


def _nll(y: np.ndarray, probs: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None))))


# ── bootstrap ─────────────────────────────────────────────────────────────────────────────────


def test_weighted_auc_with_unit_weights_equals_sklearn_with_ties():
    rng = np.random.default_rng(3)
    scores = np.round(rng.random(300), 1)  # 11 distinct values: many ties, across classes too
    positives = rng.random(300) < 0.3
    auc = an.weighted_auc(scores, positives, np.ones((300, 2)))
    assert auc == pytest.approx([roc_auc_score(positives, scores)] * 2, abs=1e-12)


def test_weighted_auc_counts_equal_repeated_examples():
    rng = np.random.default_rng(4)
    scores, positives = np.round(rng.random(50), 1), rng.random(50) < 0.4
    counts = rng.integers(0, 4, 50)
    counts[[np.argmax(positives), np.argmin(positives)]] = 1  # at least one positive and one negative
    expected = roc_auc_score(np.repeat(positives, counts), np.repeat(scores, counts))
    assert an.weighted_auc(scores, positives, counts[:, None].astype(float))[0] == pytest.approx(expected, abs=1e-12)


def test_resamples_keep_class_supports():
    y = np.repeat(np.arange(NUM_CLASSES), [40, 100, 20, 5, 10, 2, 1, 7])
    counts = an._resample_counts(y, 50, np.random.default_rng(0))  # (N, B)
    per_class = np.stack([counts[y == c].sum(axis=0) for c in range(NUM_CLASSES)])  # (C, B)
    assert (per_class == np.bincount(y)[:, None]).all()
    assert counts.std(axis=1).max() > 0  # really resampled, not the identity


def test_bootstrap_interval_contains_point_estimate_and_shrinks_with_more_data():
    y, probs = _model(400, seed=1)
    point = ev.compute_metrics(y, probs)
    ci = an.bootstrap_ci(y, probs, resamples=400)
    assert ci["resamples"] == 400 and ci["level"] == 0.95
    for key in ("balanced_accuracy", "macro_auc"):
        lo, hi = ci[key]
        assert lo < point[key] < hi, key
    bigger = an.bootstrap_ci(np.tile(y, 4), np.tile(probs, (4, 1)), resamples=400)
    width = np.diff(ci["balanced_accuracy"])[0]
    ratio = np.diff(bigger["balanced_accuracy"])[0] / width
    assert 0.3 < ratio < 0.7  # ≈ 1/√4
    assert np.diff(bigger["macro_auc"])[0] / np.diff(ci["macro_auc"])[0] < 0.7
    json.dumps(ci, allow_nan=False)


def test_bootstrap_is_seeded():
    y, probs = _model(200, seed=2)
    first = an.bootstrap_ci(y, probs, resamples=200, seed=7)
    assert an.bootstrap_ci(y, probs, resamples=200, seed=7) == first
    assert an.bootstrap_ci(y, probs, resamples=200, seed=8) != first


def test_bootstrap_without_auc_and_bad_inputs():
    y, probs = np.zeros(10, int), np.tile(np.linspace(1, 0, NUM_CLASSES), (10, 1))
    ci = an.bootstrap_ci(y, probs, resamples=20)
    assert ci["macro_auc"] is None and ci["balanced_accuracy"] == [1.0, 1.0]
    with pytest.raises(ValueError, match="same non-zero length"):
        an.bootstrap_ci(y[:5], probs)
    with pytest.raises(ValueError, match="resamples"):
        an.bootstrap_ci(y, probs, resamples=0)


# ── calibration ───────────────────────────────────────────────────────────────────────────────


def test_reliability_by_hand():
    y = np.array([0, 1, 0])
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45]])
    r = an.reliability(y, probs, bins=10)
    assert r["count"] == [0, 0, 0, 0, 0, 1, 0, 0, 0, 2]
    assert r["confidence"][9] == pytest.approx(0.95) and r["accuracy"][9] == pytest.approx(0.5)
    assert r["confidence"][5] == pytest.approx(0.55) and r["accuracy"][5] == pytest.approx(1.0)
    assert r["confidence"][0] is None and r["accuracy"][0] is None
    assert r["ece"] == pytest.approx(2 / 3 * 0.45 + 1 / 3 * 0.45)
    assert an.expected_calibration_error(y, probs, bins=10) == pytest.approx(r["ece"])
    json.dumps(r, allow_nan=False)


def test_ece_small_when_calibrated_large_when_over_confident():
    assert an.expected_calibration_error(*_calibrated(20000)) < 0.02
    y, probs = _model(4000, scale=5.0)
    assert np.mean(probs.argmax(axis=1) == y) == pytest.approx(0.7, abs=0.03)
    assert an.expected_calibration_error(y, probs) > 0.2


def test_temperature_scaling_fixes_over_confidence_and_keeps_predictions():
    y, probs = _model(4000, scale=5.0)
    t = an.fit_temperature(y, probs)
    calibrated = an.apply_temperature(probs, t)
    assert t > 1.0
    assert an.expected_calibration_error(y, calibrated) < 0.5 * an.expected_calibration_error(y, probs)
    assert _nll(y, calibrated) < _nll(y, probs)
    assert (calibrated.argmax(axis=1) == probs.argmax(axis=1)).all()


def test_fit_temperature_recovers_a_known_sharpening():
    y, probs = _calibrated(20000, seed=5)
    sharpened = an.apply_temperature(probs, 0.5)  # softmax(2 log p) = p² renormalised
    assert an.fit_temperature(y, sharpened) == pytest.approx(2.0, rel=0.1)


def test_apply_temperature_keeps_dtype_and_rows():
    probs = _model(50)[1].astype(np.float32)
    soft = an.apply_temperature(probs, 3.0)
    assert soft.dtype == np.float32 and soft.shape == probs.shape
    assert soft.sum(axis=1) == pytest.approx(np.ones(50), abs=1e-6)
    assert (soft.argmax(axis=1) == probs.argmax(axis=1)).all()
    assert soft.max(axis=1).mean() < probs.max(axis=1).mean()  # softer
    assert an.apply_temperature(probs, 1.0) == pytest.approx(probs, abs=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        an.apply_temperature(probs, 0.0)


# ── triage ────────────────────────────────────────────────────────────────────────────────────


def _rows(labels_and_columns: list[tuple[int, dict[int, float]]]) -> tuple[np.ndarray, np.ndarray]:
    """(y_true, probs) from (label, {class: prob}) rows; the remaining mass goes to NV."""
    y = np.array([label for label, _ in labels_and_columns])
    probs = np.zeros((len(y), NUM_CLASSES))
    for i, (_, columns) in enumerate(labels_and_columns):
        for c, p in columns.items():
            probs[i, c] = p
        probs[i, NV] += 1.0 - probs[i].sum()
    return y, probs


def test_triage_melanoma_by_hand():
    # MEL scores: positives 0.9, 0.6, 0.4, 0.2; negatives 0.8, 0.5, 0.3, 0.1, 0.05, 0.02.
    y, probs = _rows(
        [(MEL, {MEL: s}) for s in (0.9, 0.6, 0.4, 0.2)] + [(NV, {MEL: s}) for s in (0.8, 0.5, 0.3, 0.1, 0.05, 0.02)]
    )
    mel = an.triage(y, probs)["melanoma"]
    assert (mel["positives"], mel["negatives"]) == (4, 6)
    assert mel["auc"] == pytest.approx((6 + 5 + 4 + 3) / 24)  # negatives below each positive
    # Specificity >= 0.80 allows 1 false positive of 6: threshold 0.6 catches 0.9 and 0.6 (and 0.8 negative).
    assert mel["sensitivity_at_specificity"] == pytest.approx({"0.80": 0.5, "0.95": 0.25})
    assert mel["threshold_at_specificity"] == pytest.approx({"0.80": 0.6, "0.95": 0.9})


def test_triage_malignant_sums_the_four_classes():
    # Malignant scores: positives MEL 0.9, BCC 0.7, SCC+AK 0.4, AK 0.1; negatives 0.8, 0.35, 0.3, 0.2, 0.05, 0.
    y, probs = _rows(
        [
            (MEL, {MEL: 0.9}),
            (BCC, {BCC: 0.7}),
            (SCC, {SCC: 0.2, AK: 0.2}),
            (AK, {AK: 0.1}),
            (NV, {MEL: 0.3, BCC: 0.5}),
            (NV, {SCC: 0.35}),
            (BKL, {BKL: 0.5, AK: 0.3}),
            (NV, {MEL: 0.1, BCC: 0.1}),
            (VASC, {VASC: 0.9, SCC: 0.05}),
            (DF, {DF: 1.0}),
        ]
    )
    result = an.triage(y, probs)
    mal = result["malignant"]
    assert (mal["positives"], mal["negatives"]) == (4, 6)
    assert mal["auc"] == pytest.approx((6 + 5 + 5 + 2) / 24)  # negatives below 0.9, 0.7, 0.4, 0.1
    assert mal["sensitivity_at_specificity"] == pytest.approx({"0.80": 0.75, "0.95": 0.25})
    assert mal["threshold_at_specificity"] == pytest.approx({"0.80": 0.4, "0.95": 0.9})
    assert result["melanoma"]["positives"] == 1
    json.dumps(result, allow_nan=False)


def test_triage_without_positives_is_none():
    y, probs = _rows([(NV, {MEL: 0.1}), (BKL, {MEL: 0.2})])
    mel = an.triage(y, probs)["melanoma"]
    assert mel["positives"] == 0 and mel["auc"] is None
    assert mel["sensitivity_at_specificity"] == {"0.80": None, "0.95": None}
    assert mel["threshold_at_specificity"] == {"0.80": None, "0.95": None}


# ── subgroups ─────────────────────────────────────────────────────────────────────────────────


def test_groups_from_metadata_decodes_text_ordered_ages_and_missing_values():
    rows = [
        (5, "head/neck", "female"),  # the "5.0" column comes after "45.0": read by position it would be 45
        (30, None, "male"),  # the "30.0" column is the 6th: read by position it would be 25
        (45, "palms/soles", None),
        (60, "oral/genital", "female"),
        (0, "upper extremity", "male"),
        (85, "anterior torso", None),
        (None, None, None),
    ]
    metadata = np.array([encode_metadata(*row) for row in rows])
    both = metadata[0].copy()
    both[:18] = 0
    both[[0, 1]] = 1  # two age bins hot: not decodable
    groups = an.groups_from_metadata(np.vstack([metadata, both]))
    assert groups["age"] == ["<30", "30-59", "30-59", ">=60", "<30", ">=60", "unknown", "unknown"]
    assert groups["sex"] == ["female", "male", "unknown", "female", "male", "unknown", "unknown", "female"]
    assert groups["site"] == [
        "head/neck",
        "unknown",
        "palms/soles",
        "oral/genital",
        "upper extremity",
        "anterior torso",
        "unknown",
        "head/neck",
    ]
    with pytest.raises(ValueError, match="metadata must be"):
        an.groups_from_metadata(np.zeros((3, METADATA_SIZE - 1)))


def _metadata(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ages = [None, *range(0, 90, 5)]
    return np.array(
        [
            encode_metadata(
                ages[rng.integers(len(ages))], (None, *SITES)[rng.integers(9)], (None, "female", "male")[i % 3]
            )
            for i in range(n)
        ]
    )


def test_subgroups_partition_the_split_and_match_compute_metrics():
    y, probs = _model(300, seed=3)
    metadata = _metadata(300)
    result = an.subgroups(y, probs, metadata)
    assert list(result) == ["sex", "age", "site"]
    assert list(result["sex"]) == ["female", "male", "unknown"]
    assert list(result["age"]) == ["<30", "30-59", ">=60", "unknown"]
    assert list(result["site"]) == [*SITES, "unknown"]
    for attribute, groups in result.items():
        assert sum(g["n"] for g in groups.values()) == 300, attribute
    female = np.array(an.groups_from_metadata(metadata)["sex"]) == "female"
    expected = ev.compute_metrics(y[female], probs[female])
    got = result["sex"]["female"]
    assert got["balanced_accuracy"] == pytest.approx(expected["balanced_accuracy"])
    assert got["support"] == expected["support"]
    for name in CLASS_NAMES:
        want = expected["per_class_recall"][name] if expected["support"][name] else None
        assert got["per_class_recall"][name] == (pytest.approx(want) if want is not None else None)
    json.dumps(result, allow_nan=False)


def test_subgroups_omit_empty_groups_and_keep_absent_classes_none():
    y, probs = _rows([(MEL, {MEL: 0.9}), (NV, {}), (NV, {MEL: 0.8})])
    metadata = np.array([encode_metadata(50, "head/neck", "male")] * 3)
    result = an.subgroups(y, probs, metadata)
    assert list(result["sex"]) == ["male"] and list(result["age"]) == ["30-59"]
    male = result["sex"]["male"]
    assert male["n"] == 3 and male["per_class_recall"]["BCC"] is None
    assert male["balanced_accuracy"] == pytest.approx((1.0 + 0.5) / 2)
    with pytest.raises(ValueError, match="rows"):
        an.subgroups(y, probs, metadata[:2])


def _group(n: int, ba: float | None) -> GroupMetrics:
    return GroupMetrics(n=n, balanced_accuracy=ba, per_class_recall={}, support={})


def test_largest_gap_picks_attribute_and_respects_min_support():
    result = {
        "sex": {"female": _group(100, 0.70), "male": _group(100, 0.60), "unknown": _group(5, 0.10)},
        "age": {"<30": _group(50, 0.75), "30-59": _group(50, 0.70), ">=60": _group(50, 0.55)},
        "site": {"head/neck": _group(19, 0.20), "palms/soles": _group(30, 0.65)},
    }
    gap = an.largest_gap(result)
    assert gap == {
        "attribute": "age",
        "best": "<30",
        "best_balanced_accuracy": 0.75,
        "worst": ">=60",
        "worst_balanced_accuracy": 0.55,
        "gap": pytest.approx(0.20),
        "min_support": 20,
    }
    small = an.largest_gap(result, min_support=5)  # now sex "unknown" (0.10) and head/neck (0.20) count
    assert (small["attribute"], small["worst"], small["gap"]) == ("sex", "unknown", pytest.approx(0.60))
    assert an.largest_gap(result, min_support=101) is None
    assert an.largest_gap({"sex": {"female": _group(100, 0.7), "male": _group(100, None)}}) is None


# ── everything together, and evaluation's per-class AUC ───────────────────────────────────────


def test_analyse_returns_json_ready_sections():
    y, probs = _model(500, seed=4)
    result = an.analyse(y, probs, _metadata(500, seed=1), resamples=100)
    assert set(result) == {"ci95", "ece", "reliability", "triage", "subgroups"}
    assert result["ci95"]["resamples"] == 100
    assert result["ece"] == result["reliability"]["ece"]
    typed = {a: {g: GroupMetrics.from_json(m) for g, m in groups.items()} for a, groups in result["subgroups"].items()}
    assert an.largest_gap(typed) is not None
    json.dumps(result, allow_nan=False)
    # No resamples: no interval; no metadata (records of unknown origin): no subgroups.
    assert set(an.analyse(y, probs, None, resamples=0)) == {"ece", "reliability", "triage"}


def test_compute_metrics_per_class_auc():
    y, probs = _model(200, seed=6)
    y[y == DF] = NV  # DF has no positives now
    m = ev.compute_metrics(y, probs)
    assert list(m["per_class_auc"]) == list(CLASS_NAMES)
    assert m["per_class_auc"]["DF"] is None
    for c, name in enumerate(CLASS_NAMES):
        if name != "DF":
            assert m["per_class_auc"][name] == pytest.approx(roc_auc_score(y == c, probs[:, c]))
    assert m["macro_auc"] == pytest.approx(np.mean([a for a in m["per_class_auc"].values() if a is not None]))
