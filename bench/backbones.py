"""The backbones side by side: each `--backbone` trained by whole `cli.py` runs on bench.recipe's tasks with
the default recipe, then quantized to int8 — what a team choosing one trades (accuracy, time, size, latency).

    .venv/bin/python -m bench.backbones                    # 8 backbones × 2 tasks, 1 seed: ~1 h on 2 cores
    .venv/bin/python -m bench.backbones --backbones mobilenetv3small densenet121 --tasks demo

Tasks and flags are bench.recipe's (`demo`: make demo's data, `-e 10 -l 1e-3 -f 64`; `digits`: scikit-learn's
real handwritten digits, `-e 12 -l 1e-3`), 64 px, `--weights none` (no ImageNet weights can be downloaded
here: every network learns from scratch, which favours none of them), the default fine-tune and recipe, `-q int8`.
Per run: test balanced accuracy of the exported model and of its int8 TFLite file, their argmax agreement on
test, the model's parameters, the .keras and .tflite sizes, the median batch-1 CPU latency of each (the job's
own measurement, metrics.json), and the run's wall time (training, evaluation, conversion). Runs go round-robin
(task, then backbone) so that load drifts spread over all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common
from bench.recipe import SIZE, TASKS, task_manifest

ROOT = Path(__file__).resolve().parents[1]


def parameters(name: str) -> int:
    """The whole model's parameters with backbone `name` (the metadata branch at demo's `-f 64`)."""
    from utilities.model import build_model
    from utilities.run.config import ModelConfig

    return build_model(ModelConfig(backbone=name, weights="none", fcnn_nodes=64), SIZE).count_params()


def one_run(task: str, name: str, seed: int, manifest: Path, out: Path) -> dict[str, Any]:
    """One whole cli.py run with backbone `name`; what it scored, weighed and took."""
    run_name = f"{task}_{name}_{seed}"
    args = ["--manifest", str(manifest), "--output", str(out), "-n", run_name, "--run-id", "r"]
    args += ["--backbone", name, "--weights", "none", "--image-size", str(SIZE), "--seed", str(seed), *TASKS[task]]
    args += ["--no-tracking", "--no-saved-model", "--bootstrap", "200", "-q", "int8"]
    env = {**os.environ, "WANDB_MODE": "disabled", "TF_CPP_MIN_LOG_LEVEL": "2"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "cli.py", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 3):  # 3: complete, its release gate failed
        raise RuntimeError(f"cli.py {run_name} failed: {done.stderr.strip().splitlines()[-1:]}")
    variants = json.loads((out / run_name / "r" / "metrics.json").read_text())["variants"]
    model, lite = variants["model"], variants["model_int8"]
    return {
        "test": model["test"]["balanced_accuracy"],
        "val": model["val"]["balanced_accuracy"],
        "int8_test": lite["test"]["balanced_accuracy"],
        "int8_agreement": lite["agreement"],
        "keras_bytes": model["size_bytes"],
        "int8_bytes": lite["size_bytes"],
        "latency_ms": model["latency_ms"]["median"],
        "int8_latency_ms": lite["latency_ms"]["median"],
        "run_seconds": seconds,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"parameters": {name: parameters(name) for name in args.backbones}, "tasks": {}}
    with tempfile.TemporaryDirectory(prefix="dermaid-backbones-") as tmp:
        manifests = {task: task_manifest(task, Path(tmp) / task) for task in args.tasks}
        for task in args.tasks:
            result["tasks"][task] = {name: [] for name in args.backbones}
        for seed in range(args.seeds):
            for task in args.tasks:
                for name in args.backbones:
                    measured = one_run(task, name, seed, manifests[task], Path(tmp) / task / "outputs")
                    result["tasks"][task][name].append(measured)
                    print(f"{task} {name} seed {seed}: {measured}", file=sys.stderr, flush=True)
    return result


def _mean(runs: list[dict[str, Any]], key: str) -> float:
    return sum(r[key] for r in runs) / len(runs)


def report(result: dict[str, Any]) -> str:
    rows = []
    for task, by_backbone in result["tasks"].items():
        for name, runs in by_backbone.items():
            rows.append(
                [
                    task,
                    name,
                    round(result["parameters"][name] / 1e6, 2),
                    round(_mean(runs, "test"), 3),
                    round(_mean(runs, "int8_test"), 3),
                    round(_mean(runs, "int8_agreement"), 3),
                    round(_mean(runs, "keras_bytes") / 2**20, 1),
                    round(_mean(runs, "int8_bytes") / 2**20, 2),
                    round(_mean(runs, "latency_ms"), 1),
                    round(_mean(runs, "int8_latency_ms"), 2),
                    round(_mean(runs, "run_seconds")),
                ]
            )
    columns = (
        "task",
        "backbone",
        "params (M)",
        "test bal. acc",
        "int8 test bal. acc",
        "int8 agreement",
        ".keras MB",
        "int8 MB",
        "latency ms",
        "int8 latency ms",
        "run s",
    )
    return common.table("Backbones: whole cli.py runs from scratch, default recipe, 64 px, then int8", columns, rows)


def build_parser() -> argparse.ArgumentParser:
    from utilities.run.config import BACKBONES

    parser = argparse.ArgumentParser(prog="python -m bench.backbones", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="+", choices=BACKBONES, default=list(BACKBONES))
    parser.add_argument("--tasks", nargs="+", choices=tuple(TASKS), default=list(TASKS))
    parser.add_argument("--seeds", type=int, default=1, help="seeds per backbone and task (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: bench/results/backbones.json)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    result["settings"] = {"backbones": args.backbones, "tasks": args.tasks, "seeds": args.seeds, "flags": TASKS}
    result["machine"] = common.machine()
    print(report(result))
    print(f"wrote {common.write_result('backbones', result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
