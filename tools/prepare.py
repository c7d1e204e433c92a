"""ISIC 2019 folder → sharded TFRecords + versioned manifest (DESIGN §2.1, §2.2).

    python -m tools.prepare --input demo/isic --out demo/data_v02 --image-size 256 --shard-size 500 --seed 0
    python -m tools.prepare --input demo/isic --out gs://bucket/data_v01 --limit 400

Reads `ISIC_2019_Training_GroundTruth.csv`, `ISIC_2019_Training_Metadata.csv` and the JPEGs (in
`ISIC_2019_Training_Input/`, or beside the CSVs), validates everything before writing anything,
drops UNK rows, splits train/val/test stratified by class and grouped by lesion_id (a lesion never
spans two splits; an empty lesion_id is its own group), resizes every image to a square of
--image-size px (aspect ratio not kept, as the original DermAID records) and writes raw uint8
pixels in shards `{out}/{split}/{i:04d}.tfrecords` plus `{out}/versioned_paths.pickle`.

Atomicity: shards are written to a staging area first; the manifest is written last, so an
interrupted run never leaves a manifest pointing at partial shards. An --out (local or gs://) that
already holds a dataset version (a manifest, or shards in a split folder) is refused before any
image is read: a registry tag may point at it, and new shards there would break the tag's checksums.
--overwrite replaces it anyway: a local --out in place (its old manifest is removed before the split
folders are swapped), a gs:// one by uploading the new shards over the old, then the manifest.

Images (checked by utilities.data.isic): JPEG or PNG (whatever the suffix), at most 64 megapixels as their header
claims; a file that ends early, or a JPEG whose data is too short for the size it claims, is refused
with its path (no image is ever stored half grey). CSVs: strict UTF-8 (an Excel byte-order mark is fine).
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from utilities import native_log, storage
from utilities.data.isic import PrepareError, Record, load_image, read_records
from utilities.data.lesion_split import limit_records, split_records
from utilities.data.manifest import MANIFEST_NAME
from utilities.data.schema import (
    CLASS_NAMES,
    METADATA_NAMES,
    SPLITS,
    one_hot,
)
from utilities.errors import OneLineParser, one_line

MANIFEST_PROTOCOL = 4  # fixed, not the interpreter default; readable by Python 3.4 and later


# ---------------------------------------------------------------- shards


def example_bytes(pixels: bytes, record: Record) -> bytes:
    """One serialized tf.train.Example in the DESIGN §2.1 schema."""
    import tensorflow as tf

    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[pixels])),
        "metadata": tf.train.Feature(int64_list=tf.train.Int64List(value=record.metadata)),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=one_hot(record.label))),
        "image_name": tf.train.Feature(bytes_list=tf.train.BytesList(value=[record.image.encode("utf-8")])),
    }
    # `feature` is a protobuf map: without deterministic=True its wire order follows a per-process
    # hash seed, so two runs wrote the same records as different bytes (new sha256, new DVC object).
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


def write_shards(
    splits: dict[str, list[Record]], staging: Path, image_size: int, shard_size: int, workers: int
) -> dict[str, list[Path]]:
    """Write `staging/{split}/{i:04d}.tfrecords`; images are decoded by a thread pool (Pillow releases the GIL)."""
    import tensorflow as tf

    from utilities.progress import Progress  # Keras' progress bar: imported with TensorFlow, not before

    written: dict[str, list[Path]] = {}
    # ISIC 2019 is minutes of decoding: a bar on a terminal, a line every 30 s in a log.
    progress = Progress(sum(len(records) for records in splits.values()), "prepare", unit="image")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for split, records in splits.items():
            (staging / split).mkdir(parents=True)
            written[split] = []
            for index, start in enumerate(range(0, len(records), shard_size)):
                chunk = records[start : start + shard_size]
                path = staging / split / f"{index:04d}.tfrecords"
                # One shard at a time bounds memory to shard_size decoded images.
                pixels = pool.map(partial(load_image, size=image_size), [r.path for r in chunk])
                with tf.io.TFRecordWriter(str(path)) as writer:
                    for record, raw in zip(chunk, pixels, strict=True):
                        writer.write(example_bytes(raw, record))
                        progress.advance()
                written[split].append(path)
    progress.done()
    return written


# ---------------------------------------------------------------- manifest and publishing


def _final_uri(out_uri: str, split: str, shard: Path) -> str:
    if storage.is_gcs(out_uri):
        return storage.join(out_uri, split, shard.name)
    return str(Path(out_uri).resolve() / split / shard.name)


def build_manifest(
    out_uri: str,
    shards: dict[str, list[Path]],
    splits: dict[str, list[Record]],
    skipped_unk: int,
    source: dict[str, Any],
) -> dict[str, Any]:
    from utilities.data.shards import file_sha256

    uris = {split: [_final_uri(out_uri, split, p) for p in paths] for split, paths in shards.items()}
    sha = {_final_uri(out_uri, split, p): file_sha256(p) for split, paths in shards.items() for p in paths}
    counts: dict[str, Any] = {
        split: {name: sum(1 for r in records if r.label == i) for i, name in enumerate(CLASS_NAMES)}
        for split, records in splits.items()
    }
    counts["skipped_unk"] = skipped_unk
    size = source["image_size"]
    return {
        **uris,
        "schema": {
            "class_names": list(CLASS_NAMES),
            "metadata_names": list(METADATA_NAMES),
            "image_shape": [size, size, 3],
            "image_encoding": "raw_uint8",
        },
        "counts": counts,
        "sha256": sha,
        # Image ids of every split in record order (shard 0 first): lineage, and maps predictions to images.
        "images": {split: [r.image for r in records] for split, records in splits.items()},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": source,
    }


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The pickle written as `versioned_paths.pickle`: the same manifest always gives the same bytes.

    Protocol fixed at 4 (not the interpreter's default, which changes between Pythons); the dicts are
    built in a fixed order (SPLITS, CLASS_NAMES, shard order), and pickle keeps insertion order.
    """
    return pickle.dumps(manifest, protocol=MANIFEST_PROTOCOL)


