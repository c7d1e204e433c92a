"""Every benchmark, one after another on one demo dataset: tables on stdout, JSON per benchmark.

    .venv/bin/python -m bench.all                    # 603 s on 2 shared CPU cores (bench/results/all.json) (`make bench`)
    .venv/bin/python -m bench.all --full             # + pruned model and every TFLite type (the full compression set: 302 s in compression_full.json)
    .venv/bin/python -m bench.all --with-scale       # + bench.scale: ISIC-sized JPEGs at 256 px (~+15 min here)

Writes `bench/results/{pipeline,training,cache,mfu,distill,compression}.json` and `all.json`
(each ratio against its target). A benchmark that fails is recorded as an error; the others run.
Exit code 1 when one failed, 0 otherwise (a missed target is reported, not an error).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import DEMO_IMAGES, DEMO_SIZE, RESULTS_DIR
from utilities.errors import OneLineParser

if TYPE_CHECKING:  # bench.common loads TensorFlow: --help does not
    from bench import common

BENCHMARKS = ("pipeline", "training", "cache", "mfu", "distill", "compression")
# Settings that keep the whole run near 10 minutes here; --full drops them. Converting DenseNet121
# to TFLite takes minutes per type on this machine (the full set: 302 s, compression_full.json).
QUICK = {
    "mfu": ["--repeats", "3"],  # FLOP counting of the DenseNet121 graphs alone takes ~1 min
    "compression": ["--modes", "dynamic", "--student-modes", "float32", "int8", "--no-pruned", "--repeats", "3"],
}
log = logging.getLogger("bench.all")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m bench.all", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=DEMO_IMAGES, help="demo images (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=DEMO_SIZE, help="px (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="global batch (default: %(default)s)")
    parser.add_argument("--manifest", help="benchmark these shards instead of generating demo data")
    parser.add_argument(
        "--results", type=Path, default=RESULTS_DIR, help="folder for the JSON files (default: bench/results)"
    )
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS), help="a subset")
    parser.add_argument("--full", action="store_true", help="the benchmarks' own (longer) defaults")
    parser.add_argument("--with-scale", action="store_true", help="also bench.scale (own data, 256 px; ~15 min here)")
    return parser


def run_one(name: str, argv: list[str], shared: common.BenchData, results: Path) -> dict[str, Any]:
    from bench import common

    module = importlib.import_module(f"bench.{name}")
    args = module.build_parser().parse_args(argv)
    payload = common.measure(name, args, shared, module.run)
    common.write_result(name, payload, results / f"{name}.json")
    print(module.report(payload), flush=True)
    return payload


def checks(payloads: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every ratio that has a target: value, target, met."""
    rows = []
    for name, payload in payloads.items():
        for key, target in payload.get("targets", {}).items():
            value = payload["ratios"][key]
            rows.append({"benchmark": name, "ratio": key, "value": value, "target": target, "met": value >= target})
    return rows


def run_all(args: argparse.Namespace, shared: common.BenchData) -> tuple[dict[str, dict], dict[str, str]]:
    """Payload per benchmark that ran, one-line error per benchmark that failed."""
    common_argv = ["--images", str(args.images), "--image-size", str(args.image_size)]
    common_argv += ["--batch-size", str(args.batch_size), "--manifest", str(shared.manifest)]
    payloads: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    for name in args.only:
        extra = [] if args.full else QUICK.get(name, [])
        try:
            payloads[name] = run_one(name, [*common_argv, *extra], shared, args.results)
        except Exception as err:  # one broken benchmark must not hide the others' numbers
            errors[name] = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
            log.error("bench.%s failed: %s", name, errors[name])
    if args.with_scale:  # its own ISIC-sized data and settings: not the shared demo set
        from bench import scale

        if scale.main(["--out", str(args.results / "scale.json")]) != 0:
            errors["scale"] = "bench.scale failed (its error is above)"
    return payloads, errors


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from bench import common  # TensorFlow

    start = time.perf_counter()
    try:
        with common.bench_data(args) as shared:
            payloads, errors = run_all(args, shared)
    except (ValueError, OSError) as err:  # bad sizes or manifest: one line, exit 2
        print(f"error: bench.all: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    summary = {"checks": checks(payloads), "errors": errors, "seconds": round(time.perf_counter() - start, 1)}
    path = common.write_result("all", {"machine": common.machine(), **summary}, args.results / "all.json")
    rows = [
        [c["benchmark"], c["ratio"], c["value"], c["target"], "yes" if c["met"] else "NO"] for c in summary["checks"]
    ]
    rows += [[name, "error", message, "", ""] for name, message in errors.items()]
    print(common.table("Targets", ("benchmark", "ratio", "value", "target ≥", "met"), rows))
    print(f"bench.all: {summary['seconds']} s, wrote {path} and one JSON per benchmark")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
