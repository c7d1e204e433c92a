"""Shared pieces of the benchmarks: demo data, side-by-side timing, tables and JSON results.

Every comparison runs its sides round-robin in one process (A, B, A, B, …): load from other
processes on a shared machine then slows both sides alike. Ratios are the median of per-round
ratios, which stay meaningful even when the absolute numbers move with the load.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras

from bench import DEMO_IMAGES, DEMO_SIZE, RESULTS_DIR
from utilities.data import pipeline as data

DEMO_SHARD = 100  # records per shard: several train shards, so interleave has work to do

# One measured unit of work: returns the examples it processed, or (examples, seconds) when it times
# itself (e.g. an epoch without fit's per-call set-up).
Side = Callable[[], int | tuple[int, float]]


@dataclass(frozen=True)
class Stats:
    """Throughput of one side over the measured repeats (examples per second)."""

    median: float
    min: float
    max: float
    spread: float  # (max - min) / median: 0.1 means the repeats varied by 10 %
    repeats: int
    samples: tuple[float, ...] = ()  # one rate per measured round, in round order

    @classmethod
    def of(cls, rates: Sequence[float]) -> Stats:
        median = statistics.median(rates)
        spread = (max(rates) - min(rates)) / median if median else 0.0
        return cls(median, min(rates), max(rates), spread, len(rates), tuple(rates))


def compare(sides: Mapping[str, Side], warmup: int, repeats: int) -> dict[str, Stats]:
    """Examples/s of each side: `warmup` unmeasured rounds, then `repeats` measured rounds, round-robin."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0; got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        for side in sides.values():
            side()
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, side in sides.items():
            start = time.perf_counter()
            result = side()
            examples, seconds = result if isinstance(result, tuple) else (result, time.perf_counter() - start)
            rates[name].append(examples / seconds)
    return {name: Stats.of(values) for name, values in rates.items()}


def ratio(a: Stats, b: Stats) -> float:
    """a / b as the median of per-round ratios: rounds are measured back to back, so a load change
    between rounds cancels out (falls back to the ratio of medians without paired samples)."""
    if a.samples and len(a.samples) == len(b.samples):
        return statistics.median(x / y for x, y in zip(a.samples, b.samples, strict=True))
    return a.median / b.median


def at_least(seconds: float, unit: Side) -> Side:
    """A side repeating `unit` until `seconds` of measured time, so a very fast unit is still timed reliably."""

    def side() -> tuple[int, float]:
        examples, measured = 0, 0.0
        while measured < seconds:
            start = time.perf_counter()
            result = unit()
            count, took = result if isinstance(result, tuple) else (result, time.perf_counter() - start)
            examples, measured = examples + count, measured + took
        return examples, measured

    return side


def count_examples(dataset: tf.data.Dataset) -> int:
    """Iterate one full pass of a batched (features, labels) dataset; the number of examples."""
    return sum(int(labels.shape[0]) for _, labels in dataset)


class EpochTimer(tf_keras.callbacks.Callback):
    """Seconds of each epoch's training (and validation, when given), without fit's set-up."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def epoch_side(fit_one_epoch: Callable[[list], Any], examples: int) -> Side:
    """A side timing one epoch by EpochTimer: `fit_one_epoch(callbacks)` runs fit for one epoch."""
    timer = EpochTimer()

    def side() -> tuple[int, float]:
        fit_one_epoch([timer])
        return examples, timer.seconds[-1]

    return side


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class BenchData:
    manifest: Path
    shards: dict[str, list[str]]  # split → local shard paths
    image_size: int
    images: int | None  # demo images generated; None for a given --manifest


def make_demo_data(root: Path, images: int, image_size: int, seed: int = 0) -> Path:
    """tools.demo_data + tools.prepare into `root`; the manifest path."""
    from tools.demo_data import write_demo
    from tools.prepare import MANIFEST_NAME, prepare

    demo = write_demo(root / "isic", images=images, seed=seed, size=image_size)
    prepare(demo, root / "data", image_size=image_size, shard_size=DEMO_SHARD, seed=seed)
    return root / "data" / MANIFEST_NAME


@contextmanager
def bench_data(args: argparse.Namespace) -> Iterator[BenchData]:
    """The shards to benchmark on: `--manifest` as given, else fresh demo data in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="dermaid-bench-") as tmp:
        manifest = Path(args.manifest) if args.manifest else make_demo_data(Path(tmp), args.images, args.image_size)
        shards = data.fetch_shards(data.load_manifest(manifest), Path(tmp) / "cache")
        yield BenchData(manifest, shards, args.image_size, None if args.manifest else args.images)


