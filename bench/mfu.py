"""Model FLOP utilisation: achieved FLOP/s of the model against this machine's dense matmul FLOP/s.

    .venv/bin/python -m bench.mfu [--image-size 64] [--batch-size 32]

FLOPs per step are counted by `tf.compat.v1.profiler` on concrete-function graphs with fixed shapes
(a multiply-add counts 2). A fine-tune training step is counted on its own graph (≈ 3× forward).
A frozen-backbone training step is forward + the head's backward only: the graph still holds the
backbone's gradient ops (its tf.Variables stay `trainable` for the tape), but nothing consumes their
outputs and they are pruned before running, so we count the full forward plus the head's training
graph minus its forward (profiled on `feature_cache.head_model`). Peak = `tf.linalg.matmul` of two
2048×2048 float32 matrices (2·n³ FLOPs), measured round-robin with the model sides in one process.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import tensorflow as tf
import tf_keras

from bench import common
from utilities.data import feature_cache
from utilities.data.schema import METADATA_SIZE, NUM_CLASSES

MATMUL_N = 2048
MATMUL_CALLS = 10  # per measured round
MODEL_STEPS = 2  # per measured round


def graph_flops(concrete: Any) -> int:
    """Float operations the profiler counts in a concrete function's graph (shapes must be static)."""
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"  # no report on stdout
    profile = tf.compat.v1.profiler.profile(graph=concrete.graph, cmd="op", options=options)
    return int(profile.total_float_ops)


def _specs(model: tf_keras.Model, batch: int) -> dict[str, tf.TensorSpec]:
    return {name: tf.TensorSpec([batch, *t.shape[1:]], tf.float32) for name, t in model.input.items()}


def forward_flops(model: tf_keras.Model, batch: int) -> int:
    return graph_flops(tf.function(lambda x: model(x, training=False)).get_concrete_function(_specs(model, batch)))


def train_flops(model: tf_keras.Model, batch: int) -> int:
    """FLOPs in the graph of one optimizer step (loss, gradients of the trainable weights, Adam)."""
    loss_fn = tf_keras.losses.CategoricalCrossentropy()
    optimizer = tf_keras.optimizers.Adam()  # a throw-away optimizer: counting never changes the model

    def step(features, labels):
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, model(features, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    labels = tf.TensorSpec([batch, NUM_CLASSES], tf.float32)
    return graph_flops(tf.function(step).get_concrete_function(_specs(model, batch), labels))


def matmul_side() -> tuple[common.Side, int]:
    a = tf.random.uniform([MATMUL_N, MATMUL_N])
    b = tf.random.uniform([MATMUL_N, MATMUL_N])
    matmul = tf.function(lambda x, y: tf.reduce_sum(tf.linalg.matmul(x, y)))  # the sum forces the result

    def side() -> int:
        for _ in range(MATMUL_CALLS):
            matmul(a, b).numpy()
        return MATMUL_CALLS

    return side, 2 * MATMUL_N**3


def forward_side(model: tf_keras.Model, features: dict[str, tf.Tensor]) -> common.Side:
    forward = tf.function(lambda x: model(x, training=False))
    batch = int(features["image"].shape[0])

    def side() -> int:
        for _ in range(MODEL_STEPS):
            forward(features).numpy()
        return MODEL_STEPS * batch

    return side


def run(args: argparse.Namespace, bench_data: common.BenchData | None = None) -> dict[str, Any]:
    """Needs no shards: the model runs on random tensors of the configured shape."""
    batch = args.batch_size
    features = {
        "image": tf.random.uniform([batch, args.image_size, args.image_size, 3], 0, 255),
        "metadata": tf.cast(tf.random.uniform([batch, METADATA_SIZE]) < 0.1, tf.float32),
    }
    labels = tf.one_hot(tf.random.uniform([batch], 0, NUM_CLASSES, tf.int32), NUM_CLASSES)
    frozen = common.job_model(args.image_size, fine_tune=False)
    fine_tune = common.job_model(args.image_size, fine_tune=True)
    head = feature_cache.head_model(frozen)
    forward = forward_flops(frozen, batch)
    flops = {  # per example
        "forward": forward / batch,
        "train_frozen": (forward + train_flops(head, batch) - forward_flops(head, batch)) / batch,
        "train_fine_tune": train_flops(fine_tune, batch) / batch,
    }
    matmul, matmul_flops = matmul_side()
    sides = {
        "matmul": matmul,
        "forward": forward_side(frozen, features),
        "train_frozen": common.train_steps(frozen, (features, labels), MODEL_STEPS),
        "train_fine_tune": common.train_steps(fine_tune, (features, labels), MODEL_STEPS),
    }
    stats = common.compare(sides, args.warmup, args.repeats)
    peak = stats["matmul"].median * matmul_flops
    rows = {
        name: {
            "gflop_per_example": round(flops[name] / 1e9, 4),
            "examples_per_s": round(stats[name].median, 2),
            "achieved_gflop_s": round(flops[name] * stats[name].median / 1e9, 2),
            "mfu": round(flops[name] * stats[name].median / peak, 4),
        }
        for name in flops
    }
    return {
        "results": common.stats_dict(stats),
        "peak_matmul_gflop_s": round(peak / 1e9, 2),
        "flop_count": "tf.compat.v1.profiler float_operation on concrete-function graphs",
        "mfu": rows,
    }


def report(result: dict[str, Any]) -> str:
    rows = [
        [name, r["gflop_per_example"], r["examples_per_s"], r["achieved_gflop_s"], f"{r['mfu']:.1%}"]
        for name, r in result["mfu"].items()
    ]
    rows.append(["matmul 2048² f32 (peak)", "", "", result["peak_matmul_gflop_s"], "100%"])
    header = ("workload", "GFLOP/example", "examples/s", "GFLOP/s", "MFU")
    return common.table(f"Model FLOP utilisation (spread: {_spreads(result)})", header, rows)


def _spreads(result: dict[str, Any]) -> str:
    return ", ".join(f"{name} {values['spread']:.0%}" for name, values in result["results"].items())


def build_parser() -> argparse.ArgumentParser:
    return common.parser("mfu", __doc__)


def main(argv: list[str] | None = None) -> int:
    return common.run_main("mfu", build_parser().parse_args(argv), run, report, needs_data=False)


if __name__ == "__main__":
    sys.exit(main())
