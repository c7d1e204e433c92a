"""The variants side by side: one flat row per variant (the report's and W&B's comparison table) and
the warnings for a variant that predicts (nearly) one class, whose agreement then means little.

    rows = comparison_rows(metrics)        # a RunMetrics (metrics.json)
    for line in collapse_warnings(metrics): log.warning(line)
"""

from __future__ import annotations

from typing import Any

from utilities.evaluation.results import RunMetrics, SplitMetrics

COLLAPSE_SHARE = 0.9  # a variant predicting one class for at least this share of a split is flagged


def collapse_warnings(metrics: RunMetrics) -> list[str]:
    """One line per variant and split whose predictions are (nearly) all one class, with its agreement."""
    lines = []
    for name, variant in metrics.scored().items():
        for split, m in variant.splits().items():
            if m.top_class_share >= COLLAPSE_SHARE:
                agreement = variant.agreement
                beside = (
                    "" if agreement is None else f"; its agreement {agreement:.3f} with the float model means as little"
                )
                lines.append(
                    f"{name} predicts {m.top_class} for {m.top_class_share:.0%} of {split} "
                    f"(balanced accuracy {m.balanced_accuracy:.3f}){beside}"
                )
    return lines


def comparison_rows(metrics: RunMetrics) -> list[dict[str, Any]]:
    """One flat row per variant for tables (report and W&B); absent values (a failed variant's) are None."""
    rows = []
    for name, variant in metrics.variants.items():
        test, val, latency = variant.test, variant.val, variant.latency_ms
        bal_low, bal_high = _interval(test, "balanced_accuracy")
        auc_low, auc_high = _interval(test, "macro_auc")
        rows.append(
            {
                "variant": name,
                "test_balanced_accuracy": _get(test, "balanced_accuracy"),
                "test_accuracy": _get(test, "accuracy"),
                "test_macro_f1": _get(test, "macro_f1"),
                "test_macro_auc": _get(test, "macro_auc"),
                "val_balanced_accuracy": _get(val, "balanced_accuracy"),
                "size_bytes": variant.size_bytes,
                "gzip_bytes": variant.gzip_bytes,
                "latency_ms_median": latency.median if latency else None,
                "latency_ms_p90": latency.p90 if latency else None,
                "params": variant.params,
                "agreement": variant.agreement,
                "test_balanced_accuracy_ci95_low": bal_low,
                "test_balanced_accuracy_ci95_high": bal_high,
                "test_macro_auc_ci95_low": auc_low,
                "test_macro_auc_ci95_high": auc_high,
                "test_ece": _get(test, "ece"),
            }
        )
    return rows


def _get(split: SplitMetrics | None, name: str) -> Any:
    return None if split is None else getattr(split, name)


def _interval(split: SplitMetrics | None, name: str) -> tuple[float | None, float | None]:
    """(low, high) of a split's bootstrap interval of `name`, or (None, None) when it has none."""
    bounds = None if split is None else split.interval(name)
    return (bounds[0], bounds[1]) if bounds else (None, None)
