"""An ISIC 2019 folder read and checked before anything is written: the two CSVs (strict UTF-8, exact
headers, safe image ids), the records they describe, and each image's header and pixels.

    records, unknown = read_records(Path("demo/isic"))      # [Record], number of UNK rows dropped
    pixels = load_image(record.path, 256)                   # raw uint8 RGB, 256×256, bytes

Images: JPEG or PNG (whatever the suffix), at most MAX_IMAGE_PIXELS as their header claims; a file that
ends early, or a JPEG whose data is too short for the size it claims, is refused with its path. Every
refusal is a `PrepareError`, one line naming the file, line or class. `tools.prepare` splits the records
(`utilities.data.lesion_split`) and writes them as shards.
"""

from __future__ import annotations

import codecs
import csv
import io
import mmap
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

from utilities.data.schema import (
    CLASS_NAMES,
    GROUND_TRUTH_COLUMNS,
    GROUND_TRUTH_CSV,
    IMAGE_DIR,
    METADATA_COLUMNS,
    METADATA_CSV,
    encode_metadata,
)
from utilities.errors import JobError, one_line

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


class PrepareError(JobError, ValueError):
    """Bad input or arguments; the message is one line naming the file, line or class."""


@dataclass(frozen=True)
class Record:
    image: str  # ISIC id, e.g. ISIC_0000000
    path: Path
    label: int  # index into CLASS_NAMES
    group: str  # "lesion:HAM_…", or "image:ISIC_…" when lesion_id is empty
    metadata: tuple[int, ...]  # 28-long multi-hot, utilities.data.schema.encode_metadata


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
