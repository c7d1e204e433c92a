"""Synthetic skin-lesion data in the ISIC 2019 layout, for demos and tests.

    python -m tools.demo_data --out demo/isic --images 640 --seed 0 --size 96
    python -m tools.demo_data --out demo/isic-big --images 4000 --sizes isic     # ISIC-like JPEG sizes

writes
    DIR/ISIC_2019_Training_Input/ISIC_0000000.jpg …   (as the official zip unpacks)
    DIR/ISIC_2019_Training_GroundTruth.csv            image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK (1.0/0.0)
    DIR/ISIC_2019_Training_Metadata.csv               image,age_approx,anatom_site_general,lesion_id,sex

Each class has its own look (colour, border irregularity, texture) with random position, size,
skin tone, hairs and noise, so a small CNN at 32–64 px can learn it but no single pixel gives it
away. Age, site and sex depend on the class; counts follow ISIC 2019's imbalance with a floor per
class so that every class has enough lesions for train/val/test even at 200 images; a few rows
are UNK; some metadata is missing; lesions have 1–4 images and some rows have no lesion_id.
The same seed gives byte-identical files. The folder is built next to DIR and renamed into place.

`--sizes isic` writes ISIC 2019's mix of sizes instead of --size px squares (`ISIC_SIZES`: mostly
600×450 and 1024×1024, some 1024×768, a few 4000×3000) so that prepare and the benchmarks pay
realistic decode costs. The lesion is drawn at ≤ DRAW_SIZE px and upscaled, plus full-size grain
(otherwise a big JPEG would be mostly flat blocks, far cheaper to decode than a photo);
`--scale 0.05` shrinks every size (for tests). `--workers` spreads the images over processes.
"""

from __future__ import annotations

import csv
import io
import math
import os
import shutil
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from utilities.data.schema import (
    CLASS_NAMES,
    GROUND_TRUTH_COLUMNS,
    GROUND_TRUTH_CSV,
    IMAGE_DIR,
    METADATA_COLUMNS,
    METADATA_CSV,
    SITES,
)
from utilities.errors import JobError, OneLineParser

# Images per class in the real ISIC 2019 training set (25,331 images): the imbalance we imitate.
ISIC_2019_COUNTS: dict[str, int] = {
    "MEL": 4522,
    "NV": 12875,
    "BCC": 3323,
    "AK": 867,
    "BKL": 2624,
    "DF": 239,
    "VASC": 253,
    "SCC": 628,
}
# Minimum images per class; decreasing in the same order as the real counts, so the order survives
# small --images, and each class gets ≥ 5 lesion groups (enough for train, val and test).
CLASS_FLOORS: dict[str, int] = {"MEL": 16, "NV": 24, "BCC": 14, "AK": 10, "BKL": 12, "DF": 6, "VASC": 6, "SCC": 8}
MIN_GROUPS_PER_CLASS = 5
MAX_IMAGES_PER_LESION = 4
MEAN_IMAGES_PER_LESION = 1.6
MIN_IMAGES = 100
MIN_SIZE = 16
JPEG_QUALITY = 92
# ISIC 2019's image sizes (width, height, share of images): HAM10000's 600×450, BCN_20000's 1024×1024,
# 1024×768 from other sources, and a few full-resolution camera images (ISIC has up to 6000×4000).
ISIC_SIZES: tuple[tuple[int, int, float], ...] = (
    (600, 450, 0.45),
    (1024, 768, 0.15),
    (1024, 1024, 0.35),
    (4000, 3000, 0.05),
)
DRAW_SIZE = 128  # --sizes isic draws the lesion at ≤ this px and upscales it: drawing at full size takes seconds
GRAIN = 5  # ± pixel levels of full-size grain on --sizes isic images
SIZES = ("square", "isic")  # --sizes choices
GRAIN_TILE = 256  # grain is one random tile repeated: full-size random numbers cost more than the JPEG


class DemoDataError(JobError, ValueError):
    """Bad arguments or output folder; the message is one line."""


@dataclass(frozen=True)
class Look:
    """How lesions of one class are drawn. Colours are RGB 0..255; lengths in units of half the image."""

    colour: tuple[float, float, float]
    colour2: tuple[float, float, float]  # second colour used by the texture
    irregular: float  # amplitude of border harmonics; 0 = smooth ellipse
    aspect: tuple[float, float]  # range of minor/major axis ratio
    edge: float  # width of the soft border
    texture: str


