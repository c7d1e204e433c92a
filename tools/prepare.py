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

Images: JPEG or PNG (whatever the suffix), at most MAX_IMAGE_PIXELS (64 megapixels) as their header
claims; a file that ends early, or a JPEG whose data is too short for the size it claims, is refused
with its path (no image is ever stored half grey). CSVs: strict UTF-8 (an Excel byte-order mark is fine).
"""

from __future__ import annotations

import codecs
import csv
import io
import logging
import mmap
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
from PIL import Image, ImageFile

from utilities import native_log, storage
from utilities.data.manifest import MANIFEST_NAME
from utilities.data.schema import (
    CLASS_NAMES,
    GROUND_TRUTH_COLUMNS,
    GROUND_TRUTH_CSV,
    IMAGE_DIR,
    METADATA_COLUMNS,
    METADATA_CSV,
    METADATA_NAMES,
    SPLITS,
    encode_metadata,
    one_hot,
)
from utilities.errors import JobError, OneLineParser, one_line

MANIFEST_PROTOCOL = 4  # fixed, not the interpreter default; readable by Python 3.4 and later
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
IMAGE_FORMATS = ("JPEG", "PNG")  # Pillow's names; a file in any other format is refused whatever its suffix
# 64 megapixels (8000×8000): 2.6× the largest ISIC images (6000×4000 camera frames; HAM10000 is 600×450,
# BCN_20000 1024×1024), below Pillow's 89.5-megapixel bomb warning (so no image is ever accepted with only a
# warning), and a full RGB decode (PNG has no reduced-size decode) stays under 200 MB per decoding thread.
MAX_IMAGE_PIXELS = 64_000_000
_JPEG_FRAMES = {  # start-of-frame markers: the coding each names
    **dict.fromkeys((0xC0, 0xC1, 0xC2), "Huffman-coded"),
    0xC3: "lossless",
    **dict.fromkeys((0xC5, 0xC6, 0xC7), "hierarchical"),
    **dict.fromkeys((0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF), "arithmetic-coded"),
}
_JPEG_HUFFMAN_DCT = (0xC0, 0xC1, 0xC2)  # baseline, extended sequential, progressive: what cameras and ISIC write
_JPEG_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7]")  # the marker after entropy-coded data (not stuffing, RSTn)
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
    metadata: tuple[int, ...]  # 28-long multi-hot, utilities.data.schema.encode_metadata


# ---------------------------------------------------------------- reading and validating the CSVs


def _decode_csv(path: Path) -> str:
    """The text of a CSV file, decoded strictly as UTF-8; a leading byte-order mark (Excel writes one) is dropped."""
    data = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as err:
        if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            raise PrepareError(f"{path.name} is UTF-16 (its byte-order mark says so); save it as UTF-8") from None
        offset = bom + err.start  # in the file, counting the byte-order mark
        line = data.count(b"\n", 0, offset) + 1
        raise PrepareError(
            f"{path.name}: byte {offset} (line {line}) is not UTF-8 ({err.reason}); save the file as UTF-8"
        ) from None


def _read_csv(path: Path, expected: Sequence[str], optional: Sequence[str] = ()) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) pairs; the header must hold exactly `expected` (+ any of `optional`)."""
    if not path.is_file():
        raise PrepareError(f"{path} not found; --input must be a folder in the ISIC 2019 layout")
    # strict: a stray quote is an error, not a field that silently swallows the following lines.
    reader = csv.DictReader(io.StringIO(_decode_csv(path), newline=""), strict=True)
    try:
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
                found = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None, []))
                raise PrepareError(f"{path.name} line {reader.line_num}: expected {len(header)} fields, found {found}")
            rows.append((reader.line_num, row))
    except csv.Error as err:  # line_num counts the lines read before the record that failed
        raise PrepareError(f"{path.name} line {reader.line_num + 1}: {err}") from None
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


