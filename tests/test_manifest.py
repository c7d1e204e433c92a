"""The manifest loader accepts manifests and refuses everything else in one line, cheaply.

    .venv/bin/python -m pytest tests/test_manifest.py -q -s    # -s prints the counts (inputs, refusals, time, memory)

Property-based: hypothesis generates valid manifests (every optional key, every pickle protocol)
and mutates their bytes (flips, truncation, insertion of opcodes, spliced slices); hand-written
hostile pickles come from the issue (a 73-byte `bytes(200_000_000)`, a billion laughs of shared
lists, a list that contains itself, os.system). Each input must give a valid manifest or one
ManifestError line, within 1 s and 50 MB: bounds, not benchmarks.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import pickle
import random
import subprocess
import sys
import time
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from utilities.data import manifest as mf
from utilities.data.manifest import ManifestError, parse, read_file
from utilities.data.schema import CLASS_NAMES, METADATA_NAMES, SPLITS

ROOT = Path(__file__).resolve().parent.parent
MAX_SECONDS = 1.0
MAX_MEMORY = 50 * 2**20
STATS = {"inputs": 0, "accepted": 0, "refused": 0, "max_seconds": 0.0, "max_bytes": 0}
FUZZ = settings(
    max_examples=400, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)


@pytest.fixture(scope="module", autouse=True)
def _report() -> Any:
    yield
    print(
        f"\nmanifest loader: {STATS['inputs']} inputs, {STATS['accepted']} accepted, {STATS['refused']} refused; "
        f"max {STATS['max_seconds'] * 1000:.1f} ms, max {STATS['max_bytes'] / 2**20:.2f} MB (tracemalloc peak)"
    )


def load(data: bytes) -> mf.Manifest | ManifestError:
    """parse(data) within the bounds: the manifest, or the ManifestError it raised (one line)."""
    gc.disable()  # a collection of what earlier tests left in this process (an xdist worker) is not this input's
    started = time.process_time()  # CPU time: a bound that a loaded machine cannot break
    try:
        result: mf.Manifest | ManifestError = parse(data, "m.pickle")
    except ManifestError as err:
        result = err
    finally:
        seconds = time.process_time() - started  # measured without tracemalloc, which slows allocation ~5×
        gc.enable()
    tracemalloc.start()
    with contextlib.suppress(ManifestError):
        parse(data, "m.pickle")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    STATS["inputs"] += 1
    STATS["accepted" if isinstance(result, mf.Manifest) else "refused"] += 1
    STATS["max_seconds"] = max(STATS["max_seconds"], seconds)
    STATS["max_bytes"] = max(STATS["max_bytes"], peak)
    assert seconds < MAX_SECONDS, f"{seconds:.2f} s for {len(data)} bytes"
    assert peak < MAX_MEMORY, f"{peak / 2**20:.1f} MB for {len(data)} bytes"
    if isinstance(result, ManifestError):
        assert str(result).startswith("manifest m.pickle") and "\n" not in str(result)
    else:  # what was accepted is plain, acyclic data that JSON (run.json, W&B) can hold
        json.dumps(result.raw, allow_nan=False)
    return result


def refusal(data: bytes) -> str:
    result = load(data)
    assert isinstance(result, ManifestError), "accepted"
    return str(result)


# ---------------------------------------------------------------- strategies: valid manifests

_names = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), min_size=1, max_size=12)
_segment = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-", min_size=1, max_size=12)
_bucket = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=3, max_size=12)
_path = st.lists(_segment, min_size=1, max_size=4).map("/".join)
_uri = st.one_of(
    st.builds("gs://{}/{}.tfrecords".format, _bucket, _path),
    st.builds("{}{}.tfrecords".format, st.sampled_from(["", "/"]), _path),
)
_count = st.integers(0, 2**40)
_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False, allow_infinity=False), _names
)
_schema = st.fixed_dictionaries(
    {},
    optional={
        "class_names": st.just(list(CLASS_NAMES)),
        "metadata_names": st.one_of(st.just(list(METADATA_NAMES)), st.lists(_names, min_size=28, max_size=28)),
        "image_shape": st.integers(8, 512).map(lambda s: [s, s, 3]),
        "image_encoding": st.sampled_from(["raw_uint8", "jpeg", "png"]),
        "version": _scalar,
    },
)
_per_split = st.one_of(_count, st.dictionaries(st.sampled_from(CLASS_NAMES), _count))
_counts = st.fixed_dictionaries({}, optional={**dict.fromkeys(SPLITS, _per_split), "skipped_unk": _count})
# One digest per shard (URIs that name one shard, `./a` and `a`, get the same): as a writer's would be.
_sha256 = st.lists(_uri, max_size=8).map(
    lambda uris: {u: hashlib.sha256(mf.shard_key(u).encode()).hexdigest() for u in uris}
)
_created = st.datetimes(timezones=st.just(UTC)).map(lambda t: t.isoformat(timespec="seconds"))
_images = st.fixed_dictionaries({}, optional=dict.fromkeys(SPLITS, st.lists(_names, max_size=20)))
_unknown_key = _names.filter(lambda k: k not in mf._KNOWN_KEYS)


def _each_shard_once(content: dict[str, Any]) -> bool:
    """No shard (by `shard_key`, or by sha256) in two places: what the loader refuses (its own tests below)."""
    keys = [mf.shard_key(u) for s in SPLITS for u in content[s]]
    return len(set(keys)) == len(keys)


MANIFESTS = (
    st.fixed_dictionaries(
        {
            "train": st.lists(_uri, min_size=1, max_size=6),
            "val": st.lists(_uri, max_size=4),
            "test": st.lists(_uri, max_size=4),
        },
        optional={
            "schema": _schema,
            "counts": _counts,
            "sha256": _sha256,
            "created": _created,
            "images": _images,
            "source": st.dictionaries(_names, _scalar, max_size=8),
            "note": _scalar,  # a scalar key this reader does not know: carried along
        },
    )
    .filter(_each_shard_once)
    .flatmap(lambda m: st.dictionaries(_unknown_key, _scalar, max_size=3).map(lambda extra: {**extra, **m}))
)
PROTOCOLS = st.integers(0, pickle.HIGHEST_PROTOCOL)


@FUZZ
@given(MANIFESTS)
def test_every_valid_manifest_loads_in_every_protocol(content: dict[str, Any]) -> None:
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        loaded = load(pickle.dumps(content, protocol=protocol))
        assert isinstance(loaded, mf.Manifest), loaded
        assert loaded.raw == content and loaded.splits == {s: tuple(content[s]) for s in SPLITS}


# ---------------------------------------------------------------- strategies: mutated pickles

# Opcodes a hostile pickle would use, each with a plausible argument.
_INSERTS = [
    b"cos\nsystem\n",
    b"cbuiltins\nbytes\n",
    b"\x8c\x02os\x8c\x06system\x93",
    b"R",
    b"b",
    b"\x81",
    b"\x92",
    b"i__main__\nX\n",
    b"o",
    b"\x82\x01",
    b"P0\n",
    b"Q",
    b"h\x00",
    b"h\x01",
    b"j\x00\x00\x00\x00",
    b"r\xff\xff\xff\x7f",
    b"q\x07",
    b"\x94",
    b"2",
    b"0",
    b"1",
    b")",
    b"\x85",
    b"\x8f",
    b"C\x03abc",
    b"\x96\x01\x00\x00\x00\x00\x00\x00\x00x",
    b"\x8b\xff\xff\xff\x7f",
    b"\x8a\x10" + bytes(16),
    b"G\x7f\xf8\x00\x00\x00\x00\x00\x00",
    b"(",
    b"]",
    b"}",
    b"e",
    b"a",
    b"u",
    b"s",
    b".",
    b"\x95\xff\xff\xff\xff\xff\xff\xff\x7f",
    b"X\xff\xff\xff\x7f",
]


def mutate(data: bytes, rng: random.Random) -> bytes:
    """1 to 4 of: flip a byte, truncate, insert a hostile opcode or random bytes, delete or repeat a slice."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randint(0, len(out))
        kind = rng.choice(["flip", "truncate", "insert_opcode", "insert_bytes", "delete", "duplicate"])
        if kind == "flip" and at < len(out):
            out[at] ^= rng.randint(1, 255)
        elif kind == "truncate":
            del out[at:]
        elif kind == "insert_opcode":
            out[at:at] = rng.choice(_INSERTS)
        elif kind == "insert_bytes":
            out[at:at] = rng.randbytes(rng.randint(1, 8))
        elif kind == "delete":
            del out[at : at + rng.randint(1, 16)]
        elif kind == "duplicate":
            out[at:at] = out[at : at + rng.randint(1, 64)]
    return bytes(out)


