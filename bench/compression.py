"""Compressed variants: batch-1 latency and size of the float model, pruned, TFLite types, student.

    .venv/bin/python -m bench.compression [--image-size 64] [--modes float32 dynamic float16 int8]
    .venv/bin/python -m bench.compression --metrics outputs/base_model/RUN/metrics.json   # a run's table

Variants are built with `utilities.compression` (`pruning.prune`, `distillation.build_student`,
`quantization.export`) on untrained weights: latency and size do not depend on what was learnt, except
that pruning needs its zeros, so the pruned copy runs a few steps under its schedule until the target
sparsity is reached.
Latency: one example per call, `PREDICT_CALLS` calls per round, every variant round-robin in one
process; milliseconds per call (median of rounds). Sizes: `utilities.evaluation.metrics.artifact_size`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tf_keras

from bench import common
from utilities.data import pipeline as data

PREDICT_CALLS = 10  # batch-1 predictions per measured round
TARGET_SPARSITY = 0.5  # the job's default --target-sparsity
PRUNE_STEPS = 4  # steps of the pruning schedule (sparsity reaches its target before the last one)
STUDENT_FILTERS = 32
Predict = Callable[[dict[str, Any]], np.ndarray]


def _pruned(model: tf_keras.Model, datasets: data.Datasets) -> tf_keras.Model:
    from utilities.compression import pruning

    stripped, _ = pruning.prune(
        model, datasets, target_sparsity=TARGET_SPARSITY, epochs=1, learning_rate=1e-5, steps_per_epoch=PRUNE_STEPS
    )
    return stripped


def build_variants(args: argparse.Namespace, datasets: data.Datasets, folder: Path) -> dict[str, tuple[Predict, Path]]:
    """name → (batch predictor, exported artifact)."""
    from utilities.compression import quantization as mq
    from utilities.compression.distillation import build_student
    from utilities.evaluation import variants as variant_eval

    model = common.job_model(args.image_size, fine_tune=False)
    keras_models = {"model": model}
    if args.pruned:
        keras_models["pruned"] = _pruned(model, datasets)
    keras_models["student"] = build_student(args.image_size, STUDENT_FILTERS)
    variants: dict[str, tuple[Predict, Path]] = {}
    for name, keras_model in keras_models.items():
        # A .keras file (weights + config) rather than the run's SavedModel folder: the weights dominate
        # either size, and saving DenseNet121 as a SavedModel takes ~1 min here.
        keras_model.save(str(folder / f"{name}.keras"))
        variants[name] = (variant_eval.keras_predict_fn(keras_model), folder / f"{name}.keras")
    conversions = [("model", mode) for mode in args.modes] + [("student", mode) for mode in args.student_modes]
    for source, mode in conversions:
        path = mq.export(keras_models[source], mode, folder / f"{source}_{mode}.tflite", datasets.train)
        variants[f"{source}_{mode}"] = (mq.tflite_predict_fn(path), path)
    return variants


def _latency_side(predict: Predict, example: dict[str, Any]) -> common.Side:
    def side() -> int:
        for _ in range(PREDICT_CALLS):
            predict(example)
        return PREDICT_CALLS

    return side


def run(args: argparse.Namespace, bench_data: common.BenchData) -> dict[str, Any]:
    from utilities.evaluation import metrics as evaluation
    from utilities.evaluation import variants as variant_eval

    datasets = data.build_datasets(
        bench_data.shards, image_size=args.image_size, global_batch_size=args.batch_size, seed=0, augment=False
    )
    example = {k: v.numpy() for k, v in variant_eval.first_example(datasets.val).items()}
    with tempfile.TemporaryDirectory(prefix="dermaid-bench-variants-") as tmp:
        variants = build_variants(args, datasets, Path(tmp))
        sizes = {name: evaluation.artifact_size(path) for name, (_, path) in variants.items()}
        stats = common.compare(
            {n: _latency_side(p, example) for n, (p, _) in variants.items()}, args.warmup, args.repeats
        )
    rows = {
        name: {
            "latency_ms": {
                "median": round(1000 / s.median, 3),
                "min": round(1000 / s.max, 3),
                "max": round(1000 / s.min, 3),
            },
            **sizes[name],
        }
        for name, s in stats.items()
    }
    return {"results": common.stats_dict(stats), "variants": rows}


def from_metrics(path: Path) -> dict[str, Any]:
    """The same table from a finished run's metrics.json (latency measured by the run itself)."""
    from utilities.evaluation.results import RunMetrics

    metrics = RunMetrics.from_json(json.loads(Path(path).read_text()))
    rows = {}
    for name, variant in metrics.variants.items():
        if variant.error is not None:
            rows[name] = {"error": variant.error}
            continue
        latency = variant.latency_ms
        rows[name] = {
            "latency_ms": {"median": latency.median if latency else None, "p90": latency.p90 if latency else None},
            "size_bytes": variant.size_bytes,
            "gzip_bytes": variant.gzip_bytes,
        }
    return {"variants": rows, "source": str(path)}


def report(result: dict[str, Any]) -> str:
    rows = []
    for name, values in result["variants"].items():
        if "error" in values:
            rows.append([name, "error", "", "", values["error"]])
            continue
        latency = values["latency_ms"]
        spread = latency.get("p90") if "p90" in latency else f"{latency['min']}–{latency['max']}"
        rows.append([name, latency["median"], spread, _mb(values["size_bytes"]), _mb(values["gzip_bytes"])])
    header = ("variant", "latency ms (median)", "range / p90", "size MB", "gzip MB")
    return common.table("Compressed variants, batch-1 latency and size", header, rows)


def _mb(value: int | None) -> str:
    return "" if value is None else f"{value / 1e6:.2f}"


def build_parser() -> argparse.ArgumentParser:
    from utilities.compression.quantization import MODES

    parser = common.parser("compression", __doc__, repeats=5)
    parser.add_argument(
        "--modes", nargs="*", choices=MODES, default=list(MODES), help="TFLite types of the float model (~1.5 min each)"
    )
    parser.add_argument(
        "--student-modes", nargs="*", choices=MODES, default=["int8"], help="TFLite types of the student"
    )
    parser.add_argument(
        "--pruned", action=argparse.BooleanOptionalAction, default=True, help="include the pruned model (~2.5 min)"
    )
    parser.add_argument("--metrics", type=Path, help="print the table of this run's metrics.json instead of measuring")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.metrics:
        try:
            result = from_metrics(args.metrics)
        except (OSError, ValueError) as err:
            print(
                f"error: bench.compression: cannot read {args.metrics}: {' '.join(str(err).split())}", file=sys.stderr
            )
            return 2
        path = common.write_result("compression", result, args.out)
        print(report(result) + f"\nwrote {path}")
        return 0
    return common.run_main("compression", args, run, report)


if __name__ == "__main__":
    sys.exit(main())
