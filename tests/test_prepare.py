"""Tests of ISIC folder → shards + manifest: `.venv/bin/python -m pytest tests/test_prepare.py -q`."""

from __future__ import annotations

import csv
import logging
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.data import Prepared
from tools import prepare as prep
from tools.prepare import MANIFEST_NAME, PrepareError, prepare
from utilities.data.pipeline import load_manifest
from utilities.data.schema import CLASS_NAMES, GROUND_TRUTH_CSV, IMAGE_DIR, METADATA_CSV, METADATA_NAMES, SPLITS
from utilities.data.shards import file_sha256, verify_shard

ROOT = Path(__file__).resolve().parent.parent


def _csv(folder: Path, name: str) -> list[dict[str, str]]:
    with (folder / name).open(newline="") as fh:
        return list(csv.DictReader(fh))


def _write_csv(folder: Path, name: str, rows: list[dict[str, str]], columns: list[str] | None = None) -> None:
    columns = columns or list(rows[0])
    with (folder / name).open("w", newline="") as fh:
        writer = csv.DictWriter(fh, columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _lesions(demo_dir: Path) -> dict[str, str]:
    """image → group key, as prepare defines it."""
    return {r["image"]: r["lesion_id"] or f"image:{r['image']}" for r in _csv(demo_dir, METADATA_CSV)}


def _shard_names(manifest: dict[str, Any]) -> list[str]:
    return [uri.split("/data/")[-1] for split in SPLITS for uri in manifest[split]]


# ---------------------------------------------------------------- the manifest and the split


def test_manifest_contents(prepared: Prepared, demo_dir: Path) -> None:
    manifest = pickle.loads(prepared.manifest_path.read_bytes())
    assert manifest == prepared.manifest
    assert manifest["schema"] == {
        "class_names": list(CLASS_NAMES),
        "metadata_names": list(METADATA_NAMES),
        "image_shape": [32, 32, 3],
        "image_encoding": "raw_uint8",
    }
    unk = sum(1 for r in _csv(demo_dir, GROUND_TRUTH_CSV) if r["UNK"] == "1.0")
    assert manifest["counts"]["skipped_unk"] == unk >= 2
    shards = [uri for split in SPLITS for uri in manifest[split]]
    assert set(manifest["sha256"]) == set(shards)
    for split in SPLITS:
        assert manifest[split] == [
            str(prepared.root / split / f"{i:04d}.tfrecords") for i in range(len(manifest[split]))
        ]
        records = sum(verify_shard(uri) for uri in manifest[split])
        assert records == sum(manifest["counts"][split].values()) == len(manifest["images"][split])
    assert all(Path(uri).is_absolute() and file_sha256(uri) == digest for uri, digest in manifest["sha256"].items())
    assert datetime.fromisoformat(manifest["created"]).tzinfo is not None
    assert manifest["source"]["image_count"] + unk == 240 and manifest["source"]["seed"] == 0
    assert sorted(p.name for p in prepared.root.iterdir()) == ["test", "train", "val", MANIFEST_NAME]  # no staging left


def test_every_class_in_every_split_in_proportion(prepared: Prepared) -> None:
    counts = prepared.manifest["counts"]
    total = {c: sum(counts[s][c] for s in SPLITS) for c in CLASS_NAMES}
    for split in SPLITS:
        assert all(counts[split][c] >= 1 for c in CLASS_NAMES), (split, counts[split])
    assert counts["train"]["NV"] > counts["train"]["MEL"] > counts["train"]["DF"]
    for split, share in (("val", 0.15), ("test", 0.15), ("train", 0.7)):
        assert abs(sum(counts[split].values()) / sum(total.values()) - share) < 0.06


def test_no_lesion_in_two_splits(prepared: Prepared, demo_dir: Path) -> None:
    group = _lesions(demo_dir)
    groups = {s: {group[i] for i in prepared.manifest["images"][s]} for s in SPLITS}
    assert (
        not groups["train"] & groups["val"]
        and not groups["train"] & groups["test"]
        and not groups["val"] & groups["test"]
    )
    shared = [g for g in set(group.values()) if list(group.values()).count(g) > 1]
    assert len(shared) > 10  # the check above was not vacuous


def test_same_seed_same_shards_other_seed_other_split(demo_dir: Path, prepared: Prepared, tmp_path: Path) -> None:
    again = prepare(demo_dir, tmp_path / "data", image_size=32, shard_size=40, seed=0)
    assert _shard_names(again) == _shard_names(prepared.manifest)
    assert sorted(again["sha256"].values()) == sorted(prepared.manifest["sha256"].values())
    other = prepare(demo_dir, tmp_path / "other", image_size=32, shard_size=40, seed=1)
    assert other["images"]["test"] != prepared.manifest["images"]["test"]


def _prepare_in_subprocess(demo_dir: Path, out: Path, hash_seed: str, *extra: str) -> dict[str, bytes]:
    """Run `python -m tools.prepare` in a fresh interpreter; return every file it wrote, by relative path."""
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    argv = ["--input", str(demo_dir), "--out", str(out), "--image-size", "16", "--shard-size", "50", "--seed", "3"]
    argv += extra
    result = subprocess.run(
        [sys.executable, "-m", "tools.prepare", *argv], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_two_processes_write_identical_bytes(demo_dir: Path, tmp_path: Path) -> None:
    """Same input and seed, two interpreters (other hash seeds): the same shard bytes and manifest."""
    out = tmp_path / "data"  # the same --out both times: the URIs in the manifest are the same too
    first = _prepare_in_subprocess(demo_dir, out, "1")
    second = _prepare_in_subprocess(demo_dir, out, "2", "--overwrite")
    assert first.keys() == second.keys() and len(first) > 4
    differ = [name for name in first if name != MANIFEST_NAME and first[name] != second[name]]
    assert differ == [], f"{len(differ)} of {len(first) - 1} shards differ, e.g. {differ[:2]}"
    manifests = [pickle.loads(files[MANIFEST_NAME]) for files in (first, second)]
    assert manifests[0]["sha256"] == manifests[1]["sha256"]
    # Byte-identical apart from `created` (an ISO time of fixed length, so it can be swapped in place).
    created = [m["created"].encode() for m in manifests]
    assert first[MANIFEST_NAME].replace(created[0], created[1]) == second[MANIFEST_NAME]


def test_limit_takes_whole_lesions_and_keeps_every_class(demo_dir: Path, tmp_path: Path) -> None:
    manifest = prepare(demo_dir, tmp_path / "small", image_size=16, shard_size=50, seed=0, limit=150)
    chosen = [i for s in SPLITS for i in manifest["images"][s]]
    assert 140 <= len(chosen) <= 150 and manifest["source"]["limit"] == 150
    group = _lesions(demo_dir)
    labelled = {r["image"] for r in _csv(demo_dir, GROUND_TRUTH_CSV) if r["UNK"] != "1.0"}
    for image in chosen:  # every image of a chosen lesion is chosen too
        assert {i for i in labelled if group[i] == group[image]} <= set(chosen)
    assert all(manifest["counts"][s][c] >= 1 for s in SPLITS for c in CLASS_NAMES)
    assert (
        prepare(demo_dir, tmp_path / "again", image_size=16, shard_size=50, seed=0, limit=150)["images"]
        == manifest["images"]
    )


def test_overwrite_replaces_a_local_output(demo_dir: Path, tmp_path: Path) -> None:
    first = prepare(demo_dir, tmp_path / "data", image_size=16, shard_size=20, seed=0)
    second = prepare(demo_dir, tmp_path / "data", image_size=16, shard_size=100, seed=0, overwrite=True)
    assert len(second["train"]) < len(first["train"])
    assert load_manifest(tmp_path / "data" / MANIFEST_NAME).raw == second
    files = sorted(str(p.relative_to(tmp_path / "data")) for p in (tmp_path / "data").rglob("*") if p.is_file())
    assert files == sorted([MANIFEST_NAME, *_shard_names(second)])


def test_progress_is_logged_per_image(
    demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """In a log (not a terminal): a line every LOG_SECONDS (0 here: every image) with rate and ETA, and a total."""
    monkeypatch.setattr("utilities.progress.LOG_SECONDS", 0.0)
    monkeypatch.setattr("sys.stdout.isatty", lambda: False)
    with caplog.at_level(logging.INFO, logger="utilities.progress"):
        manifest = prepare(demo_dir, tmp_path / "data", image_size=16, shard_size=100, seed=0, limit=150)
    total = sum(len(v) for v in manifest["images"].values())
    lines = [r.getMessage() for r in caplog.records]
    assert f"prepare image 1/{total} (" in lines[0] and "images/s, ETA" in lines[0], lines[:2]
    assert lines[-1].startswith(f"prepare: {total} images in "), lines[-1]


def test_interrupted_run_leaves_no_manifest(demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = prep.example_bytes

    def dies_midway(pixels: bytes, record: prep.Record) -> bytes:
        calls["n"] += 1
        if calls["n"] == 100:  # after two full shards
            raise KeyboardInterrupt
        return real(pixels, record)

    monkeypatch.setattr(prep, "example_bytes", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        prepare(demo_dir, tmp_path / "data", image_size=16, shard_size=40, seed=0)
    assert not (tmp_path / "data").exists()  # the --out it created is gone: nothing of the run is left
    (tmp_path / "mine").mkdir()  # a folder that was there before stays, empty
    with pytest.raises(KeyboardInterrupt):
        calls["n"] = 0
        prepare(demo_dir, tmp_path / "mine", image_size=16, shard_size=40, seed=0)
    assert list((tmp_path / "mine").iterdir()) == []


def test_images_are_resized_in_threads_same_as_serial(demo_dir: Path, tmp_path: Path) -> None:
    serial = prepare(demo_dir, tmp_path / "one", image_size=20, shard_size=300, seed=0, workers=1)
    threaded = prepare(demo_dir, tmp_path / "four", image_size=20, shard_size=300, seed=0, workers=4)
    assert sorted(serial["sha256"].values()) == sorted(threaded["sha256"].values())


# ---------------------------------------------------------------- bad input


@pytest.fixture
def isic_copy(demo_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(demo_dir, tmp_path / "isic"))


def _edit_truth(
    edit: Callable[[list[dict[str, str]]], None], columns: list[str] | None = None
) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        rows = _csv(folder, GROUND_TRUTH_CSV)
        edit(rows)
        _write_csv(folder, GROUND_TRUTH_CSV, rows, columns)

    return apply


def _edit_meta(
    edit: Callable[[list[dict[str, str]]], None], columns: list[str] | None = None
) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        rows = _csv(folder, METADATA_CSV)
        edit(rows)
        _write_csv(folder, METADATA_CSV, rows, columns)

    return apply


def _first(rows: list[dict[str, str]], label: str) -> dict[str, str]:
    return next(r for r in rows if r[label] == "1.0")


def _set(row: dict[str, str], **values: str) -> None:
    row.update(values)


def _relabel_all(rows: list[dict[str, str]], old: str, new: str) -> None:
    for row in rows:
        if row[old] == "1.0":
            row.update({old: "0.0", new: "1.0"})


def _one_lesion_for(label: str) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        images = {r["image"] for r in _csv(folder, GROUND_TRUTH_CSV) if r[label] == "1.0"}
        _edit_meta(lambda rows: [r.update(lesion_id="HAM_9999999") for r in rows if r["image"] in images])(folder)

    return apply


def _replace_image(index: int, data: bytes | None) -> Callable[[Path], None]:
    """Delete or overwrite the index-th labelled (non-UNK) image."""

    def apply(folder: Path) -> None:
        image = [r["image"] for r in _csv(folder, GROUND_TRUTH_CSV) if r["UNK"] != "1.0"][index]
        path = folder / IMAGE_DIR / f"{image}.jpg"
        path.unlink() if data is None else path.write_bytes(data)

    return apply


TRUTH = ["image", *CLASS_NAMES, "UNK"]
META = ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"]
BAD_INPUTS: dict[str, tuple[Callable[[Path], None], str]] = {
    "truth missing column": (
        _edit_truth(lambda rows: None, [c for c in TRUTH if c != "DF"]),
        r"bad header .*missing \['DF'\]",
    ),
    "truth extra column": (_edit_truth(lambda rows: None, [*TRUTH, "EXTRA"]), r"unexpected \['EXTRA'\]"),
    "metadata missing column": (
        _edit_meta(lambda rows: None, META[:-1]),
        r"Metadata.csv: bad header .*missing \['sex'\]",
    ),
    "not one-hot": (
        _edit_truth(lambda rows: _set(_first(rows, "NV"), MEL="1.0")),
        r"line \d+ \(ISIC_\d{7}\): label is not one-hot",
    ),
    "no label": (_edit_truth(lambda rows: _set(_first(rows, "NV"), NV="0.0")), r"label is not one-hot"),
    "label not a number": (
        _edit_truth(lambda rows: _set(rows[3], MEL="yes")),
        r"line 5 \(ISIC_0000003\): MEL='yes' is not a number",
    ),
    "unknown site": (
        _edit_meta(lambda rows: _set(rows[0], anatom_site_general="elbow")),
        r"line 2 \(ISIC_0000000\): unknown anatomical site 'elbow'",
    ),
    "unknown sex": (_edit_meta(lambda rows: _set(rows[1], sex="x")), r"line 3 \(ISIC_0000001\): unknown sex 'x'"),
    "bad age": (
        _edit_meta(lambda rows: _set(rows[2], age_approx="42.0")),
        r"line 4 \(ISIC_0000002\): age 42.0 is not one of the bins",
    ),
    "metadata row missing": (_edit_meta(lambda rows: rows.pop(5)), r"no row for 1 image\(s\) .*ISIC_0000005"),
    "duplicate image": (_edit_truth(lambda rows: rows.append(dict(rows[0]))), r"image ISIC_0000000 is listed twice"),
    "image missing": (_replace_image(10, None), r"image (ISIC_\d{7}) is listed in .*/\1.jpg does not exist"),
    "image unreadable": (
        _replace_image(11, b"not a jpeg at all"),
        r"image .*/ISIC_\d{7}.jpg cannot be read: cannot identify",
    ),
    "class without examples": (_edit_truth(lambda rows: _relabel_all(rows, "DF", "NV")), r"class DF has no images"),
    "class in one lesion": (_one_lesion_for("VASC"), r"class VASC has only 1 lesion group\(s\); at least 3"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_line_error_and_no_manifest(case: str, isic_copy: Path, tmp_path: Path) -> None:
    damage, message = BAD_INPUTS[case]
    damage(isic_copy)
    with pytest.raises(PrepareError, match=message) as caught:
        prepare(isic_copy, tmp_path / "out", image_size=16, shard_size=50)
    assert "\n" not in str(caught.value)
    out = tmp_path / "out"
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"val_fraction": 0.0}, r"--val-fraction 0.0 and --test-fraction 0.15 must be in \(0, 1\)"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, r"sum below 1"),
        ({"image_size": 4}, r"--image-size 4 is too small"),
        ({"shard_size": 0}, r"--shard-size must be at least 1"),
        ({"limit": 0}, r"--limit must be at least 1"),
        ({"limit": 10}, r"--limit 10 is too small: 3 lesion groups of every class take \d+ images"),
    ],
)
def test_bad_arguments(arguments: dict[str, Any], message: str, demo_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(PrepareError, match=message):
        prepare(demo_dir, tmp_path / "out", **{"image_size": 16, **arguments})
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()


def test_command_line(demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = ["--input", str(demo_dir), "--out", str(out), "--image-size", "16", "--shard-size", "100", "--seed", "2"]
    assert prep.main(argv) == 0
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and "images/s" in line and str(out / MANIFEST_NAME) in line
    assert prep.main(["--input", str(tmp_path / "nowhere"), "--out", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --input ") and err.count("\n") == 1


# ---------------------------------------------------------------- gs:// output


@pytest.mark.slow
def test_gcs_output_then_fetch_into_cache(demo_dir: Path, tmp_path: Path, gcs_emulator: Any) -> None:
    from utilities.data.pipeline import fetch_shards

    bucket = gcs_emulator.make_bucket("prepare-test")
    out = f"gs://{bucket}/data_v01"
    manifest = prepare(demo_dir, out, image_size=16, shard_size=100, seed=0)
    assert all(uri.startswith(f"{out}/") for s in SPLITS for uri in manifest[s])
    loaded = load_manifest(f"{out}/{MANIFEST_NAME}")
    assert loaded.raw == manifest
    local = fetch_shards(loaded, tmp_path / "cache")
    assert [Path(p).name for p in local["train"]] == [f"{manifest['sha256'][u]}.tfrecords" for u in manifest["train"]]
    assert sum(verify_shard(p) for p in local["train"]) == sum(manifest["counts"]["train"].values())
    first = Path(local["test"][0])
    stamp = first.stat().st_mtime_ns
    assert fetch_shards(loaded, tmp_path / "cache") == local and first.stat().st_mtime_ns == stamp  # reused
    first.write_bytes(b"stale")
    fetch_shards(loaded, tmp_path / "cache")  # an invalid cached copy is downloaded again
    assert file_sha256(first) == manifest["sha256"][manifest["test"][0]]
    with pytest.raises(
        PrepareError, match=r"data_v01 already holds a dataset version \(gs://.*/data_v01/versioned_paths.pickle\)"
    ):
        prepare(demo_dir, out, image_size=16)
