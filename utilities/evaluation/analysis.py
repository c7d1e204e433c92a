"""Per-split analysis for the dermatology team: confidence intervals, calibration, triage, subgroups.

Pure numpy / scipy / scikit-learn (no TensorFlow), same conventions as `utilities.evaluation.metrics`:
`y_true` integer class ids (N,), `probs` probabilities (N, C) in `CLASS_NAMES` order, `metadata`
the records' 28-column multi-hot (N, 28). Every returned value is JSON-ready:

    y_true, probs = evaluation.predict(model.predict_on_batch, test_ds)
    metrics = evaluation.compute_metrics(y_true, probs)
    metrics.update(analyse(y_true, probs, metadata))      # ci95, ece, reliability, triage, subgroups

    temperature = fit_temperature(y_val, probs_val)       # fit on validation, apply to test
    calibrated = apply_temperature(probs_test, temperature)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp
from sklearn.metrics import roc_auc_score, roc_curve

from utilities.data.schema import (
    AGE_BINS,
    CLASS_NAMES,
    MALIGNANT_CLASSES,
    MELANOMA_CLASSES,
    METADATA_SIZE,
    PROBABILITY_FLOOR,
    SEXES,
    SITES,
    SPECIFICITIES,
)
from utilities.evaluation.metrics import _check_inputs
from utilities.evaluation.results import GroupMetrics

TEMPERATURE_BOUNDS = (0.05, 20.0)
# Subgroup labels in report order; "unknown" (missing or undecodable metadata) always last.
UNKNOWN = "unknown"
SEX_GROUPS: tuple[str, ...] = (*SEXES, UNKNOWN)
AGE_GROUPS: tuple[str, ...] = ("<30", "30-59", ">=60", UNKNOWN)  # years
SITE_GROUPS: tuple[str, ...] = (*SITES, UNKNOWN)


def _inputs(y_true, probs, num_classes: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 (N,), probs float64 (N, C)), validated like `evaluation.compute_metrics` does.

    `num_classes` None accepts any number of probability columns.
    """
    y_true = np.asarray(y_true).astype(np.int64).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    columns = probs.shape[-1] if probs.ndim else 0
    _check_inputs(y_true, probs, columns if num_classes is None else num_classes)
    return y_true, probs


# ── bootstrap confidence intervals ────────────────────────────────────────────────────────────