MUTANTS_PER_EXAMPLE = 10  # hypothesis draws the manifest and the seed; a seeded generator mutates it (cheap)


@FUZZ
@given(MANIFESTS, PROTOCOLS, st.integers(0, 2**32))
def test_mutated_pickles_load_or_are_refused_in_one_line(content: dict[str, Any], protocol: int, seed: int) -> None:
    rng = random.Random(seed)
    data = pickle.dumps(content, protocol=protocol)
    for _ in range(MUTANTS_PER_EXAMPLE):
        result = load(mutate(data, rng))
        if isinstance(result, mf.Manifest):  # a harmless mutation (e.g. inside a URI): still a valid manifest
            assert isinstance(parse(pickle.dumps(result.raw, protocol=4), "again"), mf.Manifest)


# ---------------------------------------------------------------- hand-written hostile pickles


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _billion_laughs(levels: int = 60) -> bytes:
    """Level i is a list of 2 references to level i-1: 2^levels leaves in a few hundred bytes."""
    laughs: list[Any] = ["lol"]
    for _ in range(levels):
        laughs = [laughs, laughs]
    return pickle.dumps({"train": laughs, "val": [], "test": []}, protocol=2)


def test_the_issues_hostile_pickles_are_refused(tmp_path: Path) -> None:
    allocates = b"\x80\x02cbuiltins\nbytes\nq\x00J\x00\xc2\xeb\x0b\x85q\x01Rq\x02."  # bytes(200_000_000)
    assert len(allocates) <= 73 and "tries to unpickle builtins.bytes" in refusal(allocates)
    assert "tries to unpickle builtins.bytearray" in refusal(allocates.replace(b"bytes\n", b"bytearray\n"))
    laughs = _billion_laughs()
    plain = pickle.loads(laughs)["train"]  # what a plain unpickler builds: one list, referenced 2^60 times
    assert len(laughs) < 660 and plain[0] is plain[1]
    assert "references a list twice (a shared or self reference)" in refusal(laughs)
    itself: list[Any] = []
    itself.append(itself)
    assert "references a list twice" in refusal(pickle.dumps({"train": itself, "val": [], "test": []}))
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"train": ["a"], "val": [], "test": [], "x": _RunsCode(marker)})
    assert refusal(evil).endswith("tries to unpickle posix.system; only plain containers and scalars are allowed")
    assert not marker.exists()
    pickle.loads(evil)  # the same bytes run code with the plain unpickler: the test is real
    assert marker.exists()