def materialize(dataset: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
    """One pass of `dataset` held in memory, re-batched identically: the 'free input pipeline' reference."""
    batches = list(dataset)
    features = {key: tf.concat([b[0][key] for b in batches], 0) for key in batches[0][0]}
    labels = tf.concat([b[1] for b in batches], 0)
    return tf.data.Dataset.from_tensor_slices((features, labels)).batch(batch_size)


def first_batch(dataset: tf.data.Dataset) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
    return next(iter(dataset))


# ---------------------------------------------------------------- command line and results


def parser(name: str, doc: str | None, repeats: int = 5, warmup: int = 1) -> argparse.ArgumentParser:
    """Flags every benchmark shares; benchmarks add their own."""
    p = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=(doc or "").split("\n\n")[0])
    p.add_argument("--images", type=int, default=DEMO_IMAGES, help="demo images to generate (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=DEMO_SIZE, help="px of shards and model (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="global batch (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=repeats, help="measured rounds (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=warmup, help="unmeasured rounds first (default: %(default)s)")
    p.add_argument("--manifest", help="benchmark these shards instead of generating demo data")
    p.add_argument("--out", type=Path, help=f"JSON result path (default: bench/results/{name}.json)")
    return p


def machine() -> dict[str, Any]:
    """What the numbers were measured on; the load average says how busy the shared machine was."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        model = names[0] if names else model
    return {
        "cpu": model,
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "gpus": len(tf.config.list_physical_devices("GPU")),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
    }


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"}


def stats_dict(results: Mapping[str, Stats]) -> dict[str, dict[str, Any]]:
    """JSON form; floats rounded to 4 significant-enough decimals."""
    return {
        name: {
            "median": round(s.median, 4),
            "min": round(s.min, 4),
            "max": round(s.max, 4),
            "spread": round(s.spread, 4),
            "repeats": s.repeats,
            "samples": [round(x, 4) for x in s.samples],
        }
        for name, s in results.items()
    }


def write_result(name: str, payload: dict[str, Any], out: Path | None = None) -> Path:
    """Atomically write `payload` (plus name, time, machine) as JSON; the path written."""
    path = Path(out) if out else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {"benchmark": name, "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), **payload}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(content, indent=2, default=_json_default) + "\n")
    tmp.replace(path)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table (also valid Markdown) for the terminal and BENCHMARKS.md."""
    cells = [[_cell(v) for v in row] for row in rows]
    lines = [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def rates_report(title: str, result: Mapping[str, Any], note: Callable[[str], str]) -> str:
    """A benchmark's sides (examples/s) under `title`, then its ratios with their targets."""
    stats = {name: Stats(**values) for name, values in result["results"].items()}
    rows = [rate_row(name, s, note(name)) for name, s in stats.items()]
    ratios = [[name, value, result["targets"].get(name, "")] for name, value in result["ratios"].items()]
    return table(title, RATE_HEADER, rows) + "\n" + table("Ratios", ("ratio", "value", "target ≥"), ratios)


def add_modes(parser: argparse.ArgumentParser, default: list[str], help_text: str) -> None:
    """`--modes frozen|fine_tune …`: which backbone settings a benchmark measures."""
    parser.add_argument("--modes", nargs="+", choices=("frozen", "fine_tune"), default=default, help=help_text)


def rate_row(name: str, stats: Stats, note: str = "") -> list[Any]:
    return [name, stats.median, stats.min, stats.max, f"{stats.spread:.0%}", note]


RATE_HEADER = ("side", "examples/s (median)", "min", "max", "spread", "note")


# ---------------------------------------------------------------- models


def job_model(image_size: int, fine_tune: bool = False, learning_rate: float = 1e-4) -> tf_keras.Model:
    """The job's model as `cli.py` builds it (random weights: no download), compiled; frozen backbone unless fine_tune."""
    from utilities.model import build_model, compile_model
    from utilities.run.config import ModelConfig

    model = build_model(ModelConfig(weights="none", fine_tune=fine_tune), image_size)
    compile_model(model, learning_rate)
    return model


def train_steps(model: tf_keras.Model, batch: tuple[dict[str, tf.Tensor], tf.Tensor], steps: int) -> Side:
    """A side running `steps` train_on_batch calls on one in-memory batch (no input pipeline at all)."""
    features, labels = batch

    def side() -> int:
        for _ in range(steps):
            model.train_on_batch(features, labels)
        return steps * int(labels.shape[0])

    return side


# ---------------------------------------------------------------- driver

Runner = Callable[[argparse.Namespace, BenchData | None], dict[str, Any]]
Reporter = Callable[[dict[str, Any]], str]


def measure(name: str, args: argparse.Namespace, bench_data: BenchData | None, run: Runner) -> dict[str, Any]:
    """Run one benchmark on given data; its JSON payload (machine, settings, results, ratios, seconds)."""
    tf_keras.backend.clear_session()  # benchmarks run one after another in bench.all
    before = machine()
    start = time.perf_counter()
    result = run(args, bench_data)
    return {
        "machine": {**before, "load_average_1m_after": round(os.getloadavg()[0], 2)},
        "settings": settings(args),
        "data": None
        if bench_data is None
        else {"manifest": str(bench_data.manifest), "demo_images": bench_data.images},
        **result,
        "seconds": round(time.perf_counter() - start, 1),
    }


def run_main(name: str, args: argparse.Namespace, run: Runner, report: Reporter, needs_data: bool = True) -> int:
    """`python -m bench.NAME`: data, measurement, table on stdout, JSON file; 2 on a bad input."""
    try:
        if needs_data:
            with bench_data(args) as bench_set:
                payload = measure(name, args, bench_set, run)
        else:
            payload = measure(name, args, None, run)
    except (ValueError, OSError) as err:  # DataError, DemoDataError, bad sizes: one line, exit 2
        print(f"error: bench.{name}: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    path = write_result(name, payload, args.out)
    print(report(payload))
    print(f"bench.{name}: {payload['seconds']} s, wrote {path}")
    return 0
