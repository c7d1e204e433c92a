"""The variants side by side: one flat row per variant (the report's and W&B's comparison table) and
the warnings for a variant that predicts (nearly) one class, whose agreement then means little.

    rows = comparison_rows(metrics)        # metrics.json's content
    for line in collapse_warnings(metrics): log.warning(line)
"""

from __future__ import annotations

from typing import Any


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