def _existing_version(out_uri: str) -> str | None:
    """The first thing in --out that belongs to a dataset version (its manifest, a split folder holding shards)."""
    if storage.is_gcs(out_uri):
        return next(
            (u for u in (storage.join(out_uri, n) for n in (MANIFEST_NAME, *SPLITS)) if storage.exists(u)), None
        )
    out = Path(out_uri)
    if os.path.lexists(out / MANIFEST_NAME):
        return str(out / MANIFEST_NAME)
    for folder in (out / split for split in SPLITS):
        if os.path.lexists(folder) and not folder.is_dir():
            raise PrepareError(f"refusing to write into {out}: {folder} is not a folder")
        entries = list(folder.iterdir()) if folder.is_dir() else []
        strays = [p.name for p in entries if not (p.is_file() and p.suffix == ".tfrecords")]
        if strays:
            raise PrepareError(f"refusing to write into {out}: {folder} holds non-shard entries such as {strays[0]!r}")
        if entries:
            return str(folder)
    return None


def _check_no_version(out_uri: str, overwrite: bool) -> None:
    """A registry tag may name the manifest in --out; new shards there would break it (checksums): refuse."""
    found = _existing_version(out_uri)
    if found and not overwrite:
        raise PrepareError(
            f"--out {out_uri} already holds a dataset version ({found}), which a registry tag may point at; "
            "choose a new --out, or pass --overwrite to replace it (breaks every tag and manifest naming it)"
        )


def _publish_local(staging: Path, out: Path, manifest: dict[str, Any], overwrite: bool) -> None:
    _check_no_version(str(out), overwrite)  # again: another prepare may have published meanwhile
    # From here until the new manifest is written, no manifest points at this folder's shards.
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for split in SPLITS:
        if (out / split).exists():  # shards only (--overwrite) or empty: checked above
            os.replace(out / split, staging / f"old-{split}")  # deleted with the staging area
        os.replace(staging / split, out / split)
    storage.write_bytes(str(out / MANIFEST_NAME), manifest_bytes(manifest))


def _publish_gcs(shards: dict[str, list[Path]], out_uri: str, manifest: dict[str, Any], overwrite: bool) -> None:
    _check_no_version(out_uri, overwrite)  # again: another prepare may have published meanwhile
    for split, paths in shards.items():
        for path in paths:
            storage.upload_file(path, _final_uri(out_uri, split, path))  # verified upload
    storage.write_bytes(storage.join(out_uri, MANIFEST_NAME), manifest_bytes(manifest))


def _check_arguments(
    image_size: int, shard_size: int, val_fraction: float, test_fraction: float, limit: int | None
) -> None:
    if image_size < 8:
        raise PrepareError(f"--image-size {image_size} is too small; use at least 8 px")
    if shard_size < 1:
        raise PrepareError("--shard-size must be at least 1")
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise PrepareError(
            f"--val-fraction {val_fraction} and --test-fraction {test_fraction} must be in (0, 1) and sum below 1"
        )
    if limit is not None and limit < 1:
        raise PrepareError("--limit must be at least 1")


def _check_out(out_uri: str, overwrite: bool) -> None:
    if storage.is_gcs(out_uri):
        storage.check_writable(out_uri)
    elif Path(out_uri).exists() and not Path(out_uri).is_dir():
        raise PrepareError(f"--out {out_uri} exists and is not a folder")
    _check_no_version(out_uri, overwrite)


@dataclass(frozen=True)
class Plan:
    """Everything decided before any image is read: validated records per split and the provenance."""

    out_uri: str
    splits: dict[str, list[Record]]
    skipped_unk: int
    source: dict[str, Any]
    overwrite: bool = False  # replace a dataset version already in out_uri