def _jpeg_frame(data: mmap.mmap) -> tuple[int, int, int, int] | None:
    """(width, height, 8×8 blocks of all components, entropy-coded bytes of all scans) from a JPEG's markers;
    None when there is no frame header (Pillow then names the problem)."""
    frame, scan_bytes, pos = None, 0, 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:  # stray bytes between segments: libjpeg skips them to the next marker, so do we
            pos = data.find(b"\xff", pos)
            if pos < 0:
                break
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:  # end of image
            break
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length
            pos += 2
            continue
        body = data[pos + 4 : pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")]
        pos += 4 + len(body)
        if marker in _JPEG_FRAMES and frame is None:
            if marker not in _JPEG_HUFFMAN_DCT:
                raise PrepareError(f"{_JPEG_FRAMES[marker]} JPEG (SOF{marker - 0xC0}) is not supported")
            frame = _frame_blocks(body)
        elif marker == 0xDA:  # start of scan: its entropy-coded data runs to the next marker
            end = _JPEG_SCAN_END.search(data, pos)
            scan_bytes += (end.start() if end else len(data)) - pos
            pos = end.start() if end else len(data)
    return None if frame is None else (*frame, scan_bytes)


def _frame_blocks(sof: bytes) -> tuple[int, int, int]:
    """(width, height, 8×8 blocks of all components) from a start-of-frame segment's body."""
    height, width = int.from_bytes(sof[1:3], "big"), int.from_bytes(sof[3:5], "big")
    count = sof[5] if len(sof) > 5 else 0
    factors = [(b >> 4, b & 15) for b in sof[7 : 6 + 3 * count : 3]]  # (horizontal, vertical) sampling per component
    if not factors or min(min(f) for f in factors) < 1:
        return width, height, 0  # malformed: libjpeg refuses it
    h_max, v_max = max(h for h, _ in factors), max(v for _, v in factors)
    return (
        width,
        height,
        sum(_ceil(_ceil(width * h, h_max), 8) * _ceil(_ceil(height * v, v_max), 8) for h, v in factors),
    )


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def check_image_claims(path: Path) -> None:
    """Refuse, before decoding, an image whose header claims more than MAX_IMAGE_PIXELS, or a JPEG whose data is
    too short for the size its header claims.

    Pillow refuses a file that ends early, but not a JPEG whose scan data stops at an end marker before the
    claimed size is filled: libjpeg fills the rest with grey and only warns. A Huffman-coded JPEG spends at
    least one bit on every 8×8 block of every component (its DC code), so fewer bytes than blocks / 8 cannot
    hold the image the header claims.
    """
    with path.open("rb") as fh:
        if os.fstat(fh.fileno()).st_size < 32:
            return  # too short for any header: Pillow names the problem
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            frame = None
            if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
                width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
            elif data[:2] == b"\xff\xd8" and (frame := _jpeg_frame(data)):
                width, height, blocks, scan_bytes = frame
            else:
                return
    if width * height > MAX_IMAGE_PIXELS:
        raise PrepareError(
            f"it claims {width}×{height} px ({width * height / 1e6:.0f} megapixels), more than the "
            f"{MAX_IMAGE_PIXELS // 10**6} megapixels prepare accepts; downscale it"
        )
    if frame and 8 * scan_bytes < blocks:
        raise PrepareError(
            f"it is truncated: {scan_bytes} bytes of JPEG data cannot fill the {width}×{height} px its header "
            f"claims (at least {_ceil(blocks, 8)} bytes)"
        )


def load_image(path: Path, size: int) -> bytes:
    """Raw uint8 RGB pixels of `path` resized to size×size (row-major, size*size*3 bytes)."""
    try:
        check_image_claims(path)
        # A truncated file must fail, never be padded with grey; another library may have turned this switch on.
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        # Only the formats ISIC images come in: no other Pillow decoder ever sees these files.
        with Image.open(path, formats=IMAGE_FORMATS) as image:
            # JPEG only: decode directly at 1/2, 1/4 or 1/8 scale when still ≥ size (much faster on big images).
            image.draft("RGB", (size, size))
            rgb = image.convert("RGB")
    except (PrepareError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
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