LOOKS: dict[str, Look] = {
    "MEL": Look((70, 45, 35), (95, 105, 135), 0.28, (0.6, 1.0), 0.04, "mottled"),
    "NV": Look((135, 88, 62), (120, 78, 55), 0.04, (0.8, 1.0), 0.05, "uniform"),
    "BCC": Look((215, 150, 150), (165, 35, 50), 0.10, (0.7, 1.0), 0.06, "vessels"),
    "AK": Look((190, 95, 80), (235, 210, 190), 0.12, (0.6, 0.9), 0.15, "scaly"),
    "BKL": Look((165, 120, 80), (85, 58, 40), 0.08, (0.7, 1.0), 0.03, "cracks"),
    "DF": Look((140, 90, 70), (228, 210, 200), 0.05, (0.8, 1.0), 0.08, "ring"),
    "VASC": Look((150, 40, 75), (85, 15, 45), 0.05, (0.8, 1.0), 0.02, "lobules"),
    "SCC": Look((205, 112, 100), (238, 222, 160), 0.20, (0.6, 1.0), 0.07, "keratin"),
}

# Metadata per class: (mean age, sd of age), P(male), weights over utilities.data.schema.SITES (anterior
# torso, head/neck, lateral torso, lower extremity, oral/genital, palms/soles, posterior torso, upper extremity).
AGE: dict[str, tuple[float, float]] = {
    "MEL": (58, 15),
    "NV": (42, 15),
    "BCC": (66, 12),
    "AK": (70, 10),
    "BKL": (62, 13),
    "DF": (45, 13),
    "VASC": (48, 18),
    "SCC": (71, 11),
    "UNK": (55, 16),
}
P_MALE: dict[str, float] = {
    "MEL": 0.58,
    "NV": 0.50,
    "BCC": 0.56,
    "AK": 0.62,
    "BKL": 0.55,
    "DF": 0.35,
    "VASC": 0.50,
    "SCC": 0.63,
    "UNK": 0.5,
}
SITE_WEIGHTS: dict[str, tuple[float, ...]] = {
    "MEL": (0.15, 0.12, 0.03, 0.20, 0.01, 0.02, 0.25, 0.22),
    "NV": (0.25, 0.05, 0.03, 0.22, 0.01, 0.03, 0.28, 0.13),
    "BCC": (0.12, 0.45, 0.02, 0.08, 0.01, 0.01, 0.20, 0.11),
    "AK": (0.05, 0.65, 0.01, 0.05, 0.01, 0.01, 0.03, 0.19),
    "BKL": (0.15, 0.30, 0.03, 0.10, 0.01, 0.01, 0.20, 0.20),
    "DF": (0.05, 0.02, 0.01, 0.62, 0.01, 0.01, 0.05, 0.23),
    "VASC": (0.20, 0.15, 0.05, 0.25, 0.05, 0.05, 0.10, 0.15),
    "SCC": (0.05, 0.55, 0.01, 0.12, 0.02, 0.02, 0.05, 0.18),
    "UNK": (0.125,) * 8,
}
P_MISSING = {"age": 0.025, "site": 0.06, "sex": 0.02}
P_NO_LESION_ID = 0.35  # of single-image lesions


@dataclass(frozen=True)
class Row:
    label: str  # a CLASS_NAMES entry or "UNK"
    lesion_id: str  # "" = not known (its own group)
    age: float | None
    site: str | None
    sex: str | None


def class_counts(images: int) -> dict[str, int]:
    """Images per class (UNK included) summing to `images`: floors plus the rest split like ISIC 2019."""
    if images < MIN_IMAGES:
        raise DemoDataError(
            f"--images {images} is too small; at least {MIN_IMAGES} are needed for every class in every split"
        )
    unk = max(2, round(images / 100))
    spare = images - unk - sum(CLASS_FLOORS.values())
    total = sum(ISIC_2019_COUNTS.values())
    shares = {c: spare * ISIC_2019_COUNTS[c] / total for c in CLASS_NAMES}
    counts = {c: CLASS_FLOORS[c] + math.floor(shares[c]) for c in CLASS_NAMES}
    # Largest remainder: hand out the images lost to flooring, biggest fractional parts first.
    leftover = images - unk - sum(counts.values())
    for c in sorted(CLASS_NAMES, key=lambda c: (-(shares[c] % 1), CLASS_NAMES.index(c)))[:leftover]:
        counts[c] += 1
    counts["UNK"] = unk
    return counts


