"""Frozen-backbone feature cache: epoch time with cached features against the uncached epoch.

    .venv/bin/python -m bench.cache [--images 640] [--image-size 64]

The job's model with a frozen DenseNet121 (`--freeze-backbone`; the job's default fine-tunes)
with augmentation off, so `--cache-features auto`
caches. Uncached epoch: `model.fit` over the shards (train + validation). Cached epoch: the head
model on cached features (`utilities.data.feature_cache`), train + validation. Both sides exclude
the first epoch (tracing); the one-off cost of building the cache (one inference pass over train
and val) is reported on its own, with the epochs after which the cache has paid for itself.
Target: cached epochs ≥ 20× faster.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

from bench import common
from utilities.data import feature_cache
from utilities.data import pipeline as data
from utilities.model import compile_model

SPEEDUP_TARGET = 20.0
MIN_CACHED_SECONDS = 0.5  # cached epochs are short: fit repeats them until this long


def run(args: argparse.Namespace, bench_data: common.BenchData) -> dict[str, Any]:
    datasets = data.build_datasets(
        bench_data.shards, image_size=args.image_size, global_batch_size=args.batch_size, seed=0, augment=False
    )
    model = common.job_model(args.image_size, fine_tune=False)
    start = time.perf_counter()
    extractor = feature_cache.feature_extractor(model)
    train_cache = feature_cache.compute_features(extractor, datasets.train)
    val = feature_cache.cache_dataset(extractor, datasets.val)
    build_seconds = time.perf_counter() - start
    head = feature_cache.head_model(model)
    compile_model(head, 1e-4)
    train = feature_cache.train_dataset(train_cache, seed=0)
    steps = datasets.steps_per_epoch["train"]
    examples = datasets.counts["train"]
    fit = dict(class_weight=datasets.class_weights, verbose=0)
    sides = {
        "uncached": common.epoch_side(
            lambda cb: model.fit(datasets.train, validation_data=datasets.val, callbacks=cb, **fit), examples
        ),
        "cached": common.at_least(
            MIN_CACHED_SECONDS,
            common.epoch_side(
                lambda cb: head.fit(train, steps_per_epoch=steps, validation_data=val, callbacks=cb, **fit), examples
            ),
        ),
    }
    stats = common.compare(sides, args.warmup, args.repeats)
    speedup = common.ratio(stats["cached"], stats["uncached"])
    uncached_epoch = examples / stats["uncached"].median
    cached_epoch = examples / stats["cached"].median
    return {
        "results": common.stats_dict(stats),
        "epoch_seconds": {"uncached": round(uncached_epoch, 3), "cached": round(cached_epoch, 4)},
        "cache_build_seconds": round(build_seconds, 2),
        "break_even_epochs": math.ceil(build_seconds / max(uncached_epoch - cached_epoch, 1e-9)),
        "ratios": {"cached_epoch_speedup": round(speedup, 2)},
        "targets": {"cached_epoch_speedup": SPEEDUP_TARGET},
        "train_examples": examples,
    }


def report(result: dict[str, Any]) -> str:
    seconds = result["epoch_seconds"]
    rows = [
        ["uncached epoch (train + val)", seconds["uncached"], f"{result['results']['uncached']['spread']:.0%}"],
        ["cached epoch (train + val)", seconds["cached"], f"{result['results']['cached']['spread']:.0%}"],
        ["cache build, once (train + val features)", result["cache_build_seconds"], ""],
    ]
    ratio = result["ratios"]["cached_epoch_speedup"]
    title = f"Feature cache: {ratio:.1f}× faster epochs (target ≥ {SPEEDUP_TARGET:.0f}×), pays off after {result['break_even_epochs']} epoch(s)"
    return common.table(title, ("", "seconds (median)", "spread"), rows)


def build_parser() -> argparse.ArgumentParser:
    return common.parser("cache", __doc__)


def main(argv: list[str] | None = None) -> int:
    return common.run_main("cache", build_parser().parse_args(argv), run, report)


if __name__ == "__main__":
    sys.exit(main())
