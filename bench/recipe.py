"""The training recipe measured: the old one (constant rate, no smoothing, no colour or metadata dropout, BatchNorm
momentum by hand) against the new defaults, as whole `cli.py` runs, with a logistic regression as the floor.

    .venv/bin/python -m bench.recipe                       # 3 seeds × 2 recipes × 2 tasks: ~30 min on 2 cores
    .venv/bin/python -m bench.recipe --tasks demo --seeds 1

Tasks, each in the ISIC 2019 layout and put through `tools.prepare` like real data:
- `demo`: `make demo`'s data (tools.demo_data, 640 images at 64 px) and its flags (`-e 10 -l 1e-3 -f 64`);
- `digits`: scikit-learn's bundled handwritten digits 0–7 (1,437 real 8×8 scans: one class per digit),
  upscaled to 64 px RGB JPEGs, no metadata; `-e 12 -l 1e-3`, DenseNet121 from scratch (`--weights none`).
Per run: the exported model's test and val balanced accuracy (metrics.json), the in-fit validation balanced
accuracy of the epoch whose weights were exported (history.csv: the best epoch with early stopping) and its
gap to the exported model's, and the largest epoch-to-epoch fall of train accuracy. The floor: a logistic
regression on 16×16 grey pixels of the same split (the train records, scored on the test records).
Runs are interleaved (seed, then recipe) so that load drifts hit both recipes alike.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench import common

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
TASKS = {
    "demo": ["-b", "32", "-e", "10", "-l", "1e-3", "-f", "64"],
    "digits": ["-b", "32", "-e", "12", "-l", "1e-3"],
}
OLD = ["--lr-schedule", "constant", "--label-smoothing", "0", "--colour-jitter", "0", "--metadata-dropout", "0"]
# The old BatchNorm momentum: make demo's 0.9 on the demo, the old default 0.99 elsewhere.
OLD_MOMENTUM = {"demo": "0.9", "digits": "0.99"}
RECIPES = ("old", "new")
DIGITS = 8  # digits 0..7 stand for the 8 classes


def digits_folder(out: Path) -> Path:
    """scikit-learn's digits 0–7 written as an ISIC 2019 folder: JPEGs, ground truth, empty metadata."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from tools.demo_data import _csv_text
    from utilities.data.schema import (
        CLASS_NAMES,
        GROUND_TRUTH_COLUMNS,
        GROUND_TRUTH_CSV,
        IMAGE_DIR,
        METADATA_COLUMNS,
        METADATA_CSV,
    )

    digits = load_digits()
    keep = digits.target < DIGITS
    images, labels = digits.images[keep], digits.target[keep]
    (out / IMAGE_DIR).mkdir(parents=True)
    truth, meta = [], []
    for i, (pixels, label) in enumerate(zip(images, labels, strict=True)):
        name = f"ISIC_{i:07d}"
        grey = Image.fromarray(np.uint8(np.round(pixels * 255 / 16))).resize((SIZE, SIZE), Image.BILINEAR)
        grey.convert("RGB").save(out / IMAGE_DIR / f"{name}.jpg", quality=95)
        truth.append([name] + ["1.0" if c == CLASS_NAMES[label] else "0.0" for c in (*CLASS_NAMES, "UNK")])
        meta.append([name, "", "", "", ""])  # no metadata, no lesion id: each image its own lesion
    (out / GROUND_TRUTH_CSV).write_text(_csv_text(GROUND_TRUTH_COLUMNS, truth), encoding="utf-8")
    (out / METADATA_CSV).write_text(_csv_text(METADATA_COLUMNS, meta), encoding="utf-8")
    return out


def task_manifest(task: str, root: Path) -> Path:
    from tools.demo_data import write_demo
    from tools.prepare import MANIFEST_NAME, prepare

    source = (
        write_demo(root / "isic", images=640, seed=0, size=SIZE) if task == "demo" else digits_folder(root / "isic")
    )
    prepare(source, root / "data", image_size=SIZE, shard_size=200, seed=0)
    return root / "data" / MANIFEST_NAME


