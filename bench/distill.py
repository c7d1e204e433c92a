"""Distillation: the per-replica custom loop against Keras `fit` on the same student and teacher.

    .venv/bin/python -m bench.distill [--images 640] [--image-size 64]

Both paths come from `utilities.compression` (`distillation`, `replica_loop`) and train the same
student against the job's frozen DenseNet121 teacher with the same loss (`DistillationLoss`): side
"fit" is `Distiller.fit` (what one replica runs), side "custom_loop" is `ReplicaLoop.train_step` over
the distributed dataset (what several replicas run; here the default strategy, one replica). Train
epochs only, first excluded. Target: custom_loop / fit ≥ 0.9.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import tensorflow as tf
import tf_keras

from bench import common
from utilities.data import pipeline as data

RATIO_TARGET = 0.9
TEMPERATURE, ALPHA = 4.0, 0.1  # the job's defaults (CompressionConfig)
STUDENT_FILTERS = 32


def _loop_side(loop: Any, train: tf.data.Dataset, strategy: tf.distribute.Strategy) -> common.Side:
    replicas = strategy.num_replicas_in_sync
    # As ReplicaLoop.fit: a tail batch smaller than the replica count is skipped.
    distributed = strategy.experimental_distribute_dataset(
        train.filter(lambda features, labels: tf.shape(labels)[0] >= replicas)
    )

    def side() -> tuple[int, float]:
        batches = iter(distributed)  # outside the timing, as fit creates its iterator before the epoch starts
        start, examples = time.perf_counter(), 0
        for batch in batches:
            loop.train_step(batch)
            examples += sum(int(labels.shape[0]) for labels in strategy.experimental_local_results(batch[1]))
        return examples, time.perf_counter() - start

    return side


def run(args: argparse.Namespace, bench_data: common.BenchData) -> dict[str, Any]:
    from utilities.compression.distillation import Distiller, build_student
    from utilities.compression.losses import DistillationLoss, class_weight_vector
    from utilities.compression.replica_loop import ReplicaLoop

    datasets = data.build_datasets(
        bench_data.shards, image_size=args.image_size, global_batch_size=args.batch_size, seed=0, augment=True
    )
    strategy = tf.distribute.get_strategy()
    teacher = common.job_model(args.image_size, fine_tune=False)
    student = build_student(args.image_size, STUDENT_FILTERS)
    loss_fn = DistillationLoss(TEMPERATURE, ALPHA, class_weight_vector(datasets.class_weights))
    distiller = Distiller(student, teacher, loss_fn)
    distiller.compile(optimizer=tf_keras.optimizers.Adam(1e-3))
    loop = ReplicaLoop(student, teacher, loss_fn, strategy, 1e-3)
    examples = datasets.counts["train"]
    sides = {
        "fit": common.epoch_side(lambda cb: distiller.fit(datasets.train, callbacks=cb, verbose=0), examples),
        "custom_loop": _loop_side(loop, datasets.train, strategy),
    }
    stats = common.compare(sides, args.warmup, args.repeats)
    return {
        "results": common.stats_dict(stats),
        "ratios": {"custom_loop_vs_fit": round(common.ratio(stats["custom_loop"], stats["fit"]), 3)},
        "targets": {"custom_loop_vs_fit": RATIO_TARGET},
        "train_examples": examples,
        "replicas": strategy.num_replicas_in_sync,
    }


def report(result: dict[str, Any]) -> str:
    stats = {name: common.Stats(**values) for name, values in result["results"].items()}
    notes = {"fit": "Distiller.fit", "custom_loop": "ReplicaLoop.train_step"}
    rows = [common.rate_row(name, s, notes[name]) for name, s in stats.items()]
    ratio = result["ratios"]["custom_loop_vs_fit"]
    return common.table(
        f"Distillation: custom loop / fit = {ratio:.2f} (target ≥ {RATIO_TARGET})", common.RATE_HEADER, rows
    )


def build_parser() -> argparse.ArgumentParser:
    return common.parser("distill", __doc__, repeats=5)


def main(argv: list[str] | None = None) -> int:
    return common.run_main("distill", build_parser().parse_args(argv), run, report)


if __name__ == "__main__":
    sys.exit(main())