SPLITS_PICKLE = b"\x80\x04}\x94(\x8c\x05train\x94]\x94\x8c\x03val\x94]\x94\x8c\x04test\x94]\x94u"
TRAIN = b"\x8c\x05train\x94"  # a key that replaces train's value, followed by a list and SETITEM


CRAFTED = [
    (b"\x80\x04" + b"N" * (mf.MAX_BYTES + 1), "is over 4 MiB"),
    (SPLITS_PICKLE + TRAIN + b"](" + b"}" * mf.MAX_ITEMS + b"es.", "holds more than 100,000 values"),
    (SPLITS_PICKLE + TRAIN + b"](" + b"K\x01" * mf.MAX_ITEMS + b"es.", "holds more than 100,000 values"),
    (b"\x80\x04" + b"(" * (mf.MAX_ITEMS + 1) + b".", "holds more than 100,000 values"),
    (b"\x80\x04}" + b"\x94" * (3 * mf.MAX_ITEMS) + b".", "has more than 300,000 opcodes"),
    (b"\x80\x04" + b"]" * 50_000 + b"a" * 49_999 + b".", "nests deeper than 5 levels"),
    (b"\x80\x02]r\xff\xff\xff\xff.", "uses memo slot 4294967295 out of order"),
    (b"\x80\x02}h\x05.", "reads memo slot 5, which was never written"),
    (b"\x80\x02}(K\x01K\x02u.", "has a dict key that is not a string"),
    (
        SPLITS_PICKLE + TRAIN + b"](X\x00\x10\x00\x00" + b"a" * 4096 + b"\x94" + b"h\x08" * 1100 + b"es.",
        "characters of text",
    ),
    (SPLITS_PICKLE + b"\x8c\x01x\x8b\x02\x00\x00\x00\xff\x7fs.", "uses pickle opcode LONG4"),
    (SPLITS_PICKLE + b"\x8c\x01x\x8a\x09" + b"\xff" * 8 + b"\x7fs.", "has an integer beyond 64 bits"),
    (SPLITS_PICKLE + b"\x8c\x01xG\x7f\xf0\x00\x00\x00\x00\x00\x00s.", "has the float inf"),
    (SPLITS_PICKLE + b"\x8c\x01xX\x01\x10\x00\x00" + b"a" * 4097 + b"s.", "has a string of 4,097 characters"),
    (pickle.dumps({"train": ("a",), "val": [], "test": []}, protocol=2), "uses pickle opcode TUPLE1"),
    (pickle.dumps({"train": ["a"], "val": [], "test": [], "s": {1}}, protocol=4), "uses pickle opcode EMPTY_SET"),
    (pickle.dumps({"train": ["a"], "val": [], "test": [], "b": b"x"}, protocol=4), "uses pickle opcode SHORT_BINBYTES"),
    (pickle.dumps({"train": ["a"], "val": [], "test": []}) + b"junk", "has 4 bytes after its end"),
    (pickle.dumps(["gs://b/a.tfrecords"]), "holds a list; expected a dict with keys train, val, test"),
    (b"\x80\x04not really", "is not a valid pickle"),
    (b"", "is not a valid pickle"),
]


