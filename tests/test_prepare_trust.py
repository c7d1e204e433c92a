"""prepare at its trust boundaries: it never destroys a dataset version, and refuses hostile CSVs and images
with one line. `.venv/bin/python -m pytest tests/test_prepare_trust.py -q`

Hostile inputs are built here from the session's demo folder (tests/fixtures/data.py) and its small JPEGs.
"""

from __future__ import annotations

import codecs
import io
import re
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile

from tools import prepare as prep
from tools.prepare import MANIFEST_NAME, PrepareError, prepare
from utilities.data.schema import GROUND_TRUTH_CSV, IMAGE_DIR, METADATA_CSV, SPLITS
from utilities.data.shards import file_sha256

SMALL = {"image_size": 16, "shard_size": 100}  # a whole prepare of the 240 demo images in about a second


@pytest.fixture
def isic_copy(demo_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(demo_dir, tmp_path / "isic"))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _no_image_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(path: Path, size: int) -> bytes:
        raise AssertionError(f"an image was read: {path}")

    monkeypatch.setattr(prep, "load_image", fail)


def _refused_by_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """`python -m tools.prepare ARGV` in-process: exit 2 and exactly one line on stderr, which is returned."""
    assert prep.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


# ---------------------------------------------------------------- a dataset version is never destroyed