def _lesion_sizes(count: int, rng: np.random.Generator) -> list[int]:
    """Split `count` images into lesion groups of 1..MAX_IMAGES_PER_LESION images."""
    groups = min(count, max(MIN_GROUPS_PER_CLASS, round(count / MEAN_IMAGES_PER_LESION)))
    sizes = [1] * groups
    for _ in range(count - groups):
        open_groups = [i for i, s in enumerate(sizes) if s < MAX_IMAGES_PER_LESION]
        sizes[open_groups[int(rng.integers(len(open_groups)))]] += 1
    return sizes


def _lesion_metadata(label: str, rng: np.random.Generator) -> tuple[float | None, str | None, str | None]:
    mean, sd = AGE[label]
    age = float(min(85, max(0, 5 * round(rng.normal(mean, sd) / 5))))
    weights = np.asarray(SITE_WEIGHTS[label])
    site = SITES[int(rng.choice(len(SITES), p=weights / weights.sum()))]
    sex = "male" if rng.random() < P_MALE[label] else "female"
    missing = rng.random(3) < (P_MISSING["age"], P_MISSING["site"], P_MISSING["sex"])
    return (None if missing[0] else age, None if missing[1] else site, None if missing[2] else sex)


def make_rows(images: int, rng: np.random.Generator) -> list[Row]:
    """All rows in a shuffled order (image ids are then given in this order)."""
    lesions: list[tuple[str, int]] = []  # (label, number of images)
    for label, count in class_counts(images).items():
        sizes = [1] * count if label == "UNK" else _lesion_sizes(count, rng)
        lesions += [(label, s) for s in sizes]
    order = rng.permutation(len(lesions))
    first_number = int(rng.integers(0, 5000))
    rows: list[Row] = []
    for n, i in enumerate(order):
        label, size = lesions[i]
        lesion_id = f"HAM_{first_number + n:07d}"
        if size == 1 and rng.random() < P_NO_LESION_ID:
            lesion_id = ""
        age, site, sex = _lesion_metadata(label, rng)
        rows += [Row(label, lesion_id, age, site, sex)] * size
    return [rows[i] for i in rng.permutation(len(rows))]


# ---------------------------------------------------------------- drawing


