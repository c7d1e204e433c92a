"""What the user waits for: the marginal epoch of whole `cli.py` runs, uncached and cached.

    .venv/bin/python -m bench.runs [--images 640] [--image-size 64] [--epochs 1 21] [--repeats 2]   # ~12 min

`bench.cache` times an epoch's compute inside one process; a user waits for whole runs, which add
per-epoch work (validation, backups, callbacks) and, with `--cache-features on` and augmentation,
the cache's extra augmented views. Here each setting runs as `cli.py` twice — 1 and N epochs, same
data, frozen backbone, `--patience 0` — and the marginal epoch is (t_N − t_1) / (N − 1) of the
whole process's wall time, runs interleaved round-robin. "views s" is the time the N-epoch run's
log reports for computing the cached backbone features (all views, train and val).
Settings: uncached (`--cache-features off`), cached without augmentation (`auto`: one view),
cached with augmentation (`on`: min(epochs, 4) views).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "uncached": ["--cache-features", "off", "--no-augment"],
    "cached": ["--cache-features", "auto", "--no-augment"],
    "cached_augmented": ["--cache-features", "on"],
}


def _cli(
    manifest: Path, out: Path, epochs: int, setting: list[str], image_size: int, batch: int
) -> tuple[float, float]:
    """(wall seconds of one whole `cli.py` run, seconds its log gives for computing cached features)."""
    args = ["--manifest", str(manifest), "--output", str(out), "--weights", "none", "--image-size", str(image_size)]
    args += ["-b", str(batch), "-e", str(epochs), "--freeze-backbone", "--patience", "0", "--no-saved-model"]
    args += ["--no-tracking", "-n", "bench", *setting]
    env = {**os.environ, "WANDB_MODE": "disabled", "TF_CPP_MIN_LOG_LEVEL": "2"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "cli.py", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"cli.py failed: {done.stderr.strip().splitlines()[-1:]}")
    views = sum(
        float(s) for s in re.findall(r"backbone features, view \d+/\d+: \d+ batches in ([\d.]+) s", done.stderr)
    )
    return seconds, views


def run(args: argparse.Namespace, bench_data: common.BenchData) -> dict[str, Any]:
    short, long = args.epochs
    times: dict[str, dict[int, list[float]]] = {name: {short: [], long: []} for name in SETTINGS}
    views: dict[str, list[float]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory(prefix="dermaid-runs-") as tmp:
        for _ in range(args.warmup):  # the first process pays for cold file caches
            _cli(bench_data.manifest, Path(tmp), short, SETTINGS["cached"], args.image_size, args.batch_size)
        for _ in range(args.repeats):  # round-robin: load changes hit every setting alike
            for name, setting in SETTINGS.items():
                for epochs in (short, long):
                    seconds, cached = _cli(
                        bench_data.manifest, Path(tmp), epochs, setting, args.image_size, args.batch_size
                    )
                    times[name][epochs].append(seconds)
                    if epochs == long:
                        views[name].append(cached)
    marginal = {
        name: (statistics.median(t[long]) - statistics.median(t[short])) / (long - short) for name, t in times.items()
    }
    return {
        "epochs": [short, long],
        "run_seconds": {name: {str(e): [round(s, 2) for s in t[e]] for e in t} for name, t in times.items()},
        "marginal_epoch_seconds": {name: round(s, 3) for name, s in marginal.items()},
        "feature_seconds_long_run": {name: round(statistics.median(v), 2) for name, v in views.items()},
        "ratios": {
            "uncached_over_cached": round(marginal["uncached"] / marginal["cached"], 2),
            "uncached_over_cached_augmented": round(marginal["uncached"] / marginal["cached_augmented"], 2),
        },
    }


def report(result: dict[str, Any]) -> str:
    short, long = result["epochs"]
    rows = []
    for name, seconds in result["marginal_epoch_seconds"].items():
        runs = result["run_seconds"][name]
        views = result["feature_seconds_long_run"][name]
        rows.append([name, statistics.median(runs[str(short)]), statistics.median(runs[str(long)]), views, seconds])
    ratios = result["ratios"]
    title = (
        f"Whole cli.py runs: marginal epoch, uncached / cached {ratios['uncached_over_cached']}×, "
        f"uncached / cached with augmented views {ratios['uncached_over_cached_augmented']}×"
    )
    columns = ("setting", f"{short} epoch(s) s", f"{long} epochs s", "views s", "marginal epoch s")
    return common.table(title, columns, rows)


def build_parser() -> argparse.ArgumentParser:
    parser = common.parser("runs", __doc__, repeats=2, warmup=1)
    parser.add_argument("--epochs", type=int, nargs=2, default=[1, 21], metavar=("SHORT", "LONG"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.epochs[1] <= args.epochs[0] or args.epochs[0] < 1:
        print("error: bench.runs: --epochs SHORT LONG needs 1 <= SHORT < LONG", file=sys.stderr)
        return 2
    return common.run_main("runs", args, run, report)


if __name__ == "__main__":
    sys.exit(main())