def _resample_counts(y_true: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(N, B) float: how often each example is drawn in each of B resamples, stratified by true class.

    Within each class c its n_c examples are drawn n_c times with replacement (a multinomial(n_c,
    uniform) per resample, drawn as uniform integers and counted: same distribution, ~5× faster), so
    every resample keeps the class supports, and so the set of present classes, of the split.
    Examples are rows so that selecting examples copies contiguous rows of B counts.
    """
    counts = np.zeros((len(y_true), resamples))
    offsets = np.arange(resamples)[:, None]
    for c in np.unique(y_true):
        members = np.flatnonzero(y_true == c)
        n = len(members)
        draws = rng.integers(0, n, size=(resamples, n)) + offsets * n  # (B, n_c), made unique per resample
        counts[members] = np.bincount(draws.ravel(), minlength=resamples * n).reshape(resamples, n).T
    return counts


def weighted_auc(scores: np.ndarray, positives: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC (B,) of `scores` (N,) for `positives` (N,) bool under B example weightings (N, B).

    Example i counts `weights[i, b]` times in weighting b; a tied positive–negative pair counts ½,
    as in `sklearn.metrics.roc_auc_score` (equal to it, to rounding, when all weights are 1).
    Each weighting needs a positive and a negative of non-zero weight.
    """
    scores, positives = np.asarray(scores), np.asarray(positives, dtype=bool)
    negatives = np.flatnonzero(~positives)
    negatives = negatives[np.argsort(scores[negatives], kind="stable")]
    sorted_negatives = scores[negatives]
    # cum[k] (B,): weight of the k lowest-scoring negatives, so a positive scoring s has cum[lo] negatives
    # strictly below it and cum[hi] - cum[lo] tied with it, lo/hi = left/right insertion points of s.
    cum = np.zeros((len(negatives) + 1, weights.shape[1]))
    np.cumsum(weights[negatives], axis=0, out=cum[1:])
    lo = np.searchsorted(sorted_negatives, scores[positives], side="left")
    hi = np.searchsorted(sorted_negatives, scores[positives], side="right")
    w_pos = weights[positives]  # (n_pos, B)
    wins = 0.5 * np.einsum("ib,ib->b", w_pos, cum[lo] + cum[hi])  # below + ½ tied = ½ (cum[lo] + cum[hi])
    return wins / (w_pos.sum(axis=0) * cum[-1])


def _interval(values: np.ndarray, level: float) -> list[float]:
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(values, [tail, 100.0 - tail])
    return [float(lo), float(hi)]


def bootstrap_ci(y_true, probs, resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Stratified percentile bootstrap intervals of balanced accuracy and macro one-vs-rest AUC.

    Returns {"balanced_accuracy": [lo, hi], "macro_auc": [lo, hi] or None (no class has positives
    and negatives), "resamples": B, "level": level}. All B resamples are evaluated at once from a
    (N, B) matrix of draw counts: 1000 resamples of N = 2500, C = 8 take well under 2 s.
    """
    if resamples < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap needs resamples >= 1 and 0 < level < 1; got {resamples} and {level}")
    y_true, probs = _inputs(y_true, probs, None)
    counts = _resample_counts(y_true, resamples, np.random.default_rng(seed))
    num_classes = probs.shape[1]
    onehot = np.eye(num_classes)[y_true]  # (N, C)
    support = onehot.sum(axis=0)
    present = support > 0
    correct = (probs.argmax(axis=1) == y_true)[:, None] * onehot  # (N, C): right and of class c
    recall = (counts.T @ correct)[:, present] / support[present]  # (B, C present)
    aucs = [weighted_auc(probs[:, c], y_true == c, counts) for c in range(num_classes) if 0 < support[c] < len(y_true)]
    return {
        "balanced_accuracy": _interval(recall.mean(axis=1), level),
        "macro_auc": _interval(np.mean(aucs, axis=0), level) if aucs else None,
        "resamples": int(resamples),
        "level": float(level),
    }


# ── calibration ───────────────────────────────────────────────────────────────────────────────


def reliability(y_true, probs, bins: int = 15) -> dict:
    """Reliability diagram of top-1 confidence in `bins` equal-width bins (lo, hi] of [0, 1].

    Per bin: mean confidence, accuracy (None for an empty bin) and count; `ece` is the
    count-weighted mean |accuracy − confidence| (expected calibration error).
    """
    if bins < 1:
        raise ValueError(f"reliability needs bins >= 1; got {bins}")
    y_true, probs = _inputs(y_true, probs, None)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(np.float64)
    inner_edges = np.linspace(0.0, 1.0, bins + 1)[1:-1]
    index = np.searchsorted(inner_edges, confidence, side="left")  # 0 ∈ bin 0, 1 ∈ last bin
    count = np.bincount(index, minlength=bins)
    filled = count > 0
    mean_conf = np.bincount(index, weights=confidence, minlength=bins)[filled] / count[filled]
    accuracy = np.bincount(index, weights=correct, minlength=bins)[filled] / count[filled]
    ece = float(np.sum(count[filled] * np.abs(accuracy - mean_conf)) / len(y_true))
    return {
        "bins": int(bins),
        "ece": ece,
        "confidence": _per_bin(mean_conf, filled),
        "accuracy": _per_bin(accuracy, filled),
        "count": count.astype(int).tolist(),
    }


def _per_bin(values: np.ndarray, filled: np.ndarray) -> list[float | None]:
    """Values of the filled bins spread back over all bins, None in the empty ones."""
    it = iter(values.tolist())
    return [next(it) if f else None for f in filled]


def expected_calibration_error(y_true, probs, bins: int = 15) -> float:
    """Top-1 expected calibration error with `bins` equal-width bins (0 = perfectly calibrated)."""
    return reliability(y_true, probs, bins)["ece"]


def _log_probs(probs: np.ndarray) -> np.ndarray:
    """log p (N, C): the logits up to a per-row constant for a softmax model."""
    return np.log(np.clip(probs, PROBABILITY_FLOOR, None))  # a hard 0 would be an infinite logit


def fit_temperature(y_true, probs) -> float:
    """The temperature T in [0.05, 20] minimising the NLL of softmax(log p / T) on this split.

    T > 1 softens an over-confident model, T < 1 sharpens an under-confident one; the argmax, and so
    accuracy, does not change. Fit on validation, apply to test with `apply_temperature`.
    """
    y_true, probs = _inputs(y_true, probs, None)
    logits = _log_probs(probs)
    true_logit = logits[np.arange(len(y_true)), y_true]

    def nll(log_t: float) -> float:
        t = np.exp(log_t)
        return float(np.mean(logsumexp(logits / t, axis=1) - true_logit / t))

    # Searched on log T so that halving and doubling are equally far from T = 1.
    bounds = (np.log(TEMPERATURE_BOUNDS[0]), np.log(TEMPERATURE_BOUNDS[1]))
    result = minimize_scalar(nll, bounds=bounds, method="bounded", options={"xatol": 1e-5})
    return float(np.exp(result.x))


def apply_temperature(probs, temperature: float) -> np.ndarray:
    """softmax(log p / T) row-wise, in the input's float dtype (float64 for other inputs)."""
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number; got {temperature}")
    probs = np.asarray(probs)
    dtype = probs.dtype if probs.dtype in (np.float32, np.float64) else np.float64
    scaled = _log_probs(probs.astype(np.float64)) / temperature
    scaled -= scaled.max(axis=-1, keepdims=True)  # avoids overflow in exp
    out = np.exp(scaled)
    return (out / out.sum(axis=-1, keepdims=True)).astype(dtype)


# ── triage: melanoma and malignant vs the rest ───────────────────────────────────────────────


def _operating_points(positives: np.ndarray, scores: np.ndarray) -> tuple[dict, dict]:
    """Best sensitivity, and its threshold, at each target specificity (score >= threshold is positive).

    Sensitivity is the highest TPR over ROC points with specificity >= target; of the thresholds
    reaching it the highest (best specificity) is reported. None when it is only reached by calling
    nothing positive (threshold +inf, not a number a clinic can use).
    """
    fpr, tpr, thresholds = roc_curve(positives, scores, drop_intermediate=False)
    sensitivity, threshold = {}, {}
    for target in SPECIFICITIES:
        key = f"{target:.2f}"
        # 1e-12: a specificity of exactly the target (e.g. 16/20 = 0.80) must not fail on rounding.
        eligible = np.flatnonzero(1.0 - fpr >= target - 1e-12)  # a prefix: fpr grows along the curve
        best = eligible[np.argmax(tpr[eligible])]  # argmax takes the first: the highest threshold
        sensitivity[key] = float(tpr[best])
        threshold[key] = float(thresholds[best]) if np.isfinite(thresholds[best]) else None
    return sensitivity, threshold


def _triage_task(positives: np.ndarray, scores: np.ndarray) -> dict:
    n_pos = int(positives.sum())
    n_neg = len(positives) - n_pos
    none = {f"{t:.2f}": None for t in SPECIFICITIES}
    result = {"positives": n_pos, "negatives": n_neg, "auc": None}
    if n_pos == 0 or n_neg == 0:
        return {**result, "sensitivity_at_specificity": none, "threshold_at_specificity": dict(none)}
    sensitivity, threshold = _operating_points(positives, scores)
    result["auc"] = float(roc_auc_score(positives, scores))
    return {**result, "sensitivity_at_specificity": sensitivity, "threshold_at_specificity": threshold}


def _class_ids(names: Sequence[str], class_names: Sequence[str]) -> list[int]:
    missing = [n for n in names if n not in class_names]
    if missing:
        raise ValueError(f"triage needs classes {', '.join(missing)}; the classes are {', '.join(class_names)}")
    return [list(class_names).index(n) for n in names]


def triage(y_true, probs, class_names: Sequence[str] = CLASS_NAMES) -> dict:
    """Melanoma (score p[MEL]) and malignant (score p[MEL] + p[BCC] + p[SCC] + p[AK]) vs the rest.

    Each task: positives, negatives, one-vs-rest AUC and the sensitivity (and threshold) at
    specificity 0.80 and 0.95, keyed "0.80" and "0.95"; None where positives or negatives are missing.
    """
    y_true, probs = _inputs(y_true, probs, len(class_names))
    tasks = {"melanoma": MELANOMA_CLASSES, "malignant": MALIGNANT_CLASSES}
    out = {}
    for task, names in tasks.items():
        ids = _class_ids(names, class_names)
        out[task] = _triage_task(np.isin(y_true, ids), probs[:, ids].sum(axis=1))
    return out


# ── subgroups: sex, age, anatomical site ──────────────────────────────────────────────────────


def _one_hot_labels(block: np.ndarray, names: Sequence[str]) -> list[str]:
    """Per row the name of its single hot column, or "unknown" with none or several hot."""
    hot = block > 0.5
    single = hot.sum(axis=1) == 1
    index = hot.argmax(axis=1)
    return [names[i] if ok else UNKNOWN for i, ok in zip(index.tolist(), single.tolist(), strict=True)]


def _age_group(age: str) -> str:
    if age == UNKNOWN:
        return UNKNOWN
    years = int(age)
    return "<30" if years < 30 else "30-59" if years < 60 else ">=60"


def groups_from_metadata(metadata) -> dict[str, list[str]]:
    """Group labels per row for "sex", "age" ("<30", "30-59", ">=60") and "site", "unknown" if missing.

    Decodes the record multi-hot (N, 28): 18 age columns in `AGE_BINS` (text) order, 8 `SITES`,
    then sex_female, sex_male. A group with no or several hot columns is "unknown".
    """
    metadata = np.asarray(metadata)
    if metadata.ndim != 2 or metadata.shape[1] != METADATA_SIZE:
        raise ValueError(f"metadata must be (N, {METADATA_SIZE}) multi-hot; got shape {metadata.shape}")
    n_age, n_site = len(AGE_BINS), len(SITES)
    ages = _one_hot_labels(metadata[:, :n_age], [str(a) for a in AGE_BINS])
    return {
        "sex": _one_hot_labels(metadata[:, n_age + n_site :], SEXES),
        "age": [_age_group(a) for a in ages],
        "site": _one_hot_labels(metadata[:, n_age : n_age + n_site], SITES),
    }


def _group_metrics(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]) -> dict:
    """n, balanced accuracy and per-class recall (None without support) of one group."""
    support = np.bincount(y_true, minlength=len(class_names))
    hits = np.bincount(y_true[y_true == y_pred], minlength=len(class_names))
    recall = [float(h / s) if s else None for h, s in zip(hits, support, strict=True)]
    present = [r for r in recall if r is not None]
    return {
        "n": len(y_true),
        "balanced_accuracy": float(np.mean(present)) if present else None,
        "per_class_recall": dict(zip(class_names, recall, strict=True)),
        "support": {name: int(s) for name, s in zip(class_names, support, strict=True)},
    }


def subgroups(y_true, probs, metadata, class_names: Sequence[str] = CLASS_NAMES) -> dict:
    """{attribute: {group: {n, balanced_accuracy, per_class_recall, support}}} for sex, age and site.

    Groups come in a fixed order (sex: female, male; age: young to old; sites in `SITES` order;
    "unknown" last) and empty groups are left out, so the n's of one attribute sum to N.
    """
    y_true, probs = _inputs(y_true, probs, len(class_names))
    labels = groups_from_metadata(metadata)
    if len(labels["sex"]) != len(y_true):
        raise ValueError(f"metadata has {len(labels['sex'])} rows but there are {len(y_true)} examples")
    y_pred = probs.argmax(axis=1)
    order = {"sex": SEX_GROUPS, "age": AGE_GROUPS, "site": SITE_GROUPS}
    out: dict[str, dict] = {}
    for attribute, groups in order.items():
        column = np.asarray(labels[attribute])
        out[attribute] = {
            g: _group_metrics(y_true[column == g], y_pred[column == g], class_names)
            for g in groups
            if (column == g).any()
        }
    return out


MIN_SUPPORT = 20  # groups with fewer images are listed, not compared: one image moves them by ≥ 0.05


def largest_gap(
    subgroups_of_split: Mapping[str, Mapping[str, GroupMetrics]], min_support: int = MIN_SUPPORT
) -> dict | None:
    """The attribute whose groups (n >= min_support) differ most in balanced accuracy, or None.

    `subgroups_of_split` is a `SplitMetrics.subgroups`. Returns {"attribute", "best",
    "best_balanced_accuracy", "worst", "worst_balanced_accuracy", "gap", "min_support"}; None when no
    attribute has two eligible groups.
    """
    found = None
    for attribute, groups in subgroups_of_split.items():
        scores = {
            g: m.balanced_accuracy for g, m in groups.items() if m.n >= min_support and m.balanced_accuracy is not None
        }
        if len(scores) < 2:
            continue
        best, worst = max(scores, key=scores.get), min(scores, key=scores.get)
        gap = scores[best] - scores[worst]
        if found is None or gap > found["gap"]:
            found = {
                "attribute": attribute,
                "best": best,
                "best_balanced_accuracy": float(scores[best]),
                "worst": worst,
                "worst_balanced_accuracy": float(scores[worst]),
                "gap": float(gap),
                "min_support": int(min_support),
            }
    return found


# ── everything for one split ──────────────────────────────────────────────────────────────────


def analyse(
    y_true, probs, metadata=None, resamples: int = 1000, seed: int = 0, class_names: Sequence[str] = CLASS_NAMES
) -> dict:
    """The analysis merged into one split's metrics: ci95 (none when `resamples` is 0), ece, reliability,
    triage and, when the records' `metadata` (N, 28) is known, subgroups."""
    y_true, probs = _inputs(y_true, probs, len(class_names))
    diagram = reliability(y_true, probs)
    result = {"ece": diagram["ece"], "reliability": diagram, "triage": triage(y_true, probs, class_names)}
    if resamples:
        result["ci95"] = bootstrap_ci(y_true, probs, resamples=resamples, seed=seed, level=0.95)
    if metadata is not None:
        result["subgroups"] = subgroups(y_true, probs, metadata, class_names)
    return result
