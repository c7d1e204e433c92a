"""The run's model card: `model_card.json` and `model_card.md`, generated from its typed records only.

    card = model_card(record, metrics, serving_record)     # RunRecord, RunMetrics, model/serving.json or None
    write_model_card(run_dir, card)

What a reviewer of a release needs on one page: the model and the data version it learnt from (tag,
manifest sha256, images per class and split), the training recipe, the headline metrics with their 95 %
intervals, per-class recall, the largest subgroup gap, calibration, the triage operating points, every
compressed variant's difference from the model, the release gate's verdict, how to call each
signature, and what the model is not for. No number is typed by hand: each comes from metrics.json,
run.json or serving.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from utilities import serving as serving_spec
from utilities.backbones import display_name
from utilities.data.schema import CLASS_NAMES, HEADLINE, MALIGNANT_CLASSES
from utilities.evaluation.analysis import MIN_SUPPORT, largest_gap
from utilities.evaluation.results import RunMetrics, SplitMetrics
from utilities.run.config import DEFAULT_BACKBONE, QUANTIZE_MODES

MODEL_CARD_JSON = "model_card.json"
MODEL_CARD_MD = "model_card.md"
TRAIN_RECIPE = ("epochs", "batch_size", "learning_rate", "lr_schedule", "warmup_epochs", "label_smoothing", "loss")
TRAIN_RECIPE += ("clip_norm", "ema", "seed")
INTENDED_USE = (
    "Research and decision support for trained clinicians triaging dermoscopy images: a ranking of the "
    "eight ISIC 2019 diagnoses and a malignancy flag. Not a diagnostic device; not validated for "
    "clinical use."
)
LIMITS = (
    "Learnt from the dataset version named here only; ISIC 2019 is dermoscopy from a few centres "
    "(Vienna, Queensland, Barcelona, New York: HAM10000, BCN_20000, MSK), mostly of lighter skin; its "
    "site and age metadata are coarse and often missing.",
    "Images other than dermoscopy (clinical photographs, phone pictures), lesions or sites rare in the "
    "training data, and unknown diagnoses (ISIC's UNK) are outside what it was measured on.",
    "The intervals are over the test images of this data version; another population may differ more.",
)


def _split(m: SplitMetrics | None) -> dict[str, Any] | None:
    if m is None:
        return None
    return {
        "n": m.n,
        HEADLINE: m.balanced_accuracy,
        f"{HEADLINE}_ci95": m.interval(HEADLINE),
        "macro_auc": m.macro_auc,
        "macro_auc_ci95": m.interval("macro_auc"),
        "ece": m.ece,
    }


def model_card(record, metrics: RunMetrics, serving: dict[str, Any] | None) -> dict[str, Any]:
    """The card's content (JSON-ready) from run.json's record, metrics.json and serving.json."""
    model = metrics.variants["model"]
    test = model.test
    config = record.config or {}
    gap = largest_gap(test.subgroups, MIN_SUPPORT) if test and test.subgroups else None
    variants = {}
    for name, variant in metrics.variants.items():
        if name == "model":
            continue
        if variant.error is not None:
            variants[name] = {"error": variant.error}
            continue
        delta = variant.test.balanced_accuracy - test.balanced_accuracy if variant.test and test else None
        variants[name] = {
            f"test_{HEADLINE}": variant.test.balanced_accuracy if variant.test else None,
            f"delta_test_{HEADLINE}": delta,
            "agreement_with_model": variant.agreement,
            "gzip_bytes": variant.gzip_bytes,
            "gzip_ratio_vs_model": variant.gzip_ratio_vs_float,
            "latency_ms_median": variant.latency_ms.median if variant.latency_ms else None,
        }
    triage = {
        split: {
            task: {
                "auc": t.auc,
                "sensitivity_at_specificity": dict(t.sensitivity_at_specificity),
                "threshold_at_specificity": dict(t.threshold_at_specificity),
            }
            for task, t in (m.triage or {}).items()
        }
        for split, m in model.splits().items()
    }
    quantized = tuple(f"_{mode}" for mode in QUANTIZE_MODES)
    tflite = [f"{name}.tflite" for name, v in variants.items() if name.endswith(quantized) and "error" not in v]
    lite = serving_spec.lite_record()
    data = record.data
    model_config = config.get("model") or {}
    return {
        "model": {
            "name": record.model_name,
            "run_id": record.run_id,
            "uri": record.uri,
            "architecture": f"{display_name(model_config.get('backbone', DEFAULT_BACKBONE))} image branch + metadata "
            "dense branch, fused by learned weights",
            "image_size": (config.get("data") or {}).get("image_size"),
            "fusion_weights": record.fusion_weights,
            "git_commit": (record.code or {}).get("git_commit"),
            "finished": record.finished,
        },
        "data": {
            "tag": data.tag if data else None,
            "manifest_sha256": data.manifest_sha256 if data else None,
            "images_per_class": data.counts if data else None,
        },
        "training": {
            **{k: (config.get("train") or {}).get(k) for k in TRAIN_RECIPE},
            **{k: model_config.get(k) for k in ("weights", "fine_tune", "fcnn_nodes", "dropout")},
            **{
                k: (config.get("data") or {}).get(k) for k in ("augment", "colour_jitter", "cutout", "metadata_dropout")
            },
            "weights_exported": record.training.weights if record.training else None,
            "epochs_run": record.training.epochs_run if record.training else None,
            "class_weights": "inverse class frequency",
        },
        "metrics": {"val": _split(model.val), "test": _split(test)},
        "per_class_recall_test": dict(test.per_class_recall) if test else None,
        "subgroup_gap_test": gap,
        "calibration": None
        if model.calibration is None
        else {
            "temperature": model.calibration.temperature,
            "ece_before": dict(model.calibration.ece_before),
            "ece_after": dict(model.calibration.ece_after),
        },
        "triage": triage,
        "operating_point": (serving or {}).get("operating_point"),
        "variants": variants,
        "gate": record.gate,
        "signatures": (serving or {}).get("signatures"),
        "tflite": {"files": tflite, "inputs": lite["inputs"], "outputs": lite["outputs"]} if tflite else None,
        "intended_use": INTENDED_USE,
        "limits": list(LIMITS),
    }


def _num(value: Any, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _with_ci(value: float | None, bounds: Any) -> str:
    return _num(value) + (f" [{bounds[0]:.3f}, {bounds[1]:.3f}]" if bounds else "")


def _table_head(title: str, columns: list[str]) -> list[str]:
    return [f"## {title}", "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]


def markdown(card: dict[str, Any]) -> str:
    """model_card.md: the card as a page (the JSON beside it holds the same numbers)."""
    m, d, t = card["model"], card["data"], card["training"]
    lines = [f"# Model card: {m['name']} ({m['run_id']})", "", "## Model", ""]
    lines += [
        f"- {m['architecture']}; {m['image_size']} px; fusion weights {m['fusion_weights']}",
        f"- run `{m['uri']}`, code `{m['git_commit']}`, finished {m['finished']}",
        "",
    ]
    lines += ["## Data", "", f"- tag `{d['tag']}`, manifest sha256 `{d['manifest_sha256']}`", ""]
    counts = {split: c for split, c in (d.get("images_per_class") or {}).items() if isinstance(c, dict)}
    if counts:
        splits = [s for s in ("train", "val", "test") if s in counts]
        lines += ["| class | " + " | ".join(splits) + " |", "|---" * (len(splits) + 1) + "|"]
        lines += [
            f"| {c} | " + " | ".join(str((counts[s] or {}).get(c, 0)) for s in splits) + " |" for c in CLASS_NAMES
        ]
        lines.append("")
    lines += ["## Training", "", "- " + ", ".join(f"{k} {v}" for k, v in t.items()), ""]
    lines += _table_head("Metrics", ["split", "n", f"{HEADLINE} [95 % CI]", "macro AUC [95 % CI]", "ECE"])
    for split, s in card["metrics"].items():
        if s:
            lines.append(
                f"| {split} | {s['n']} | {_with_ci(s[HEADLINE], s[f'{HEADLINE}_ci95'])} | "
                f"{_with_ci(s['macro_auc'], s['macro_auc_ci95'])} | {_num(s['ece'])} |"
            )
    recall = card.get("per_class_recall_test") or {}
    lines += ["", "Per-class recall (test): " + ", ".join(f"{c} {_num(v)}" for c, v in recall.items()), ""]
    gap = card.get("subgroup_gap_test")
    lines += [
        f"Largest subgroup gap (test, groups of ≥ {gap['min_support']} images): by {gap['attribute']}, "
        f"{gap['worst']} {gap['worst_balanced_accuracy']:.3f} vs {gap['best']} {gap['best_balanced_accuracy']:.3f}."
        if gap
        else "No attribute has two test groups large enough to compare.",
        "",
    ]
    cal = card.get("calibration")
    if cal:
        lines += [
            f"Calibration: temperature {cal['temperature']:.3f}; ECE val {_num(cal['ece_before'].get('val'))} → "
            f"{_num(cal['ece_after'].get('val'))}, test {_num(cal['ece_before'].get('test'))} → "
            f"{_num(cal['ece_after'].get('test'))}.",
            "",
        ]
    lines += ["## Triage operating points", ""]
    for split, tasks in card["triage"].items():
        for task, v in tasks.items():
            sens = ", ".join(f"{_num(s)} at specificity {k}" for k, s in v["sensitivity_at_specificity"].items())
            lines.append(f"- {split}, {task}: AUC {_num(v['auc'])}; sensitivity {sens}")
    op = card.get("operating_point")
    if op:
        lines.append(
            f"- exported `malignant_flag` ({', '.join(MALIGNANT_CLASSES)}): threshold {_num(op['threshold'], 4)}, "
            f"chosen at validation specificity {op['specificity_on_val']}"
        )
    lines.append("")
    if card["variants"]:
        lines += _table_head(
            "Other variants (compressed, test-time augmented)",
            ["variant", f"test {HEADLINE}", "Δ vs model", "agreement", "gzip ratio"],
        )
        for name, v in card["variants"].items():
            if "error" in v:
                lines.append(f"| {name} | failed: {v['error']} | | | |")
            else:
                lines.append(
                    f"| {name} | {_num(v[f'test_{HEADLINE}'])} | {_num(v[f'delta_test_{HEADLINE}'])} | "
                    f"{_num(v['agreement_with_model'])} | {_num(v['gzip_ratio_vs_model'], 2)} |"
                )
        lines.append("")
    gate = card.get("gate")
    lines += [
        "## Release gate",
        "",
        (f"{'passed' if gate['passed'] else 'FAILED'}: `{gate['expression']}` — " + "; ".join(gate["reasons"]))
        if gate
        else "No gate applied.",
        "",
    ]
    lines += ["## How to call it", ""]
    for name, sig in (card.get("signatures") or {}).items():
        lines.append(
            f'- SavedModel `signatures["{name}"]`: inputs {json.dumps(sig["inputs"])}; outputs {json.dumps(sig["outputs"])}'
        )
    if not card.get("signatures"):
        lines.append(
            "- no SavedModel was exported (--no-saved-model): load `model/model.keras` with utilities.model.load_model"
        )
    if card.get("tflite"):
        lite = card["tflite"]
        lines.append(
            f"- TFLite ({', '.join(f'`{f}`' for f in lite['files'])}; `tflite.json` and `labels.txt` beside them): "
            f"`serving_default` inputs {json.dumps(lite['inputs'])}; outputs {json.dumps(lite['outputs'])}"
        )
    lines += [
        "",
        "## Intended use and limits",
        "",
        card["intended_use"],
        "",
        *(f"- {limit}" for limit in card["limits"]),
        "",
    ]
    return "\n".join(lines)


def write_model_card(run_dir: Path, card: dict[str, Any]) -> None:
    run_dir = Path(run_dir)
    (run_dir / MODEL_CARD_JSON).write_text(
        json.dumps(card, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8"
    )
    (run_dir / MODEL_CARD_MD).write_text(markdown(card), encoding="utf-8")
