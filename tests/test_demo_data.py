"""Tests of the synthetic ISIC 2019 folder: `.venv/bin/python -m pytest tests/test_demo_data.py -q`."""

from __future__ import annotations

import csv
import itertools
import os
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tools import demo_data
from tools.demo_data import DemoDataError, class_counts, make_rows, write_demo
from utilities.data.schema import (
    CLASS_NAMES,
    GROUND_TRUTH_COLUMNS,
    GROUND_TRUTH_CSV,
    IMAGE_DIR,
    METADATA_COLUMNS,
    METADATA_CSV,
)

ROOT = Path(__file__).resolve().parent.parent


def _rows(folder: Path, name: str) -> list[dict[str, str]]:
    with (folder / name).open(newline="") as fh:
        return list(csv.DictReader(fh))


def _label(row: dict[str, str]) -> str:
    return next(c for c in (*CLASS_NAMES, "UNK") if row[c] == "1.0")


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path: Path) -> None:
    a = write_demo(tmp_path / "a", images=120, seed=3, size=24)
    b = write_demo(tmp_path / "b", images=120, seed=3, size=24)
    c = write_demo(tmp_path / "c", images=120, seed=4, size=24)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 122
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / GROUND_TRUTH_CSV).read_bytes() != (c / GROUND_TRUTH_CSV).read_bytes()


def test_two_processes_write_identical_bytes(tmp_path: Path) -> None:
    """Nothing depends on the interpreter's hash seed (set or dict-of-set order, object ids)."""
    folders = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"run{hash_seed}"
        argv = ["-m", "tools.demo_data", "--out", str(out), "--images", "120", "--seed", "3", "--size", "24"]
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, check=True, capture_output=True)
        folders.append({str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()})
    assert len(folders[0]) == 122 and folders[0] == folders[1]


def test_layout_columns_and_images(demo_dir: Path) -> None:
    truth, meta = _rows(demo_dir, GROUND_TRUTH_CSV), _rows(demo_dir, METADATA_CSV)
    assert tuple(truth[0]) == GROUND_TRUTH_COLUMNS
    assert tuple(meta[0]) == METADATA_COLUMNS
    assert len(truth) == len(meta) == 240
    assert [r["image"] for r in truth] == [r["image"] for r in meta] == [f"ISIC_{i:07d}" for i in range(240)]
    for row in truth:
        values = [row[c] for c in GROUND_TRUTH_COLUMNS[1:]]
        assert sorted(set(values)) == ["0.0", "1.0"] and values.count("1.0") == 1
    with Image.open(demo_dir / IMAGE_DIR / "ISIC_0000007.jpg") as image:
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (48, 48))
    assert len(list((demo_dir / IMAGE_DIR).glob("ISIC_*.jpg"))) == 240


@pytest.mark.parametrize("images", [100, 200, 240, 640, 25331])
def test_class_imbalance_follows_isic_2019(images: int) -> None:
    counts = class_counts(images)
    assert sum(counts.values()) == images
    order = ["NV", "MEL", "BCC", "BKL", "AK", "SCC", "VASC"]
    assert all(counts[a] > counts[b] for a, b in itertools.pairwise(order)), counts
    assert abs(counts["VASC"] - counts["DF"]) <= max(2, 0.1 * counts["VASC"])
    assert min(counts[c] for c in CLASS_NAMES) >= 6 and counts["UNK"] >= 2
    if images >= 200:
        assert counts["NV"] >= 2 * counts["MEL"]


def test_demo_folder_has_imbalance_lesions_and_missing_values(demo_dir: Path) -> None:
    truth, meta = _rows(demo_dir, GROUND_TRUTH_CSV), _rows(demo_dir, METADATA_CSV)
    labels = [_label(r) for r in truth]
    assert Counter(labels) == Counter({c: n for c, n in class_counts(240).items()})
    lesions: dict[str, set[str]] = defaultdict(set)
    for row, label in zip(meta, labels, strict=True):
        if row["lesion_id"]:
            assert row["lesion_id"].startswith("HAM_")
            lesions[row["lesion_id"]].add(label)
    assert all(len(classes) == 1 for classes in lesions.values())  # a lesion has one diagnosis
    sizes = Counter(r["lesion_id"] for r in meta if r["lesion_id"])
    assert max(sizes.values()) >= 3 and min(sizes.values()) == 1
    assert sum(1 for r in meta if not r["lesion_id"]) >= 10
    for column in ("age_approx", "anatom_site_general", "sex"):
        assert any(r[column] == "" for r in meta), column