def _smooth_noise(size: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    """Random field in 0..1, float32 [size, size], varying over about size/cells pixels."""
    small = Image.fromarray(rng.random((cells, cells)).astype(np.float32))
    return np.asarray(small.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32).clip(0, 1)


def _stripes(u: np.ndarray, v: np.ndarray, freq: float, width: float, rng: np.random.Generator) -> np.ndarray:
    """1 on thin parallel lines at a random angle, else 0; u, v in half-image units."""
    a = rng.uniform(0, math.pi)
    return (np.abs(np.sin(freq * (u * math.cos(a) + v * math.sin(a)) + rng.uniform(0, 6.3))) < width).astype(np.float32)


def _blob(size: int, look: Look, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Soft lesion mask in 0..1, relative radius (0 centre, 1 border) and rotated coordinates u, v."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) * 2 - 1  # [-1, 1]
    cx, cy = rng.uniform(-0.15, 0.15, 2)
    angle = rng.uniform(0, 2 * math.pi)
    aspect = rng.uniform(*look.aspect)
    u = (xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle)
    v = (-(xx - cx) * math.sin(angle) + (yy - cy) * math.cos(angle)) / aspect
    dist, theta = np.hypot(u, v), np.arctan2(v, u)
    radius = rng.uniform(0.35, 0.6) * np.ones_like(theta)
    for k in range(2, 7):  # border harmonics: irregular classes get ragged borders
        radius *= 1 + look.irregular * rng.uniform(0, 1) / math.sqrt(k) * np.cos(k * theta + rng.uniform(0, 6.3))
    if look.texture == "lobules":  # a cluster of small round lobes instead of one blob
        dist, radius = _lobules(u, v, rng)
    mask = 1 / (1 + np.exp((dist - radius) / look.edge))
    return mask.astype(np.float32), (dist / radius).astype(np.float32), u, v


def _lobules(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Distance to the nearest of 3–5 lobes, and their common radius."""
    lobes = int(rng.integers(3, 6))
    r = rng.uniform(0.16, 0.24)
    centres = rng.uniform(-0.3, 0.3, (lobes, 2))
    dist = np.min([np.hypot(u - x, v - y) for x, y in centres], axis=0)
    return dist, np.full_like(dist, r)


def _texture(
    look: Look, size: int, rel: np.ndarray, u: np.ndarray, v: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Lesion colour field, float32 [size, size, 3]."""
    jitter = rng.uniform(0.85, 1.15) * rng.uniform(0.93, 1.07, 3)
    c1, c2 = np.asarray(look.colour) * jitter, np.asarray(look.colour2) * jitter
    mix = np.zeros((size, size), np.float32)  # 0 → colour, 1 → colour2
    if look.texture == "mottled":
        mix = (_smooth_noise(size, 5, rng) > 0.55).astype(np.float32) * 0.8
    elif look.texture == "vessels":
        mix = np.maximum(_stripes(u, v, 9, 0.12, rng), _stripes(u, v, 7, 0.12, rng))
    elif look.texture == "scaly":
        mix = (rng.random((size, size)) > 0.6).astype(np.float32) * 0.7
    elif look.texture == "cracks":
        mix = np.maximum(_stripes(u, v, 14, 0.18, rng), _stripes(u, v, 14, 0.18, rng))
    elif look.texture == "ring":
        mix = np.clip((0.55 - rel) / 0.2, 0, 1)
    elif look.texture == "lobules":
        mix = _smooth_noise(size, 4, rng) * 0.6
    elif look.texture == "keratin":
        mix = np.clip((0.45 - rel) / 0.15, 0, 1) * (0.7 + 0.3 * rng.random((size, size)))
    return c1 * (1 - mix[..., None]) + c2 * mix[..., None]


def _skin(size: int, rng: np.random.Generator) -> np.ndarray:
    """Skin background with a lighting gradient, float32 [size, size, 3]."""
    tone = np.asarray([225, 180, 160]) * rng.uniform(0.75, 1.08) + rng.normal(0, 8, 3)
    light = 0.85 + 0.3 * _smooth_noise(size, 2, rng)
    return tone * light[..., None]


def _hairs(image: np.ndarray, rng: np.random.Generator) -> None:
    """Up to 3 dark hairs drawn in place: class-independent clutter."""
    size = image.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(int(rng.integers(0, 4))):
        x0, y0, a = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(0, math.pi)
        dist = np.abs((xx - x0) * math.sin(a) - (yy - y0) * math.cos(a))
        image *= 1 - 0.6 * np.clip(1 - dist / max(0.6, size / 120), 0, 1)[..., None]


def draw(label: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One lesion image, uint8 [size, size, 3]. UNK rows borrow a random class's look."""
    if label not in LOOKS:
        label = CLASS_NAMES[int(rng.integers(len(CLASS_NAMES)))]
    look = LOOKS[label]
    mask, rel, u, v = _blob(size, look, rng)
    lesion = _texture(look, size, rel, u, v, rng)
    image = _skin(size, rng) * (1 - mask[..., None]) + lesion * mask[..., None]
    _hairs(image, rng)
    image += rng.normal(0, 6, image.shape)  # sensor noise, in pixel levels
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def isic_dims(seed: int, index: int, scale: float = 1.0) -> tuple[int, int]:
    """(width, height) of image `index` under --sizes isic: drawn from ISIC_SIZES by (seed, index) alone."""
    shares = np.asarray([share for _, _, share in ISIC_SIZES])
    pick = int(np.random.default_rng([seed, index, 1]).choice(len(ISIC_SIZES), p=shares / shares.sum()))
    width, height, _ = ISIC_SIZES[pick]
    return max(MIN_SIZE, round(width * scale)), max(MIN_SIZE, round(height * scale))


def draw_sized(label: str, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A width×height lesion image, uint8 [height, width, 3]: drawn small, upscaled, then full-size grain."""
    small = draw(label, min(DRAW_SIZE, width, height), rng)
    big = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    tile = rng.integers(-GRAIN, GRAIN + 1, (GRAIN_TILE, GRAIN_TILE, 3), dtype=np.int16)
    reps = (math.ceil(height / GRAIN_TILE), math.ceil(width / GRAIN_TILE), 1)
    big += np.tile(tile, reps)[:height, :width]
    return np.clip(big, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class ImageJob:
    """Everything one image depends on, so images can be drawn in any process in any order."""

    path: Path
    label: str
    seed: int
    index: int
    size: int  # px of the square image; ignored when isic
    isic: bool
    scale: float


def write_image(job: ImageJob) -> None:
    # One generator per image, derived from (seed, index): the look never depends on the other rows.
    rng = np.random.default_rng([job.seed, job.index])
    if job.isic:
        pixels = draw_sized(job.label, *isic_dims(job.seed, job.index, job.scale), rng)
    else:
        pixels = draw(job.label, job.size, rng)
    job.path.write_bytes(_jpeg(pixels))


# ---------------------------------------------------------------- files


def _csv_text(header: tuple[str, ...], rows: list[list[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _csv_rows(rows: list[Row]) -> tuple[list[list[str]], list[list[str]]]:
    truth, meta = [], []
    for i, row in enumerate(rows):
        image = f"ISIC_{i:07d}"
        truth.append([image] + ["1.0" if row.label == c else "0.0" for c in (*CLASS_NAMES, "UNK")])
        age = "" if row.age is None else f"{row.age:.1f}"
        meta.append([image, age, row.site or "", row.lesion_id, row.sex or ""])
    return truth, meta


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DemoDataError(f"--out {out} already exists and is not an empty folder; remove it or choose another")


def _check_arguments(size: int, sizes: str, scale: float, workers: int) -> None:
    if size < MIN_SIZE:
        raise DemoDataError(f"--size {size} is too small; use at least {MIN_SIZE} px")
    if sizes not in SIZES:
        raise DemoDataError(f"--sizes {sizes!r} is not one of {', '.join(SIZES)}")
    if not 0 < scale <= 1:
        raise DemoDataError(f"--scale {scale} must be in (0, 1]")
    if workers < 1:
        raise DemoDataError("--workers must be at least 1")


def _write_images(folder: Path, rows: list[Row], jobs: dict, workers: int) -> None:
    todo = [ImageJob(folder / f"ISIC_{i:07d}.jpg", row.label, index=i, **jobs) for i, row in enumerate(rows)]
    if workers == 1:
        for job in todo:
            write_image(job)
        return
    with ProcessPoolExecutor(workers) as pool:  # images are independent: the same bytes in any process
        for _ in pool.map(write_image, todo, chunksize=16):
            pass


def write_demo(
    out: Path,
    images: int = 640,
    seed: int = 0,
    size: int = 96,
    sizes: str = "square",
    scale: float = 1.0,
    workers: int = 1,
) -> Path:
    """Write the demo folder at `out` (must be new or empty) and return it.

    sizes="square": size×size JPEGs. sizes="isic": ISIC_SIZES scaled by `scale` (see the module docstring).
    """
    out = Path(out)
    _check_arguments(size, sizes, scale, workers)
    _check_out(out)
    rng = np.random.default_rng(seed)
    rows = make_rows(images, rng)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (staging / IMAGE_DIR).mkdir()
        jobs = dict(seed=seed, size=size, isic=sizes == "isic", scale=scale)
        _write_images(staging / IMAGE_DIR, rows, jobs, workers)
        truth, meta = _csv_rows(rows)
        (staging / GROUND_TRUTH_CSV).write_text(_csv_text(GROUND_TRUTH_COLUMNS, truth), encoding="utf-8")
        (staging / METADATA_CSV).write_text(_csv_text(METADATA_COLUMNS, meta), encoding="utf-8")
        _check_out(out)  # again: something may have appeared meanwhile
        os.replace(staging, out)  # atomic; also replaces an empty folder
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m tools.demo_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="new folder to create")
    parser.add_argument(
        "--images", type=int, default=640, help=f"number of images, at least {MIN_IMAGES} (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--size", type=int, default=96, help="side of the square JPEGs in px (default: %(default)s)")
    parser.add_argument(
        "--sizes", choices=SIZES, default="square", help="square: --size px; isic: ISIC 2019's mix of JPEG sizes"
    )
    parser.add_argument("--scale", type=float, default=1.0, help="--sizes isic: shrink every size by this factor")
    parser.add_argument("--workers", type=int, default=1, help="processes drawing images (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        out = write_demo(args.out, args.images, args.seed, args.size, args.sizes, args.scale, args.workers)
    except (DemoDataError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    counts = class_counts(args.images)
    print(f"wrote {args.images} images to {out} ({', '.join(f'{c} {n}' for c, n in counts.items())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
