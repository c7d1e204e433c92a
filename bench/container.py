"""The training image, measured: size per layer, rebuild after a code-only change, start-up time.

    sudo .venv/bin/python -m bench.container            # root: starts its own dockerd (.cache/docker)
    .venv/bin/python -m bench.container --out bench/results/container.json

Uses the container tests' engine (tests/container/engine.py): installs/starts dockerd when needed,
makes the stand-in base image when `FROM` cannot be pulled, builds the image (cached layers count:
run it twice for a warm number). Then:
- layers: size of each layer of the image and the total (`docker history`, `docker image inspect`);
- rebuild: a copy of the checkout with one comment added to cli.py, built again (seconds; the
  dependency layers must come from the cache);
- start-up: `docker run` of cli.py on demo shards made inside the image (240 images, 32 px), from
  the run command to Keras' "Epoch 1/2" line (container start, TensorFlow import, data, model built)
  and to the end of the run (2 epochs, evaluation, export).
No timing assertion anywhere: numbers to read, on a shared 2-core machine they move with the load.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.container.conftest import CACHE, ROOT, copy_checkout
from tests.container.engine import Engine, EngineUnavailable, base_image_name, build, ensure_base, layers

IMAGE = "dermaid-training:bench"
DATA_SCRIPT = (
    "python -m tools.demo_data --out /bench/isic --images 240 --seed 0 >/dev/null && "
    "python -m tools.prepare --input /bench/isic --out /bench/data --image-size 32 --shard-size 40 --seed 0 >/dev/null"
)
TRAIN_ARGS = ["--weights", "none", "--image-size", "32", "-b", "16", "-f", "16", "-e", "2", "--patience", "0"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.container", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "container.json")
    return parser


def measure_layers(engine: Engine, image: str) -> dict:
    rows = layers(engine, image)
    total = int(engine.docker("image", "inspect", "--format", "{{.Size}}", image).stdout)
    shown = [{"mb": round(size / 1e6, 1), "created_by": " ".join(created.split())[:160]} for _, size, created in rows]
    return {"total_mb": round(total / 1e6, 1), "layers_newest_first": shown}


def measure_rebuild(engine: Engine) -> float:
    with tempfile.TemporaryDirectory(prefix="bench-rebuild-") as tmp:
        context = copy_checkout(Path(tmp))
        (context / "cli.py").write_text((context / "cli.py").read_text() + f"\n# code-only change {time.time()}\n")
        seconds = build(engine, context, f"{IMAGE}-rebuild", log_path=CACHE / "bench-rebuild.log")
    engine.docker("rmi", f"{IMAGE}-rebuild", check=False)
    return seconds


def measure_startup(engine: Engine, image: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        Path(tmp).chmod(0o777)  # the image's user (uid 1000) writes there
        mount = ["-v", f"{tmp}:/bench", "--network", "none"]
        engine.docker("run", "--rm", *mount, "--entrypoint", "/bin/bash", image, "-c", DATA_SCRIPT, timeout=600)
        cmd = [engine.client, "run", "--rm", *mount, "-e", "WANDB_MODE=disabled", "--entrypoint", "python", image]
        cmd += ["cli.py", "--manifest", "/bench/data/versioned_paths.pickle", "--output", "/bench/out", *TRAIN_ARGS]
        started = time.monotonic()
        first_epoch = None
        with subprocess.Popen(cmd, env=engine.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            for line in proc.stdout:
                if first_epoch is None and line.startswith("Epoch 1/"):
                    first_epoch = time.monotonic() - started
        if proc.returncode != 0:
            raise RuntimeError(f"the timed run failed with exit {proc.returncode}")
        return {
            "to_first_epoch_s": round(first_epoch, 1) if first_epoch else None,
            "whole_run_s": round(time.monotonic() - started, 1),
        }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        engine = Engine.start(ROOT)
    except EngineUnavailable as exc:
        print(f"error: bench.container: {exc}", file=sys.stderr)
        return 2
    try:
        base = ensure_base(engine, base_image_name(ROOT / "Dockerfile"), CACHE)
        build_s = build(engine, ROOT, IMAGE, log_path=CACHE / "bench-build.log")
        result = {
            "base_image": base,
            "build_s": round(build_s, 1),
            "image": measure_layers(engine, IMAGE),
            "rebuild_after_code_change_s": round(measure_rebuild(engine), 1),
            "startup": measure_startup(engine, IMAGE),
        }
    finally:
        engine.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"image {result['image']['total_mb']} MB; largest layers:")
    for row in sorted(result["image"]["layers_newest_first"], key=lambda r: -r["mb"])[:5]:
        print(f"  {row['mb']:>8.1f} MB  {row['created_by'][:100]}")
    print(
        f"build {result['build_s']} s (base: {base}); rebuild after a code-only change {result['rebuild_after_code_change_s']} s"
    )
    print(
        f"start-up: {result['startup']['to_first_epoch_s']} s to 'Epoch 1/2', whole run {result['startup']['whole_run_s']} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