def test_metadata_depends_on_class() -> None:
    rows = make_rows(3000, np.random.default_rng(0))
    by_class: dict[str, list[demo_data.Row]] = defaultdict(list)
    for row in rows:
        by_class[row.label].append(row)

    def mean_age(label: str) -> float:
        return float(np.mean([r.age for r in by_class[label] if r.age is not None]))

    def share(label: str, key: str, value: str) -> float:
        return float(np.mean([getattr(r, key) == value for r in by_class[label]]))

    assert mean_age("AK") > mean_age("NV") + 15
    assert share("AK", "site", "head/neck") > share("NV", "site", "head/neck") + 0.3
    assert share("DF", "sex", "female") > share("SCC", "sex", "female") + 0.1


def _colour_features(path: Path) -> np.ndarray:
    """Lesion colour relative to the skin, its spread, and the lesion's area: 7 numbers."""
    pixels = np.asarray(Image.open(path).resize((32, 32)), np.float32)
    skin = np.median(np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]), axis=0)
    lesion = np.abs(pixels - skin).sum(axis=-1) > 60
    inside = pixels[lesion] if lesion.sum() >= 3 else pixels.reshape(-1, 3)
    return np.concatenate([inside.mean(axis=0) - skin, inside.std(axis=0), [lesion.mean() * 100]])


def test_images_depend_on_class(demo_dir: Path) -> None:
    """Nearest class centroid on 7 colour features, fitted on half: mean recall far above chance (0.125)."""
    rows = [r for r in _rows(demo_dir, GROUND_TRUTH_CSV) if r["UNK"] != "1.0"]
    x = np.stack([_colour_features(demo_dir / IMAGE_DIR / f"{r['image']}.jpg") for r in rows])
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    y = np.asarray([CLASS_NAMES.index(_label(r)) for r in rows])
    fit, held = np.arange(len(y)) % 2 == 0, np.arange(len(y)) % 2 == 1
    centroids = np.stack([x[fit & (y == c)].mean(axis=0) for c in range(len(CLASS_NAMES))])
    predicted = np.argmin(((x[held][:, None, :] - centroids[None]) ** 2).sum(axis=2), axis=1)
    recalls = [np.mean(predicted[y[held] == c] == c) for c in range(len(CLASS_NAMES))]
    assert np.mean(recalls) > 0.25


def test_bad_arguments_raise_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(DemoDataError, match=r"--images 50 is too small"):
        write_demo(tmp_path / "x", images=50)
    with pytest.raises(DemoDataError, match=r"--size 4 is too small"):
        write_demo(tmp_path / "x", size=4)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(DemoDataError, match=r"not an empty folder"):
        write_demo(tmp_path / "full", images=100, size=16)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # no staging folder left behind


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert demo_data.main(["--out", str(tmp_path / "d"), "--images", "100", "--size", "16", "--seed", "1"]) == 0
    assert "wrote 100 images" in capsys.readouterr().out
    assert demo_data.main(["--out", str(tmp_path / "d"), "--images", "100", "--size", "16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out ") and err.count("\n") == 1


def test_isic_sizes_give_the_isic_mix_of_jpeg_sizes_and_the_same_bytes_in_worker_processes(tmp_path: Path) -> None:
    scale = 0.05  # 600×450 → 30×22: the mix of ISIC 2019 sizes in miniature
    one = write_demo(tmp_path / "one", images=200, seed=2, sizes="isic", scale=scale)
    two = write_demo(tmp_path / "two", images=200, seed=2, sizes="isic", scale=scale, workers=2)
    images = sorted((one / IMAGE_DIR).glob("*.jpg"))
    assert len(images) == 200
    assert all(p.read_bytes() == (two / IMAGE_DIR / p.name).read_bytes() for p in images)
    found = Counter()
    for path in images:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            found[image.size] += 1
    expected = {(round(w * scale), round(h * scale)): share for w, h, share in demo_data.ISIC_SIZES}
    assert set(found) == set(expected)
    for size, share in expected.items():
        assert abs(found[size] / 200 - share) < 0.08, (size, found[size])
    width, height = demo_data.isic_dims(2, 7)
    assert demo_data.isic_dims(2, 7, scale) == (round(width * scale), round(height * scale))  # same pick at any scale


def test_isic_sizes_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(DemoDataError, match=r"--scale 0 must be in"):
        write_demo(tmp_path / "x", sizes="isic", scale=0)
    with pytest.raises(DemoDataError, match=r"--sizes 'huge' is not one of square, isic"):
        write_demo(tmp_path / "x", sizes="huge")
    argv = ["--out", str(tmp_path / "d"), "--images", "100", "--sizes", "isic", "--scale", "0.04", "--workers", "2"]
    assert demo_data.main(argv) == 0
    with Image.open(tmp_path / "d" / IMAGE_DIR / "ISIC_0000000.jpg") as image:
        assert image.size in {(round(w * 0.04), round(h * 0.04)) for w, h, _ in demo_data.ISIC_SIZES}