@pytest.mark.parametrize(("data", "message"), CRAFTED, ids=[message for _, message in CRAFTED])
def test_crafted_pickles_hit_their_cap(data: bytes, message: str) -> None:
    assert message in refusal(data)


def test_astral_text_at_the_caps_stays_within_memory() -> None:
    """The costliest text: 4 Mi characters, one 4-byte character per string forcing 4 bytes a character."""
    texts = (f"\U0001f600{i:04d}".ljust(mf.MAX_STRING, "a").encode() for i in range(mf.MAX_TEXT // mf.MAX_STRING - 4))
    items = b"".join(b"X" + len(text).to_bytes(4, "little") + text for text in texts)  # distinct: one shard each
    data = SPLITS_PICKLE + TRAIN + b"](" + items + b"es."
    assert len(data) < mf.MAX_BYTES
    assert isinstance(load(data), mf.Manifest)  # 1,020 local paths of 4,096 characters: odd but valid


# ---------------------------------------------------------------- shapes of every key


def _valid(**extra: Any) -> dict[str, Any]:
    return {"train": ["gs://bucket/d/train/0000.tfrecords"], "val": ["v.tfrecords"], "test": [], **extra}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (_valid(train=[]), "lists no train shards"),
        (_valid(train=["s3://b/x"]), "train[0] 's3://b/x' is neither a gs:// URI nor a local path"),
        (_valid(train=["gs://B/x"]), "is not a gs://bucket/object URI"),
        (_valid(val=["a\nb"]), "val[0] is 'a\\nb', expected a shard URI string"),
        (_valid(val=[""]), "val[0] is '', expected a shard URI string"),
        (_valid(test={"a": 1}), "test is a dict, expected a list of shard URIs"),
        (_valid(schema=[]), "schema is a list, expected a dict"),
        (_valid(schema={"class_names": ["MEL"]}), "has classes MEL; this job expects MEL,NV"),
        (_valid(schema={"metadata_names": ["a"] * 27}), "is not a list of 28 names"),
        (_valid(schema={"image_shape": [32, 32]}), "schema image_shape [32, 32] is not [height, width, channels]"),
        (_valid(schema={"image_encoding": "webp"}), "schema image_encoding 'webp' is not one of"),
        (_valid(schema={"extra": [1]}), "unknown key schema.'extra' holds a list"),
        (_valid(counts={"train": -1}), "counts train is -1, expected a count or class name → count"),
        (_valid(counts={"train": {"UNK": 3}}), "counts train is {'UNK': 3}"),
        (_valid(counts={"train": True}), "counts train is True"),
        (_valid(counts={"skipped_unk": 1.5}), "counts skipped_unk is 1.5, expected a count"),
        (_valid(sha256={"a": "abc"}), "sha256 entry 'a' is not a 64-digit lowercase hex digest"),
        (_valid(sha256={"a": "A" * 64}), "sha256 entry 'a' is not a 64-digit lowercase hex digest"),
        (_valid(sha256=["a"]), "sha256 is a list, expected a dict of shard URI → hex digest"),
        (_valid(created="yesterday"), "created is 'yesterday', expected an ISO 8601 time"),
        (_valid(created=5), "created is 5, expected an ISO 8601 time"),
        (_valid(images={"train": "ISIC_1"}), "images 'train' is not a split with a list of image ids"),
        (_valid(images={"all": []}), "images 'all' is not a split with a list of image ids"),
        (_valid(source={"input": ["x"]}), "source 'input' holds a list, expected a string, number or None"),
        (_valid(extra={"a": 1}), "unknown key 'extra' holds a dict; unknown keys may hold only a string"),
    ],
)
def test_every_key_is_checked_against_its_shape(content: dict[str, Any], message: str) -> None:
    assert message in refusal(pickle.dumps(content, protocol=4))


