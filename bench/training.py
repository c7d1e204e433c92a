"""End-to-end `fit` throughput with the real input pipeline against the same model fed from memory.

    .venv/bin/python -m bench.training [--images 640] [--image-size 64] [--modes frozen fine_tune]

The job's model and data settings (augmentation on, class weights). Side "pipeline": `model.fit`
for one epoch over `utilities.data.pipeline.build_datasets(...).train`. Side "in_memory": the same model and
`fit`, over one pass of that pipeline's output held in memory as tensors (decoded, augmented, batched
identically): the input costs nothing. Side "naive": the same `fit` over `bench.pipeline`'s
original-DermAID-shaped pipeline (no prefetch, so input and training never overlap). Epoch time
only (EpochTimer), first epoch excluded. Target: pipeline / in_memory ≥ 0.95 (the pipeline hides
behind the model).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from bench import common
from bench.pipeline import naive_dataset
from utilities.data import pipeline as data

RATIO_TARGET = 0.95


def run(args: argparse.Namespace, bench_data: common.BenchData) -> dict[str, Any]:
    datasets = data.build_datasets(
        bench_data.shards, image_size=args.image_size, global_batch_size=args.batch_size, seed=0, augment=True
    )
    inputs = {
        "pipeline": datasets.train,
        "in_memory": common.materialize(datasets.train, args.batch_size),
        "naive": naive_dataset(bench_data.shards["train"], args.image_size, args.batch_size, seed=0),
    }
    examples = datasets.counts["train"]
    fit_kwargs = {"class_weight": datasets.class_weights, "verbose": 0}
    sides: dict[str, common.Side] = {}
    for mode in args.modes:
        model = common.job_model(args.image_size, fine_tune=mode == "fine_tune")
        for name, dataset in inputs.items():
            fit = lambda cb, m=model, d=dataset: m.fit(d, callbacks=cb, **fit_kwargs)  # noqa: E731
            sides[f"{name}_{mode}"] = common.epoch_side(fit, examples)
    stats = common.compare(sides, args.warmup, args.repeats)
    ratios = {}
    for m in args.modes:
        ratios[f"pipeline_vs_memory_{m}"] = common.ratio(stats[f"pipeline_{m}"], stats[f"in_memory_{m}"])
        ratios[f"naive_vs_memory_{m}"] = common.ratio(stats[f"naive_{m}"], stats[f"in_memory_{m}"])
    return {
        "results": common.stats_dict(stats),
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "targets": {k: RATIO_TARGET for k in ratios if k.startswith("pipeline_")},
        "train_examples": examples,
    }


def report(result: dict[str, Any]) -> str:
    return common.rates_report("fit: real pipeline vs in-memory tensors", result, lambda name: "fit, one epoch")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_modes(
        parser,
        ["frozen"],
        "backbone frozen (--freeze-backbone) and/or fine-tuned (the job's default) (default: %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = common.parser("training", __doc__, repeats=5)
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return common.run_main("training", build_parser().parse_args(argv), run, report)


if __name__ == "__main__":
    sys.exit(main())
