"""Real scale: ISIC-sized JPEGs in, 256 px out; per-image cost and peak memory of every phase against N.

    .venv/bin/python -m bench.scale                     # N = 1000, 2000, 4000 at 256 px (895 s = 15 min measured on an idle machine: BENCHMARKS.md)
    .venv/bin/python -m bench.scale --counts 120 --scale 0.04 --image-size 32 --train-steps 1   # ~1.5 min (tests)

One demo folder of max(--counts) ISIC-sized JPEGs (`tools.demo_data --sizes isic`, seeded; ~2-3 min for
4,000 on 2 cores); each N prepares `--limit N` of it. Phases per N, each in its own spawned process so
that its peak RSS (VmHWM from /proc/self/status, reset between the two halves of the cache phase) is
measured, not estimated. On all N images: prepare (JPEG → shards) and the label pass
(`utilities.data.records.count_labels` over every shard). On a fixed sample, because their cost per image
is the model's and does not depend on N: feature-cache build (frozen DenseNet121 over `--cache-images`
train images, after one unmeasured batch), one cached epoch (head only) over N's train count of
cached rows (the sample's features tiled: the head's cost does not depend on their values), fine-tune
(`--train-steps` batches after one unmeasured batch, augmentation on, random weights). Cache build and
fine-tune still read through N's own train pipeline (all N's shards in the file list and interleave, the
shuffle buffer filled from them) and the cached epoch holds N's whole cache, so whatever grows with N
stays in their time and peak RSS. Per-image cost and peak RSS should be flat in N (within ±15 % of their median over N). The decode
table compares prepare's reduced-size JPEG decode (`utilities.data.isic.load_image`) with a full decode
+ area resize on a few images of each size: images/s on one thread, mean absolute difference and PSNR.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

FLAT_TOLERANCE = 0.15  # per-image cost and peak RSS within ±15 % of their median over N
MB = 1 << 20


# ---------------------------------------------------------------- measured from the process itself


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def peak_rss_mb() -> float:
    """This process's peak resident set size since start (or since `reset_peak_rss`), MB."""
    return round(_status_kb("VmHWM") / 1024, 1)


def reset_peak_rss() -> None:
    """Start a new peak (Linux: writing 5 to clear_refs resets VmHWM to the current RSS)."""
    Path("/proc/self/clear_refs").write_text("5")