def test_the_original_three_key_form_and_unknown_scalars_load() -> None:
    original = {s: [f"gs://dermaid-data/tfrecords/{s}/{i}.tfrecords" for i in range(3)] for s in SPLITS}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        loaded = load(pickle.dumps(original, protocol=protocol))
        assert isinstance(loaded, mf.Manifest) and loaded.sha256 == {} and loaded.schema is None
    newer = load(pickle.dumps({**original, "format_version": 2, "note": "from a newer writer", "ratio": 0.5}))
    assert isinstance(newer, mf.Manifest) and newer.raw["format_version"] == 2


def test_a_manifest_of_all_isic_2019_fits_well_within_the_caps() -> None:
    """25,331 images in 52 shards of 500, every image id listed, as tools.prepare writes it."""
    images = [f"ISIC_{i:07d}" for i in range(25_331)]
    random.Random(0).shuffle(images)
    ids = {"train": images[:17_731], "val": images[17_731:21_531], "test": images[21_531:]}
    shards = {
        s: [f"gs://dermaid-data/isic2019_v01/{s}/{i:04d}.tfrecords" for i in range(-(-len(v) // 500))]
        for s, v in ids.items()
    }
    content = {
        **shards,
        "schema": {
            "class_names": list(CLASS_NAMES),
            "metadata_names": list(METADATA_NAMES),
            "image_shape": [256, 256, 3],
        },
        "counts": {s: {c: len(v) // 8 for c in CLASS_NAMES} for s, v in ids.items()} | {"skipped_unk": 0},
        "sha256": {u: hashlib.sha256(u.encode()).hexdigest() for s in SPLITS for u in shards[s]},
        "images": ids,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": {"input": "/data/isic2019", "image_count": 25_331, "seed": 0, "image_size": 256, "limit": None},
    }
    data = pickle.dumps(content, protocol=4)
    assert sum(len(s) for s in shards.values()) == 52 and len(data) < mf.MAX_BYTES / 8
    loaded = load(data)
    assert isinstance(loaded, mf.Manifest) and loaded.raw == content


# ---------------------------------------------------------------- files and the command line


def test_read_file_refuses_an_oversized_file_without_reading_it(tmp_path: Path) -> None:
    big = tmp_path / "big.pickle"
    with big.open("wb") as fh:
        fh.truncate(2**40)  # sparse: a terabyte that costs nothing on disk
    with pytest.raises(ManifestError, match=r"manifest .*big.pickle is over 4 MiB"):
        read_file(big)
    (tmp_path / "ok.pickle").write_bytes(pickle.dumps(_valid()))
    assert parse(read_file(tmp_path / "ok.pickle"), "ok").splits["val"] == ("v.tfrecords",)


def test_registry_loader_refuses_shared_references(tmp_path: Path) -> None:
    from tools.registry import RegistryError
    from tools.registry import load_manifest as registry_load

    path = tmp_path / "laughs.pickle"
    path.write_bytes(_billion_laughs())
    with pytest.raises(RegistryError, match=r"laughs.pickle references a list twice"):
        registry_load(path)


@pytest.mark.slow
def test_training_refuses_a_hostile_manifest_with_exit_2(tmp_path: Path) -> None:
    itself: list[Any] = []
    itself.append(itself)
    path = tmp_path / "loop.pickle"
    path.write_bytes(pickle.dumps({"train": itself, "val": [], "test": []}))
    argv = ["cli.py", "--manifest", str(path), "--output", str(tmp_path / "out"), "--weights", "none", "--no-tracking"]
    env = {**os.environ, "WANDB_MODE": "offline", "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "loop.pickle" in line]
    assert len(errors) == 1 and "references a list twice (a shared or self reference)" in errors[0], result.stderr[
        -2000:
    ]
