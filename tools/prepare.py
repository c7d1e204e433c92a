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
interrupted run never leaves a manifest pointing at partial shards. A local --out is replaced in
place (its old manifest is removed before the split folders are swapped); a gs:// --out must not
already hold a manifest (dataset versions there are immutable).
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import pickle
import random
import re
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tools.demo_data import GROUND_TRUTH_COLUMNS, GROUND_TRUTH_CSV, IMAGE_DIR, METADATA_COLUMNS, METADATA_CSV
from utilities import storage
from utilities.errors import JobError, one_line
from utilities.schema import CLASS_NAMES, METADATA_NAMES, SPLITS, encode_metadata, one_hot

MANIFEST_NAME = "versioned_paths.pickle"
MANIFEST_PROTOCOL = 4  # fixed, not the interpreter default; readable by Python 3.4 and later
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_IMAGE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # no separators: an id can never escape the folder
_MIN_GROUPS = len(SPLITS)  # a class needs one lesion per split


class PrepareError(JobError, ValueError):
    """Bad input or arguments; the message is one line naming the file, line or class."""


@dataclass(frozen=True)
class Record:
    image: str  # ISIC id, e.g. ISIC_0000000
    path: Path
    label: int  # index into CLASS_NAMES
    group: str  # "lesion:HAM_…", or "image:ISIC_…" when lesion_id is empty
    metadata: tuple[int, ...]  # 28-long multi-hot, utilities.schema.encode_metadata


# ---------------------------------------------------------------- reading and validating the CSVs


def _read_csv(path: Path, expected: Sequence[str], optional: Sequence[str] = ()) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) pairs; the header must hold exactly `expected` (+ any of `optional`)."""
    if not path.is_file():
        raise PrepareError(f"{path} not found; --input must be a folder in the ISIC 2019 layout")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in expected if c not in header]
        extra = [c for c in header if c not in expected and c not in optional]
        if missing or extra or len(set(header)) != len(header):
            raise PrepareError(
                f"{path.name}: bad header {','.join(header) or '(empty)'}; missing {missing}, unexpected {extra}"
            )
        rows = []
        for row in reader:
            if None in row or None in row.values():
                raise PrepareError(f"{path.name} line {reader.line_num}: expected {len(header)} fields")
            rows.append((reader.line_num, row))
    return rows


def _check_image_id(name: str, image: str, line: int, seen: set[str]) -> None:
    if not _IMAGE_ID.fullmatch(image):
        raise PrepareError(f"{name} line {line}: bad image id {image!r}")
    if image in seen:
        raise PrepareError(f"{name} line {line}: image {image} is listed twice")
    seen.add(image)


def read_labels(path: Path) -> dict[str, str]:
    """image id → class name or "UNK", from the ground-truth CSV (one-hot 0.0/1.0 columns)."""
    columns = [c for c in GROUND_TRUTH_COLUMNS if c != "UNK"]
    labels: dict[str, str] = {}
    seen: set[str] = set()
    for line, row in _read_csv(path, columns, optional=("UNK",)):
        _check_image_id(path.name, row["image"], line, seen)
        values = {}
        for name in [c for c in row if c != "image"]:
            try:
                values[name] = float(row[name])
            except ValueError:
                raise PrepareError(
                    f"{path.name} line {line} ({row['image']}): {name}={row[name]!r} is not a number"
                ) from None
        hot = [name for name, v in values.items() if v == 1.0]
        if len(hot) != 1 or any(v not in (0.0, 1.0) for v in values.values()):
            shown = " ".join(f"{k}={row[k]}" for k in values)
            raise PrepareError(f"{path.name} line {line} ({row['image']}): label is not one-hot: {shown}")
        labels[row["image"]] = hot[0]
    return labels


def _parse_age(text: str, where: str) -> float | None:
    if not text.strip():
        return None
    try:
        return float(text)
    except ValueError:
        raise PrepareError(f"{where}: age_approx {text!r} is not a number") from None


def read_metadata(path: Path, images: set[str]) -> dict[str, tuple[tuple[int, ...], str]]:
    """image id → (encoded metadata, lesion_id) for exactly the images of the ground truth."""
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    seen: set[str] = set()
    for line, row in _read_csv(path, METADATA_COLUMNS):
        image, where = row["image"], f"{path.name} line {line} ({row['image']})"
        _check_image_id(path.name, image, line, seen)
        if image not in images:
            raise PrepareError(f"{where}: image is not in {GROUND_TRUTH_CSV}")
        age = _parse_age(row["age_approx"], where)
        try:
            vector = encode_metadata(age, row["anatom_site_general"].strip(), row["sex"].strip())
        except ValueError as err:
            raise PrepareError(f"{where}: {err}") from None
        found[image] = (tuple(vector), row["lesion_id"].strip())
    missing = sorted(images - set(found))
    if missing:
        raise PrepareError(f"{path.name}: no row for {len(missing)} image(s) of {GROUND_TRUTH_CSV}, e.g. {missing[0]}")
    return found


def _image_path(folder: Path, image: str) -> Path:
    for suffix in IMAGE_SUFFIXES:
        path = folder / f"{image}{suffix}"
        if path.is_file():
            return path
    raise PrepareError(f"image {image} is listed in {GROUND_TRUTH_CSV} but {folder / image}.jpg does not exist")


def read_records(input_dir: Path) -> tuple[list[Record], int]:
    """Validated records (UNK dropped), sorted by image id, and the number of UNK rows skipped."""
    if not input_dir.is_dir():
        raise PrepareError(f"--input {input_dir} is not a folder")
    labels = read_labels(input_dir / GROUND_TRUTH_CSV)
    metadata = read_metadata(input_dir / METADATA_CSV, set(labels))
    folder = input_dir / IMAGE_DIR if (input_dir / IMAGE_DIR).is_dir() else input_dir
    records = []
    for image in sorted(labels):
        if labels[image] == "UNK":
            continue
        vector, lesion = metadata[image]
        group = f"lesion:{lesion}" if lesion else f"image:{image}"
        label = CLASS_NAMES.index(labels[image])
        records.append(Record(image, _image_path(folder, image), label, group, vector))
    present = Counter(r.label for r in records)
    for index, name in enumerate(CLASS_NAMES):
        if not present[index]:
            raise PrepareError(
                f"class {name} has no images in {GROUND_TRUTH_CSV}; every class is needed in every split"
            )
    return records, sum(1 for v in labels.values() if v == "UNK")


# ---------------------------------------------------------------- choosing and splitting lesion groups

Groups = list[list[Record]]  # lesion groups: the records of one lesion each


def _groups_by_class(records: Iterable[Record]) -> dict[int, Groups]:
    """Lesion groups per class, in a stable order. A group's class is its most frequent label."""
    groups: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        groups[record.group].append(record)
    by_class: dict[int, Groups] = defaultdict(list)
    for key in sorted(groups):
        labels = Counter(r.label for r in groups[key])
        by_class[min(labels, key=lambda c: (-labels[c], c))].append(groups[key])
    return by_class