def test_second_prepare_into_a_version_is_refused_and_the_version_survives(
    demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "dv"
    manifest = prepare(demo_dir, out, seed=0, **SMALL)
    before = _files(out)
    _no_image_is_read(monkeypatch)  # refused before any image is processed
    with pytest.raises(
        PrepareError, match=re.escape(f"--out {out} already holds a dataset version ({out / MANIFEST_NAME})")
    ):
        prepare(demo_dir, out, seed=1, **SMALL)
    argv = ["--input", str(demo_dir), "--out", str(out), "--seed", "1", "--image-size", "16"]
    assert "pass --overwrite" in _refused_by_main(argv, capsys)
    assert _files(out) == before  # the manifest and every shard, byte for byte
    assert all(file_sha256(uri) == digest for uri, digest in manifest["sha256"].items())


def test_shards_without_a_manifest_are_refused_too(
    demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A version whose manifest was removed (or is on its way) still has shards a tag's manifest names."""
    out = tmp_path / "dv"
    prepare(demo_dir, out, seed=0, **SMALL)
    (out / MANIFEST_NAME).unlink()
    before = _files(out)
    _no_image_is_read(monkeypatch)
    with pytest.raises(PrepareError, match=re.escape(f"already holds a dataset version ({out / 'train'})")):
        prepare(demo_dir, out, seed=1, **SMALL)
    assert _files(out) == before


def test_an_empty_or_unrelated_folder_is_fine(demo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "dv"
    (out / "train").mkdir(parents=True)  # an empty split folder holds no version
    (out / "NOTES.txt").write_text("mine")
    manifest = prepare(demo_dir, out, seed=0, **SMALL)
    assert (out / "NOTES.txt").read_text() == "mine" and (out / MANIFEST_NAME).is_file()
    assert all(Path(uri).is_file() for split in SPLITS for uri in manifest[split])


def test_a_split_folder_with_other_files_is_refused_before_any_image_even_with_overwrite(
    demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "dv"
    (out / "val").mkdir(parents=True)
    (out / "val" / "notes.txt").write_text("mine")
    _no_image_is_read(monkeypatch)  # this check ran only after every shard had been written
    with pytest.raises(PrepareError, match=r"dv/val holds non-shard entries such as 'notes.txt'"):
        prepare(demo_dir, out, overwrite=True, **SMALL)
    assert (out / "val" / "notes.txt").read_text() == "mine"


def test_help_says_what_overwrite_breaks(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        prep.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--overwrite replace the dataset version already in --out" in text
    assert "breaks every registry tag and manifest that points at that folder" in text


@pytest.mark.slow
def test_gcs_shards_without_a_manifest_are_refused(
    demo_dir: Path, gcs_emulator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from utilities import storage

    out = f"gs://{gcs_emulator.make_bucket('prepare-trust')}/dv"
    storage.write_bytes(f"{out}/test/0000.tfrecords", b"a shard some manifest names")
    _no_image_is_read(monkeypatch)
    with pytest.raises(PrepareError, match=re.escape(f"already holds a dataset version ({out}/test)")):
        prepare(demo_dir, out, **SMALL)
    assert storage.read_bytes(f"{out}/test/0000.tfrecords") == b"a shard some manifest names"


# ---------------------------------------------------------------- CSVs


def _rewrite(folder: Path, name: str, edit: Any) -> bytes:
    data = edit((folder / name).read_bytes())
    (folder / name).write_bytes(data)
    return data


LATIN1_SITE = (b"anterior torso", b"anteri\xf3r torso")  # "anteriór torso" in Latin-1: a lone 0xf3


@pytest.mark.parametrize("bom", [b"", codecs.BOM_UTF8], ids=["plain", "bom"])
@pytest.mark.parametrize("name", [METADATA_CSV, GROUND_TRUTH_CSV])
def test_a_csv_that_is_not_utf8_names_the_file_and_byte(
    name: str, bom: bytes, isic_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if name == METADATA_CSV:
        data = _rewrite(isic_copy, name, lambda d: bom + d.replace(*LATIN1_SITE, 1))
    else:  # the third row's image id
        data = _rewrite(isic_copy, name, lambda d: bom + d.replace(b"ISIC_0000002", b"ISIC_000000\xb2", 1))
    offset = next(i for i, b in enumerate(data) if b >= 0x80 and i >= len(bom))
    line = data[:offset].count(b"\n") + 1
    with pytest.raises(PrepareError, match=rf"^{name}: byte {offset} \(line {line}\) is not UTF-8 \(invalid"):
        prep.read_records(isic_copy)
    err = _refused_by_main(["--input", str(isic_copy), "--out", str(isic_copy.parent / "out")], capsys)
    assert f"byte {offset} (line {line})" in err and not (isic_copy.parent / "out").exists()


def test_a_utf8_byte_order_mark_is_accepted(isic_copy: Path, demo_dir: Path) -> None:
    """Excel's "CSV UTF-8" starts with one; the records read are the same as without it."""
    for name in (GROUND_TRUTH_CSV, METADATA_CSV):
        _rewrite(isic_copy, name, lambda d: codecs.BOM_UTF8 + d)

    def rows(folder: Path) -> list[tuple[Any, ...]]:
        return [(r.image, r.label, r.group, r.metadata) for r in prep.read_records(folder)[0]]

    assert rows(isic_copy) == rows(demo_dir)


CSV_DAMAGE: dict[str, tuple[str, Any, str]] = {
    "utf-16": (
        GROUND_TRUTH_CSV,
        lambda d: codecs.BOM_UTF16_LE + d.decode().encode("utf-16-le"),
        rf"^{GROUND_TRUTH_CSV} is UTF-16 \(its byte-order mark says so\); save it as UTF-8$",
    ),
    "one field too many": (
        METADATA_CSV,
        lambda d: d.replace(b"\nISIC_0000004,", b"\nISIC_0000004,x,", 1),
        rf"^{METADATA_CSV} line 6: expected 5 fields, found 6$",
    ),
    "one field too few": (
        GROUND_TRUTH_CSV,
        lambda d: d.rstrip(b"\n").rsplit(b",", 1)[0] + b"\n",  # the last row loses its UNK
        rf"^{GROUND_TRUTH_CSV} line 241: expected 10 fields, found 9$",
    ),
    "stray quote": (
        METADATA_CSV,
        lambda d: d.replace(b"\nISIC_0000003,", b'\n"ISIC_0000003"x,', 1),
        rf"^{METADATA_CSV} line 5: ',' expected after '\"'$",
    ),
    "field larger than the csv limit": (  # a traceback before
        METADATA_CSV,
        lambda d: d.replace(b"\nISIC_0000007,", b"\nISIC_0000007" + b"7" * 200_000 + b",", 1),
        rf"^{METADATA_CSV} line 9: field larger than field limit \(131072\)$",
    ),
    "missing column": (
        GROUND_TRUTH_CSV,
        lambda d: d.replace(b",SCC,", b",", 1),
        r"GroundTruth.csv: bad header image,MEL,NV,BCC,AK,BKL,DF,VASC,UNK; missing \['SCC'\]",
    ),
}


@pytest.mark.parametrize("case", list(CSV_DAMAGE))
def test_csv_damage_is_one_line(case: str, isic_copy: Path) -> None:
    name, damage, message = CSV_DAMAGE[case]
    _rewrite(isic_copy, name, damage)
    with pytest.raises(PrepareError, match=message) as caught:
        prep.read_records(isic_copy)
    assert "\n" not in str(caught.value)


# ---------------------------------------------------------------- images


def _labelled_image(folder: Path) -> Path:
    """The first image prepare stores (not UNK, which it skips)."""
    unk = [
        line.split(",")[0] for line in (folder / GROUND_TRUTH_CSV).read_text().splitlines()[1:] if line.endswith(",1.0")
    ]
    return next(p for p in sorted((folder / IMAGE_DIR).glob("*.jpg")) if p.stem not in unk)


def _jpeg(demo_dir: Path) -> bytes:
    """A small real image: the first demo JPEG (48×48 px, 4:2:0)."""
    return min((demo_dir / IMAGE_DIR).glob("*.jpg")).read_bytes()


def _claim_size(jpeg: bytes, width: int, height: int) -> bytes:
    """`jpeg` with its start-of-frame header patched to claim width×height; the scan data stays as it was."""
    data, pos = bytearray(jpeg), 2
    while data[pos + 1] not in (0xC0, 0xC1, 0xC2):
        pos += 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]
    data[pos + 5 : pos + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _truncated_png() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    data = buffer.getvalue()
    start = data.index(b"IDAT") + 4
    length = struct.unpack(">I", data[start - 8 : start - 4])[0]
    return data[: start + length // 2]  # cut mid-IDAT


def _gif_named_jpg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, format="GIF")
    return buffer.getvalue()


def _scan_start(jpeg: bytes) -> int:
    return jpeg.index(b"\xff\xda")


HOSTILE_IMAGES: dict[str, tuple[Any, str]] = {
    # Before: stored as a flat grey image (mean 128) with only Pillow's DecompressionBombWarning.
    "claims 10000x10000": (lambda j: _claim_size(j, 10000, 10000), r"claims 10000×10000 px \(100 megapixels\)"),
    "claims 10000x10000, data cut": (
        lambda j: _claim_size(j, 10000, 10000)[: _scan_start(j) + 60],
        r"claims 10000×10000 px .*more than the 64 megapixels prepare accepts",
    ),
    # Before: stored silently; libjpeg fills what the scan data does not reach with grey.
    "claims 2000x2000": (
        lambda j: _claim_size(j, 2000, 2000),
        r"it is truncated: \d+ bytes of JPEG data cannot fill the 2000×2000 px its header claims",
    ),
    "png cut mid-IDAT": (lambda j: _truncated_png(), r"image file is truncated"),
    "jpeg cut mid-scan": (lambda j: j[: _scan_start(j) + 200], r"image file is truncated"),
    "gif named .jpg": (lambda j: _gif_named_jpg(), r"cannot identify image file"),  # before: decoded as GIF
}


@pytest.mark.parametrize("case", list(HOSTILE_IMAGES))
def test_hostile_image_is_refused_with_its_id(
    case: str, isic_copy: Path, tmp_path: Path, demo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Some library may have switched Pillow to padding truncated files: prepare must not follow it.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    build, message = HOSTILE_IMAGES[case]
    victim = _labelled_image(isic_copy)
    victim.write_bytes(build(_jpeg(demo_dir)))
    with pytest.raises(PrepareError, match=rf"^image {re.escape(str(victim))} cannot be read: .*{message}") as caught:
        prep.load_image(victim, 16)
    assert "\n" not in str(caught.value)
    out = tmp_path / "out"
    with pytest.raises(PrepareError, match=rf"{victim.name} cannot be read"):
        prepare(isic_copy, out, **SMALL)
    assert not out.exists() or list(out.iterdir()) == []  # no manifest, no shards, no staging left


def test_the_command_line_refuses_a_hostile_image_in_one_line(
    isic_copy: Path, tmp_path: Path, demo_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    victim = _labelled_image(isic_copy)
    victim.write_bytes(_claim_size(_jpeg(demo_dir), 10000, 10000))
    argv = ["--input", str(isic_copy), "--out", str(tmp_path / "out"), "--image-size", "16"]
    assert f"{victim.name} cannot be read: it claims 10000×10000 px" in _refused_by_main(argv, capsys)
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()


def _encoded(pixels: np.ndarray, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def test_real_images_pass_the_checks(tmp_path: Path) -> None:
    """The scan-length bound is a true lower bound: even a flat image with optimized Huffman tables passes."""
    noisy = np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    flat = np.full((1024, 1024, 3), 128, dtype=np.uint8)
    images = {
        "baseline": _encoded(noisy, "JPEG", quality=92),
        "progressive": _encoded(noisy, "JPEG", quality=92, progressive=True),
        "444": _encoded(noisy, "JPEG", quality=92, subsampling=0),
        "restart markers": _encoded(noisy, "JPEG", quality=92, restart_marker_blocks=4),
        "flat optimized": _encoded(flat, "JPEG", quality=50, optimize=True),
        "flat progressive": _encoded(flat, "JPEG", quality=50, optimize=True, progressive=True),
        "png": _encoded(noisy, "PNG"),
    }
    for name, data in images.items():
        path = tmp_path / f"{name}.jpg"
        path.write_bytes(data)
        assert len(prep.load_image(path, 16)) == 16 * 16 * 3, name