def plan(
    input_dir: str | Path,
    out_uri: str | Path,
    image_size: int = 256,
    shard_size: int = 500,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    limit: int | None = None,
    overwrite: bool = False,
) -> Plan:
    """Validate arguments, output and CSVs, choose (--limit) and split the records. Writes nothing.

    `out_uri` must not hold a dataset version already (a manifest, or shards) unless `overwrite`."""
    out_uri, input_dir = str(out_uri), Path(input_dir)
    _check_arguments(image_size, shard_size, val_fraction, test_fraction, limit)
    _check_out(out_uri, overwrite)
    records, skipped_unk = read_records(input_dir)
    records = limit_records(records, limit, seed)
    splits = split_records(records, seed, val_fraction, test_fraction)
    source = {
        "input": str(input_dir.resolve()),
        "image_count": len(records),
        "limit": limit,
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "image_size": image_size,
        "shard_size": shard_size,
    }
    return Plan(out_uri, splits, skipped_unk, source, overwrite)


def execute(plan: Plan, workers: int | None = None) -> dict[str, Any]:
    """Write the shards to a staging area, publish them, write the manifest last; return the manifest."""
    if workers is not None and workers < 1:
        raise PrepareError("--workers must be at least 1")
    workers = workers or min(8, os.cpu_count() or 1)
    local_out = None if storage.is_gcs(plan.out_uri) else Path(plan.out_uri).resolve()
    created = local_out is not None and not local_out.exists()  # removed again if this prepare fails
    if local_out:
        local_out.mkdir(parents=True, exist_ok=True)
    # Local: stage inside --out so the final moves are renames on one filesystem.
    staging = Path(tempfile.mkdtemp(prefix=".prepare.tmp-", dir=local_out))
    try:
        size, shard_size = plan.source["image_size"], plan.source["shard_size"]
        shards = write_shards(plan.splits, staging, size, shard_size, workers)
        manifest = build_manifest(plan.out_uri, shards, plan.splits, plan.skipped_unk, plan.source)
        if local_out:
            _publish_local(staging, local_out, manifest, plan.overwrite)
        else:
            _publish_gcs(shards, plan.out_uri, manifest, plan.overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:  # a refused image or a full disk leaves no empty --out behind
            shutil.rmtree(local_out, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return manifest


def prepare(input_dir: str | Path, out_uri: str | Path, workers: int | None = None, **options: Any) -> dict[str, Any]:
    """`plan` (same keyword options) then `execute`: validate, split, write shards and the manifest; return the
    manifest (also in `{out}/versioned_paths.pickle`)."""
    return execute(plan(input_dir, out_uri, **options), workers)


def _summary(manifest: dict[str, Any], out_uri: str, seconds: float) -> str:
    sizes = {s: sum(manifest["counts"][s].values()) for s in SPLITS}
    total = sum(sizes.values())
    shards = sum(len(manifest[s]) for s in SPLITS)
    return (
        f"prepared {total} images ({', '.join(f'{s} {n}' for s, n in sizes.items())}; "
        f"{manifest['counts']['skipped_unk']} UNK skipped) into {shards} shards in {seconds:.1f} s "
        f"({total / max(seconds, 1e-9):.0f} images/s); manifest {storage.join(out_uri, MANIFEST_NAME)}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m tools.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, type=Path, help="folder in the ISIC 2019 layout")
    parser.add_argument(
        "--out",
        required=True,
        help="output folder or gs://bucket/prefix, not already holding a dataset version (see --overwrite)",
    )
    parser.add_argument(
        "--image-size", type=int, default=256, help="side of the stored square images, px (default: %(default)s)"
    )
    parser.add_argument("--shard-size", type=int, default=500, help="records per shard (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and of --limit (default: %(default)s)")
    parser.add_argument(
        "--val-fraction", type=float, default=0.15, help="share of each class for val (default: %(default)s)"
    )
    parser.add_argument(
        "--test-fraction", type=float, default=0.15, help="share of each class for test (default: %(default)s)"
    )
    parser.add_argument("--limit", type=int, default=None, help="use about N images, chosen as whole lesion groups")
    parser.add_argument("--workers", type=int, default=None, help="image decoding threads (default: min(8, CPUs))")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the dataset version already in --out (its manifest and shards); this breaks every registry "
        "tag and manifest that points at that folder",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="keep TensorFlow's C++ start-up lines (dropped otherwise)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for name in ("absl", "tensorflow", "PIL"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        todo = plan(
            args.input,
            args.out,
            args.image_size,
            args.shard_size,
            args.seed,
            args.val_fraction,
            args.test_fraction,
            args.limit,
            args.overwrite,
        )
        with native_log.quiet(verbose=args.verbose):  # TensorFlow's C++ start-up lines dropped
            # Before the clock starts: images/s measures the work, not the ~2 s import.
            import tensorflow  # noqa: F401

            native_log.find_devices()

        started = time.perf_counter()
        manifest = execute(todo, args.workers)
    except (PrepareError, storage.StorageError, OSError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    print(_summary(manifest, args.out, time.perf_counter() - started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