def _take(groups: Groups, target: float, keep: int) -> tuple[Groups, Groups]:
    """(taken, rest): groups in order, skipping any that overshoot ~target images; ≥ 1 taken; ≥ keep left."""
    taken: Groups = []
    rest: Groups = []
    count = 0
    for i, group in enumerate(groups):
        can_spare = len(rest) + len(groups) - i - 1 >= keep
        if can_spare and (not taken or count + len(group) <= target + 0.5):
            taken.append(group)
            count += len(group)
        else:
            rest.append(group)
    return taken, rest


def _fill(groups: Groups, budget: float) -> tuple[Groups, Groups]:
    """(taken, rest): groups in order that still fit in `budget` images, skipping those that do not."""
    taken: Groups = []
    rest: Groups = []
    for group in groups:
        if len(group) <= budget:
            taken.append(group)
            budget -= len(group)
        else:
            rest.append(group)
    return taken, rest


def limit_records(records: list[Record], limit: int | None, seed: int) -> list[Record]:
    """At most `limit` records, as whole lesion groups: each class its share (≥ 3 groups), then fill up."""
    if limit is None or limit >= len(records):
        return records
    picked: Groups = []
    rest: Groups = []
    for label, groups in sorted(_groups_by_class(records).items()):
        groups = list(groups)
        random.Random(f"{seed}:limit:{label}").shuffle(groups)
        share = limit * sum(map(len, groups)) / len(records)
        mine = groups[:_MIN_GROUPS]
        more, left = _fill(groups[_MIN_GROUPS:], share - sum(map(len, mine)))
        picked += mine + more
        rest += left
    used = sum(map(len, picked))
    if used > limit:
        raise PrepareError(
            f"--limit {limit} is too small: {_MIN_GROUPS} lesion groups of every class take {used} images"
        )
    random.Random(f"{seed}:limit:fill").shuffle(rest)
    picked += _fill(rest, limit - used)[0]
    return sorted((r for g in picked for r in g), key=lambda r: r.image)


def split_records(
    records: list[Record], seed: int, val_fraction: float, test_fraction: float
) -> dict[str, list[Record]]:
    """Stratified by class, grouped by lesion; every class in every split. Each split is shuffled (seeded)."""
    splits: dict[str, list[Record]] = {s: [] for s in SPLITS}
    for label, groups in sorted(_groups_by_class(records).items()):
        if len(groups) < _MIN_GROUPS:
            raise PrepareError(
                f"class {CLASS_NAMES[label]} has only {len(groups)} lesion group(s); at least {_MIN_GROUPS} are needed "
                "to appear in train, val and test"
            )
        groups = list(groups)
        random.Random(f"{seed}:split:{label}").shuffle(groups)
        images = sum(map(len, groups))
        test, rest = _take(groups, test_fraction * images, keep=2)  # keep one group each for val and train
        val, train = _take(rest, val_fraction * images, keep=1)
        for split, part in (("test", test), ("val", val), ("train", train)):
            splits[split] += [r for g in part for r in g]
    for split, part in splits.items():
        part.sort(key=lambda r: r.image)
        random.Random(f"{seed}:order:{split}").shuffle(part)  # mixes classes within every shard
    return splits