def split_arrays(manifest: Path, cache: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(images 16×16 grey flattened, labels) per split, read from the records as the job reads them."""
    import tensorflow as tf

    from utilities.data import pipeline as data

    shards = data.fetch_shards(data.load_manifest(manifest), cache)
    built = data.build_datasets(shards, image_size=SIZE, global_batch_size=256, seed=0, augment=False)
    arrays = {}
    for split, dataset in (("train", built.train_clean), ("test", built.test)):
        xs, ys = [], []
        for features, labels in dataset:
            grey = tf.image.resize(tf.reduce_mean(features["image"], axis=3, keepdims=True), (16, 16), antialias=True)
            xs.append(grey.numpy().reshape(len(grey), -1) / 255.0)
            ys.append(np.argmax(labels.numpy(), axis=1))
        arrays[split] = (np.concatenate(xs), np.concatenate(ys))
    return arrays


def logistic_floor(manifest: Path, cache: Path) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score

    arrays = split_arrays(manifest, cache)
    fitted = LogisticRegression(max_iter=3000, class_weight="balanced").fit(*arrays["train"])
    return float(balanced_accuracy_score(arrays["test"][1], fitted.predict(arrays["test"][0])))


def _history(path: Path) -> dict[str, list[float]]:
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return {key: [float(r[key]) for r in rows] for key in rows[0]} if rows else {}


def one_run(task: str, recipe: str, seed: int, manifest: Path, out: Path) -> dict[str, Any]:
    """One whole cli.py run; what it scored and how its training went."""
    name = f"{task}_{recipe}_{seed}"
    args = ["--manifest", str(manifest), "--output", str(out), "-n", name, "--run-id", "r"]
    args += ["--weights", "none", "--image-size", str(SIZE), "--seed", str(seed), *TASKS[task]]
    args += ["--no-tracking", "--no-saved-model", "--bootstrap", "200"]
    if recipe == "old":
        args += [*OLD, "--bn-momentum", OLD_MOMENTUM[task]]
    env = {**os.environ, "WANDB_MODE": "disabled", "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run([sys.executable, "cli.py", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode not in (0, 3):  # 3: complete, its release gate failed (an earlier seed was better)
        raise RuntimeError(f"cli.py {name} failed: {done.stderr.strip().splitlines()[-1:]}")
    run = out / name / "r"
    model = json.loads((run / "metrics.json").read_text())["variants"]["model"]
    history = _history(run / "history.csv")
    val_in_fit = history["val_balanced_accuracy"]
    # EarlyStopping (--patience 3) restores the best epoch's weights at the end, stopped early or not: the first of ties
    exported_epoch = max(range(len(val_in_fit)), key=lambda i: (val_in_fit[i], -i))
    train = history["accuracy"]
    return {
        "test": model["test"]["balanced_accuracy"],
        "val": model["val"]["balanced_accuracy"],
        "val_in_fit": val_in_fit[exported_epoch],
        "in_fit_gap": abs(val_in_fit[exported_epoch] - model["val"]["balanced_accuracy"]),
        "worst_train_fall": max([0.0] + [a - b for a, b in itertools.pairwise(train)]),
        "epochs_run": len(train),
        "val_curve": [round(v, 3) for v in val_in_fit],
        "train_accuracy_curve": [round(v, 3) for v in train],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"tasks": {}}
    with tempfile.TemporaryDirectory(prefix="dermaid-recipe-") as tmp:
        for task in args.tasks:
            root = Path(tmp) / task
            manifest = task_manifest(task, root)
            runs: dict[str, list[dict[str, Any]]] = {recipe: [] for recipe in RECIPES}
            for seed in range(args.seeds):
                for recipe in RECIPES:
                    runs[recipe].append(one_run(task, recipe, seed, manifest, root / "outputs"))
                    print(f"{task} {recipe} seed {seed}: {runs[recipe][-1]}", file=sys.stderr, flush=True)
            result["tasks"][task] = {"logistic_regression_test": logistic_floor(manifest, root / "cache"), "runs": runs}
    return result


def _spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.3f} ± {(max(values) - min(values)) / 2:.3f}" if len(values) > 1 else f"{mean:.3f}"


def report(result: dict[str, Any]) -> str:
    rows = []
    for task, measured in result["tasks"].items():
        for recipe, runs in measured["runs"].items():
            rows.append(
                [
                    task,
                    recipe,
                    _spread([r["test"] for r in runs]),
                    min(r["test"] for r in runs),
                    _spread([r["val"] for r in runs]),
                    max(r["in_fit_gap"] for r in runs),
                    max(r["worst_train_fall"] for r in runs),
                ]
            )
        rows.append([task, "logistic regression", measured["logistic_regression_test"], "", "", "", ""])
    columns = (
        "task",
        "recipe",
        "test bal. acc (mean ± half range)",
        "worst seed",
        "val bal. acc",
        "max |in-fit val − exported val|",
        "max train-acc fall",
    )
    return common.table("Training recipe: old vs new defaults, whole cli.py runs", columns, rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.recipe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=tuple(TASKS), default=list(TASKS))
    parser.add_argument("--seeds", type=int, default=3, help="seeds per recipe and task (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: bench/results/recipe.json)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    result["settings"] = {"tasks": args.tasks, "seeds": args.seeds, "flags": TASKS, "old": OLD}
    result["machine"] = common.machine()
    print(report(result))
    print(f"wrote {common.write_result('recipe', result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