def _child(conn, phase: str, kwargs: dict[str, Any]) -> None:
    try:
        result = PHASES[phase](**kwargs)
        conn.send({**result, "peak_rss_mb": result.get("peak_rss_mb", peak_rss_mb())})
    except BaseException as err:  # the parent reports it as one line
        conn.send({"error": f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"})
    finally:
        conn.close()


def run_phase(phase: str, **kwargs: Any) -> dict[str, Any]:
    """Run PHASES[phase](**kwargs) in a fresh spawned process: its own peak RSS, no memory from earlier phases."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(send, phase, kwargs))
    process.start()
    send.close()
    try:
        result = receive.recv()
    except EOFError:
        result = {"error": "the phase's process died without a result"}
    process.join()
    if "error" in result:
        raise RuntimeError(f"phase {phase}: {result['error']}")
    print(
        f"bench.scale: {phase} {_brief(kwargs)}: peak RSS {result['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True
    )
    return result


def _brief(kwargs: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in kwargs.items() if k in ("limit", "manifest"))


# ---------------------------------------------------------------- phases (each runs in its own process)


def phase_prepare(demo: str, out: str, image_size: int, limit: int, seed: int, workers: int | None) -> dict[str, Any]:
    import tensorflow  # noqa: F401  (before the clock: the import is not prepare's cost)

    from tools import prepare

    todo = prepare.plan(demo, out, image_size=image_size, shard_size=500, seed=seed, limit=limit)
    start = time.perf_counter()
    manifest = prepare.execute(todo, workers)
    seconds = time.perf_counter() - start
    shards = [Path(p) for split in ("train", "val", "test") for p in manifest[split]]
    return {
        "seconds": seconds,
        "images": manifest["source"]["image_count"],
        "shard_bytes": sum(p.stat().st_size for p in shards),
    }


def _shards(manifest: str) -> dict[str, list[str]]:
    from utilities.data import pipeline as data

    return data.fetch_shards(data.load_manifest(manifest), Path(manifest).parent / "cache")


def phase_labels(manifest: str) -> dict[str, Any]:
    from utilities.data.records import count_labels

    shards = _shards(manifest)
    start = time.perf_counter()
    counts = {split: int(count_labels(paths).sum()) for split, paths in shards.items()}
    return {"seconds": time.perf_counter() - start, "images": sum(counts.values())}


def _epoch_seconds(fit_epochs) -> float:
    from bench.common import EpochTimer

    timer = EpochTimer()
    fit_epochs([timer])
    return timer.seconds[-1]


def _timed_features(extractor, dataset, batches: int) -> tuple[list[tuple[np.ndarray, ...]], float, float]:
    """The extraction loop of `feature_cache.compute_features` over 1 + `batches` batches of `dataset`:
    (features, metadata, labels) of the measured batches, seconds of the first (unmeasured: shuffle-buffer
    fill and tracing) batch and seconds of the rest."""
    import tensorflow as tf

    spec = tf.TensorSpec([None, *extractor.input["image"].shape[1:]], tf.float32)  # as compute_features
    extract = tf.function(lambda image: extractor({"image": image}, training=False), input_signature=[spec])
    rows, ends = [], [time.perf_counter()]
    for features, labels in dataset.take(1 + batches):
        pooled = extract(features["image"]).numpy().astype(np.float32)
        rows.append((pooled, features["metadata"].numpy(), labels.numpy()))
        ends.append(time.perf_counter())
    return rows[1:], ends[1] - ends[0], ends[-1] - ends[1]


def phase_cache(
    manifest: str, image_size: int, batch_size: int, shuffle_buffer: tuple[int, float], cache_images: int
) -> dict[str, Any]:
    """Feature-cache build rate on `cache_images` train images drawn through the full-N train pipeline,
    then a cached epoch (head only; the second of two) over a cache as long as N's train split."""
    import tensorflow as tf

    from bench.common import job_model
    from utilities.data import feature_cache
    from utilities.data import pipeline as data
    from utilities.model import compile_model

    datasets = data.build_datasets(_shards(manifest), image_size, batch_size, 0, False, *shuffle_buffer)
    train_count, steps = datasets.counts["train"], datasets.steps_per_epoch["train"]
    if steps < 2:
        raise ValueError("the cache phase needs at least 2 train batches; use a larger N or a smaller --batch-size")
    model = job_model(image_size, fine_tune=False)
    extractor = feature_cache.feature_extractor(model)
    batches = max(1, min(math.ceil(cache_images / batch_size), steps - 1))
    rows, first_seconds, build_seconds = _timed_features(extractor, datasets.train, batches)
    build_peak = peak_rss_mb()
    reset_peak_rss()
    # The head's cost per row does not depend on the values: tile the sample to N's train count.
    columns = [np.resize(np.concatenate(c), (train_count, *c[0].shape[1:]))[None] for c in zip(*rows, strict=True)]
    cache = feature_cache.FeatureCache(*(tf.constant(c, tf.float32) for c in columns), batch_size=batch_size)
    head = feature_cache.head_model(model)
    compile_model(head, 1e-4)
    stream = feature_cache.train_dataset(cache, seed=0)
    fit = lambda cb: head.fit(stream, steps_per_epoch=steps, epochs=2, callbacks=cb, verbose=0)  # noqa: E731
    epoch_seconds = _epoch_seconds(fit)
    return {
        "build_seconds": build_seconds,
        "build_images": sum(len(r[2]) for r in rows),
        "first_batch_seconds": first_seconds,
        "build_peak_rss_mb": build_peak,
        "cache_mb": round(sum(c.nbytes for c in columns) / MB, 2),
        "epoch_seconds": epoch_seconds,
        "epoch_images": train_count,
        "peak_rss_mb": peak_rss_mb(),
    }


def phase_fine_tune(
    manifest: str, image_size: int, batch_size: int, steps: int, shuffle_buffer: tuple[int, float]
) -> dict[str, Any]:
    """`steps` fine-tuning batches (the job's augmenting pipeline) after one unmeasured (tracing) batch."""
    import tf_keras

    from bench.common import job_model
    from utilities.data import pipeline as data

    datasets = data.build_datasets(_shards(manifest), image_size, batch_size, 0, True, *shuffle_buffer)
    model = job_model(image_size, fine_tune=True)
    ends: list[float] = []
    timer = tf_keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: ends.append(time.perf_counter()))
    if datasets.steps_per_epoch["train"] < 2:
        raise ValueError("fine-tune needs at least 2 train batches; use a larger N or a smaller --batch-size")
    steps = min(steps, datasets.steps_per_epoch["train"] - 1)
    model.fit(datasets.train.take(steps + 1), class_weight=datasets.class_weights, callbacks=[timer], verbose=0)
    return {"seconds": ends[-1] - ends[0], "images": steps * batch_size, "steps": steps}


PHASES = {"prepare": phase_prepare, "labels": phase_labels, "cache": phase_cache, "fine_tune": phase_fine_tune}


# ---------------------------------------------------------------- decode speed and quality


def full_decode(path: Path, size: int) -> np.ndarray:
    """The reference: the whole JPEG decoded, then an area (box) resize to size×size; uint8 [size, size, 3]."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BOX), dtype=np.uint8)


def fast_decode(path: Path, size: int) -> np.ndarray:
    """What prepare stores: `utilities.data.isic.load_image` (reduced-size DCT decode + anti-aliased resize)."""
    from utilities.data.isic import load_image

    return np.frombuffer(load_image(path, size), np.uint8).reshape(size, size, 3)


def mad_psnr(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean absolute difference (pixel levels) and PSNR (dB, peak 255) of two uint8 images."""
    diff = a.astype(np.float64) - b.astype(np.float64)
    mse = float(np.mean(diff**2))
    return float(np.mean(np.abs(diff))), (math.inf if mse == 0 else 10 * math.log10(255**2 / mse))


def _rate(decode, paths: list[Path], size: int) -> float:
    start = time.perf_counter()
    for path in paths:
        decode(path, size)
    return len(paths) / (time.perf_counter() - start)


def decode_quality(folder: Path, size: int, per_size: int) -> dict[str, dict[str, float]]:
    """Per source size (w×h): single-thread images/s of fast and full decode, their ratio, mean MAD and PSNR."""
    by_size: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(folder.glob("*.jpg")):
        with Image.open(path) as image:
            key = f"{image.width}x{image.height}"
        if len(by_size[key]) < per_size:
            by_size[key].append(path)
    result = {}
    for key, paths in sorted(by_size.items(), key=lambda kv: math.prod(map(int, kv[0].split("x")))):
        pairs = [mad_psnr(fast_decode(p, size), full_decode(p, size)) for p in paths]
        fast, full = _rate(fast_decode, paths, size), _rate(full_decode, paths, size)
        result[key] = {
            "images": len(paths),
            "fast_images_per_s": round(fast, 1),
            "full_images_per_s": round(full, 1),
            "speedup": round(fast / full, 2),
            "mad": round(statistics.mean(m for m, _ in pairs), 3),
            "psnr_db": round(statistics.mean(min(p, 99.0) for _, p in pairs), 2),  # 99 = identical
        }
    return result


# ---------------------------------------------------------------- driver


def measure_n(demo: Path, root: Path, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Every phase at N = n, each in its own process; seconds, images and peak RSS per phase."""
    out = root / f"data_{n}"
    prep = run_phase(
        "prepare",
        demo=str(demo),
        out=str(out),
        image_size=args.image_size,
        limit=n,
        seed=args.seed,
        workers=args.workers,
    )
    manifest = str(out / "versioned_paths.pickle")
    labels = run_phase("labels", manifest=manifest)
    model = dict(manifest=manifest, image_size=args.image_size, batch_size=args.batch_size)
    shuffle = (args.shuffle_buffer, args.shuffle_memory)  # records, MB: the job's bounds
    cache = run_phase("cache", **model, shuffle_buffer=shuffle, cache_images=args.cache_images)
    tune = run_phase("fine_tune", **model, steps=args.train_steps, shuffle_buffer=shuffle)
    return {
        "images": prep["images"],
        "prepare": {**prep, "images_per_s": prep["images"] / prep["seconds"]},
        "labels": labels,
        "cache_build": {
            "seconds": cache["build_seconds"],
            "images": cache["build_images"],
            "images_per_s": cache["build_images"] / cache["build_seconds"],
            "first_batch_seconds": cache["first_batch_seconds"],
            "cache_mb": cache["cache_mb"],
            "peak_rss_mb": cache["build_peak_rss_mb"],
        },
        "cached_epoch": {
            "seconds": cache["epoch_seconds"],
            "images": cache["epoch_images"],
            "peak_rss_mb": cache["peak_rss_mb"],
        },
        "fine_tune": {**tune, "images_per_s": tune["images"] / tune["seconds"]},
    }


PHASE_NAMES = ("prepare", "labels", "cache_build", "cached_epoch", "fine_tune")
# What each phase's seconds and images cover (also in the JSON as "measured_on"). Peak RSS is always that of a
# process holding N's whole file list, shuffle buffer and interleave, so memory is measured against N in every phase.
MEASURED_ON = {
    "prepare": "all N images (JPEG decode, resize, shards written)",
    "labels": "all N images (every shard of every split)",
    "cache_build": "--cache-images train images from N's train pipeline, after one unmeasured batch",
    "cached_epoch": "one epoch over N's train count of cached rows (the sample's features, tiled)",
    "fine_tune": "--train-steps batches from N's train pipeline, after one unmeasured batch",
}


def flatness(rows: dict[int, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per phase: ms per image and peak RSS at each N, and whether each stays within ±FLAT_TOLERANCE of its median."""
    result = {}
    for phase in PHASE_NAMES:
        cost = [1000 * rows[n][phase]["seconds"] / rows[n][phase]["images"] for n in sorted(rows)]
        rss = [rows[n][phase]["peak_rss_mb"] for n in sorted(rows)]
        result[phase] = {
            "ms_per_image": [round(c, 3) for c in cost],
            "peak_rss_mb": rss,
            "cost_flat": _flat(cost),
            "rss_flat": _flat(rss),
        }
    return result


def _flat(values: list[float]) -> bool:
    middle = statistics.median(values)
    return all(abs(v - middle) <= FLAT_TOLERANCE * middle for v in values)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tools.demo_data import write_demo

    with tempfile.TemporaryDirectory(prefix="dermaid-scale-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        demo = write_demo(
            root / "isic", max(args.counts), args.seed, sizes=args.sizes, scale=args.scale, workers=args.workers or 2
        )
        demo_seconds = time.perf_counter() - start
        jpeg_bytes = sum(p.stat().st_size for p in (demo / "ISIC_2019_Training_Input").glob("*.jpg"))
        decode = decode_quality(demo / "ISIC_2019_Training_Input", args.image_size, args.quality_images)
        rows = {n: measure_n(demo, root, n, args) for n in sorted(args.counts)}
    return {
        "demo": {"images": max(args.counts), "seconds": round(demo_seconds, 1), "jpeg_bytes": jpeg_bytes},
        "decode": decode,
        "measured_on": MEASURED_ON,
        "counts": _rounded(rows),
        "flat": flatness(rows),
    }


def _rounded(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return round(value, 3) if isinstance(value, float) else value


def report(result: dict[str, Any]) -> str:
    from bench.common import table

    rows = []
    for n, r in result["counts"].items():
        rows.append(
            [
                n,
                r["prepare"]["seconds"],
                r["prepare"]["images_per_s"],
                round(r["prepare"]["shard_bytes"] / MB),
                r["labels"]["seconds"],
                r["cache_build"]["images_per_s"],
                r["cached_epoch"]["seconds"],
                r["fine_tune"]["images_per_s"],
                " / ".join(f"{r[p]['peak_rss_mb']:.0f}" for p in PHASE_NAMES),
            ]
        )
    header = ("N", "prepare s", "prepare img/s", "shards MB", "label pass s", "cache build img/s", "cached epoch s")
    header += ("fine-tune img/s", "peak RSS MB: prepare / labels / cache build / cached epoch / fine-tune")
    text = table("Scale: ISIC-sized JPEGs", header, rows)
    text += "\nMeasured on:\n" + "".join(f"- {p}: {what}\n" for p, what in result["measured_on"].items())
    flat = [
        [p, " / ".join(f"{c:.3g}" for c in f["ms_per_image"]), _yes(f["cost_flat"]), _yes(f["rss_flat"])]
        for p, f in result["flat"].items()
    ]
    text += "\n" + table("Flat in N (±15 % of the median)", ("phase", "ms per image", "cost flat", "RSS flat"), flat)
    decode = [
        [size, d["fast_images_per_s"], d["full_images_per_s"], d["speedup"], d["mad"], d["psnr_db"]]
        for size, d in result["decode"].items()
    ]
    header = ("source", "fast img/s (1 thread)", "full + area img/s", "speedup", "MAD", "PSNR dB")
    return text + "\n" + table("Fast decode against full decode + area resize", header, decode)


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter  # the whole docstring: commands, timings, what is measured on what
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__, formatter_class=raw)
    p.add_argument("--counts", type=int, nargs="+", default=[1000, 2000, 4000], help="N (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=256, help="px of shards and model (default: %(default)s)")
    p.add_argument("--sizes", choices=("isic", "square"), default="isic", help="demo JPEG sizes (default: %(default)s)")
    p.add_argument("--scale", type=float, default=1.0, help="shrink the ISIC sizes (tests; default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="global batch (default: %(default)s)")
    p.add_argument("--train-steps", type=int, default=4, help="measured fine-tune batches (default: %(default)s)")
    p.add_argument("--cache-images", type=int, default=128, help="train images timed in the cache build (default: 128)")
    p.add_argument("--quality-images", type=int, default=8, help="images per source size in the decode table")
    p.add_argument("--workers", type=int, default=None, help="prepare threads (default: prepare's own)")
    p.add_argument(
        "--shuffle-buffer", type=int, default=2048, help="records in the train shuffle buffer (default: the job's)"
    )
    p.add_argument(
        "--shuffle-memory", type=float, default=256.0, help="MB the train shuffle buffer may hold (default: the job's)"
    )
    p.add_argument("--seed", type=int, default=0, help="demo data and split seed (default: %(default)s)")
    p.add_argument("--out", type=Path, help="JSON result path (default: bench/results/scale.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    from bench import common

    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        payload = {"machine": common.machine(), "settings": common.settings(args), **run(args)}
    except (ValueError, OSError, RuntimeError) as err:
        print(f"error: bench.scale: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    payload["seconds"] = round(time.perf_counter() - start, 1)
    path = common.write_result("scale", payload, args.out)
    print(report(payload))
    print(f"bench.scale: {payload['seconds']} s, wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