# ---------------------------------------------------------------- images and shards


def load_image(path: Path, size: int) -> bytes:
    """Raw uint8 RGB pixels of `path` resized to size×size (row-major, size*size*3 bytes)."""
    try:
        with Image.open(path) as image:
            # JPEG only: decode directly at 1/2, 1/4 or 1/8 scale when still ≥ size (much faster on big images).
            image.draft("RGB", (size, size))
            rgb = image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise PrepareError(f"image {path} cannot be read: {one_line(err)}") from None
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8).tobytes()


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
    from utilities.shards import file_sha256

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


def _check_only_shards(folder: Path) -> None:
    strays = [p.name for p in folder.iterdir() if not (p.is_file() and p.suffix == ".tfrecords")]
    if strays:
        raise PrepareError(f"refusing to replace {folder}: it holds non-shard entries such as {strays[0]!r}")


def _publish_local(staging: Path, out: Path, manifest: dict[str, Any]) -> None:
    for split in SPLITS:  # check before touching anything
        if (out / split).exists():
            _check_only_shards(out / split)
    # From here until the new manifest is written, no manifest points at this folder's shards.
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for split in SPLITS:
        if (out / split).exists():
            os.replace(out / split, staging / f"old-{split}")  # deleted with the staging area
        os.replace(staging / split, out / split)
    storage.write_bytes(str(out / MANIFEST_NAME), manifest_bytes(manifest))


def _publish_gcs(shards: dict[str, list[Path]], out_uri: str, manifest: dict[str, Any]) -> None:
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


def _check_out(out_uri: str) -> None:
    if storage.is_gcs(out_uri):
        storage.check_writable(out_uri)
        if storage.exists(storage.join(out_uri, MANIFEST_NAME)):
            raise PrepareError(
                f"{storage.join(out_uri, MANIFEST_NAME)} already exists; dataset versions on GCS are immutable, choose a new --out"
            )
    elif Path(out_uri).exists() and not Path(out_uri).is_dir():
        raise PrepareError(f"--out {out_uri} exists and is not a folder")


@dataclass(frozen=True)
class Plan:
    """Everything decided before any image is read: validated records per split and the provenance."""

    out_uri: str
    splits: dict[str, list[Record]]
    skipped_unk: int
    source: dict[str, Any]


def plan(
    input_dir: str | Path,
    out_uri: str | Path,
    image_size: int = 256,
    shard_size: int = 500,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    limit: int | None = None,
) -> Plan:
    """Validate arguments, output and CSVs, choose (--limit) and split the records. Writes nothing."""
    out_uri, input_dir = str(out_uri), Path(input_dir)
    _check_arguments(image_size, shard_size, val_fraction, test_fraction, limit)
    _check_out(out_uri)
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
    return Plan(out_uri, splits, skipped_unk, source)


def execute(plan: Plan, workers: int | None = None) -> dict[str, Any]:
    """Write the shards to a staging area, publish them, write the manifest last; return the manifest."""
    if workers is not None and workers < 1:
        raise PrepareError("--workers must be at least 1")
    workers = workers or min(8, os.cpu_count() or 1)
    local_out = None if storage.is_gcs(plan.out_uri) else Path(plan.out_uri).resolve()
    if local_out:
        local_out.mkdir(parents=True, exist_ok=True)
    # Local: stage inside --out so the final moves are renames on one filesystem.
    staging = Path(tempfile.mkdtemp(prefix=".prepare.tmp-", dir=local_out))
    try:
        size, shard_size = plan.source["image_size"], plan.source["shard_size"]
        shards = write_shards(plan.splits, staging, size, shard_size, workers)
        manifest = build_manifest(plan.out_uri, shards, plan.splits, plan.skipped_unk, plan.source)
        if local_out:
            _publish_local(staging, local_out, manifest)
        else:
            _publish_gcs(shards, plan.out_uri, manifest)
    finally:
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
    parser = argparse.ArgumentParser(prog="python -m tools.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, type=Path, help="folder in the ISIC 2019 layout")
    parser.add_argument("--out", required=True, help="output folder or gs://bucket/prefix")
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
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be at least 1")
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
        )
        import tensorflow  # noqa: F401  (before the clock starts: images/s measures the work, not the ~2 s import)

        started = time.perf_counter()
        manifest = execute(todo, args.workers)
    except (PrepareError, storage.StorageError, OSError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    print(_summary(manifest, args.out, time.perf_counter() - started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
