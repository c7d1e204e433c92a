"""Input pipeline throughput against the model's training throughput and a naive pipeline.

    .venv/bin/python -m bench.pipeline [--images 640] [--image-size 64] [--batch-size 32]

Sides, run round-robin in one process (examples/s, median of repeats):
- pipeline: one epoch of `utilities.data.pipeline.build_datasets(...).train` (shard interleave, parallel
  decode, batch-level augmentation, prefetch), iterated without a model;
- naive: the original DermAID shape — records read file after file, each example parsed and
  augmented on its own before batching, maps without num_parallel_calls, no interleave, no explicit
  prefetch (tf.data's default optimisations stay on, as they were for the original: they may
  parallelise its maps and inject a prefetch);
- model (frozen / fine-tune): `train_on_batch` on one batch already in memory: what the model
  can consume when the input costs nothing.
margin = pipeline / model (target ≥ 10×: the pipeline never starves training, even on a loaded host).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import tensorflow as tf

from bench import common
from utilities.data import pipeline as data
from utilities.data.augmentation import augment_images
from utilities.data.records import parse_example

MARGIN_TARGET = 10.0
MIN_SIDE_SECONDS = 1.0  # a fast pipeline side repeats whole epochs until at least this long
MODEL_STEPS = 3  # train_on_batch calls per measured round


def naive_dataset(paths: list[str], image_size: int, batch_size: int, seed: int) -> tf.data.Dataset:
    """The pipeline shape of the original DermAID: per-example work, maps without num_parallel_calls."""
    records = tf.data.TFRecordDataset(paths)  # one file after another
    parsed = records.map(lambda s: parse_example(s, image_size))  # no num_parallel_calls
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)

    def augment_one(example: tuple[dict[str, tf.Tensor], tf.Tensor], pair: tf.Tensor):
        features, label = example
        image = augment_images(features["image"][tf.newaxis], pair)[0]  # same ops, batch of 1
        return {**features, "image": image}, label

    augmented = tf.data.Dataset.zip((parsed, seeds)).map(augment_one)  # per example, before batching
    return augmented.shuffle(2048, seed=seed).batch(batch_size)  # no prefetch


def run(args: argparse.Namespace, bench_data: common.BenchData) -> dict[str, Any]:
    datasets = data.build_datasets(
        bench_data.shards, image_size=args.image_size, global_batch_size=args.batch_size, seed=0, augment=True
    )
    naive = naive_dataset(bench_data.shards["train"], args.image_size, args.batch_size, seed=0)
    batch = common.first_batch(datasets.train)
    sides: dict[str, common.Side] = {
        "pipeline": common.at_least(MIN_SIDE_SECONDS, lambda: common.count_examples(datasets.train)),
        "naive": common.at_least(MIN_SIDE_SECONDS, lambda: common.count_examples(naive)),
    }
    for mode in args.modes:
        model = common.job_model(args.image_size, fine_tune=mode == "fine_tune")
        sides[f"model_{mode}"] = common.train_steps(model, batch, MODEL_STEPS)
    stats = common.compare(sides, args.warmup, args.repeats)
    ratios = {f"margin_vs_model_{m}": common.ratio(stats["pipeline"], stats[f"model_{m}"]) for m in args.modes}
    ratios["speedup_vs_naive"] = common.ratio(stats["pipeline"], stats["naive"])
    return {
        "results": common.stats_dict(stats),
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "targets": {f"margin_vs_model_{m}": MARGIN_TARGET for m in args.modes},
        "train_examples": datasets.counts["train"],
    }


def report(result: dict[str, Any]) -> str:
    notes = {
        "pipeline": "utilities.data.pipeline train split",
        "naive": "per-example, no num_parallel_calls, no explicit prefetch (tf.data default optimisations on)",
    }
    return common.rates_report(
        "Input pipeline vs model", result, lambda name: notes.get(name, "train_on_batch, in-memory batch")
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_modes(parser, ["frozen", "fine_tune"], "model sides to measure (default: both)")


def build_parser() -> argparse.ArgumentParser:
    parser = common.parser("pipeline", __doc__)
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return common.run_main("pipeline", build_parser().parse_args(argv), run, report)


if __name__ == "__main__":
    sys.exit(main())
