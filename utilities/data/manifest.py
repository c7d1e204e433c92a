"""The dataset manifest (`versioned_paths.pickle`, DESIGN §2.2): the Manifest type, the file's size cap and every key's shape.

One reader for every consumer: `utilities.data.pipeline.load_manifest` (training, local or gs://) and
`tools.registry` / `dvc_pull.sh` (publishing and pulling, which must run without TensorFlow). This
module imports only the standard library, `utilities.errors` and `utilities.data.schema`.

    manifest = parse(read_file("versioned_paths.pickle"), "versioned_paths.pickle")
    manifest.splits["train"]   # shard URIs
    summary_lines(manifest)    # ["train: 5 shards, 441 images", …]

A manifest is data, and this reader accepts nothing else: the bytes are unpickled by
`utilities.data.manifest_pickle`, which walks the opcodes first and lets only plain dicts, lists and
scalars through, within caps on values (MAX_ITEMS), nesting (MAX_DEPTH) and text (MAX_STRING,
MAX_TEXT). The file itself is capped by MAX_BYTES (4 MiB), checked before reading it (`read_file`):
the manifest prepare writes for the whole of ISIC 2019 (25,331 images in 52 shards, every image id
listed) is 0.39 MB; 4 MiB leaves 10× room.

Then every key is checked against its exact shape (`_check_*` below). Keys this reader does not
know are accepted only when they hold a string, number, boolean or None, so a newer writer can add a
scalar (a version, a note) that older readers carry along; a structured key needs a reader that
knows its shape. Each shard is in one split, once (`_check_overlap`): compared by the shard its URI
names (`shard_key`: `./a/../b` is `b`, `file:///x/` is `/x`) and, where `sha256` gives it, by content.
Every refusal is one `ManifestError` line naming the manifest.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utilities.data import manifest_pickle
from utilities.data.manifest_pickle import MAX_DEPTH, MAX_ITEMS, MAX_STRING, MAX_TEXT
from utilities.data.schema import CLASS_NAMES, METADATA_SIZE, SPLITS
from utilities.errors import JobError, one_line
from utilities.storage import without_file_scheme

MANIFEST_NAME = "versioned_paths.pickle"  # the file name, as the original and its registry spell it
REGISTRY_DIR = "Versioning"  # the registry's tracked folder, and where dvc_pull.sh puts the manifest
MANIFEST_PATH = f"{REGISTRY_DIR}/{MANIFEST_NAME}"
MAX_BYTES = 4 * 1024 * 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")
_GCS_URI = re.compile(r"gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]/[^\x00-\x1f\x7f]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_IMAGE_ENCODINGS = ("raw_uint8", "jpeg", "png")
_KNOWN_KEYS = (*SPLITS, "schema", "counts", "sha256", "created", "images", "source")
_SCALARS = (str, int, float, bool, type(None))


class ManifestError(JobError, ValueError):
    """A manifest that cannot be used; the message is one line naming the manifest."""


@dataclass(frozen=True)
class Manifest:
    path: str  # where it was loaded from
    splits: dict[str, tuple[str, ...]]  # "train" | "val" | "test" → shard URIs
    schema: dict[str, Any] | None  # class_names, metadata_names, image_shape (new manifests only)
    counts: dict[str, Any] | None  # per split per class, and skipped_unk (new manifests only)
    sha256: dict[str, str]  # shard URI → hex digest; empty for the original three-key form
    raw: dict[str, Any]  # everything that was in the pickle
    digest: str = ""  # hex sha256 of the bytes that were parsed (lineage: never re-read from `path`)

    def sha256_of(self, uri: str) -> str | None:
        """The manifest's digest of shard `uri`, its key matched by the shard it names (`shard_key`), or None."""
        if uri in self.sha256:
            return self.sha256[uri]
        return next((d for u, d in self.sha256.items() if shard_key(u) == shard_key(uri)), None)


def read_file(path: str | Path) -> bytes:
    """The bytes of a local manifest, refused before reading when the file is over MAX_BYTES."""
    with open(path, "rb") as fh:
        data = fh.read(MAX_BYTES + 1)
    check_size(len(data), str(path))
    return data


def parse(data: bytes, name: str) -> Manifest:
    """Check the opcodes, unpickle (plain data only) and validate; accepts the original three-key form."""
    raw = _unpickle(data, name)
    if type(raw) is not dict:  # the opcode walk already ensures it
        raise ManifestError(f"manifest {name} holds a {type(raw).__name__}; expected a dict with keys train, val, test")
    splits = _check_splits(raw, name)
    for key, value in raw.items():
        if key not in _KNOWN_KEYS:
            _check_unknown(key, value, name)
    schema = _check_fields(raw.get("schema"), "schema", name, "a dict", _SCHEMA_FIELDS)
    counts = _check_fields(raw.get("counts"), "counts", name, "a dict of per-split image counts", _COUNT_FIELDS)
    sha = _check_sha256(raw.get("sha256"), name)
    _check_overlap(splits, sha, name)
    _check_created(raw.get("created"), name)
    _check_images(raw.get("images"), name)
    _check_source(raw.get("source"), name)
    return Manifest(name, splits, schema, counts, sha, raw, hashlib.sha256(data).hexdigest())


def shard_key(uri: str) -> str:
    """The shard a URI names, for telling two URIs of one shard apart from two shards (no file system access).

    gs://bucket/key: the key's `.`, `..`, repeated and trailing slashes collapsed. A local path or file://
    URI: made absolute (against the working directory, where `utilities.data.shards` opens it) and collapsed
    the same way. Symbolic and hard links name one file under two keys: `utilities.data.pipeline.fetch_shards`
    compares the files themselves.
    """
    if uri.startswith("gs://"):
        bucket, _, key = uri[len("gs://") :].partition("/")
        return f"gs://{bucket}/{posixpath.normpath(key).lstrip('/')}"
    return os.path.abspath(without_file_scheme(uri))


def summary_lines(manifest: Manifest) -> list[str]:
    """One line per split: shards, and images when the manifest carries `counts`."""
    counts = manifest.counts or {}
    lines = []
    for split in SPLITS:
        text = f"{split}: {len(manifest.splits[split])} shards"
        images = _images_in(counts.get(split))
        lines.append(text if images is None else f"{text}, {images} images")
    return lines


# ---------------------------------------------------------------- the bytes


def check_size(size: int, name: str) -> None:
    """Refuse a manifest of `size` bytes over MAX_BYTES (before reading or unpickling it)."""
    if size > MAX_BYTES:
        raise ManifestError(
            f"manifest {name} is over {MAX_BYTES // 2**20} MiB; a manifest lists shard URIs and is KBs "
            "(ISIC 2019's is ~0.5 MB): refusing to unpickle it"
        )


def _unpickle(data: bytes, name: str) -> dict[str, Any]:
    check_size(len(data), name)
    try:
        return manifest_pickle.loads(data)
    except manifest_pickle.PickleRefused as err:
        raise ManifestError(f"manifest {name} {err}") from None


# ---------------------------------------------------------------- the keys and their shapes


def _fail(name: str, text: str) -> ManifestError:
    return ManifestError(f"manifest {name}: {one_line(text)}")


def _shown(value: object) -> str:
    return one_line(repr(value), 80)


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0


def _check_uri(uri: object, where: str, name: str) -> str:
    if type(uri) is not str or not uri or _CONTROL.search(uri):
        raise _fail(name, f"{where} is {_shown(uri)}, expected a shard URI string")
    if uri.startswith("gs://"):
        if not _GCS_URI.fullmatch(uri):
            raise _fail(name, f"{where} {_shown(uri)} is not a gs://bucket/object URI")
    elif _SCHEME.match(uri) and not uri.startswith("file://"):
        raise _fail(name, f"{where} {_shown(uri)} is neither a gs:// URI nor a local path")
    return uri


def _check_splits(raw: Any, name: str) -> dict[str, tuple[str, ...]]:
    missing = [s for s in SPLITS if s not in raw]
    if missing:
        raise ManifestError(
            f"manifest {name} has no {', '.join(missing)} key(s); expected train, val and test shard lists"
        )
    splits = {}
    for split in SPLITS:
        uris = raw[split]
        if type(uris) is not list:
            raise _fail(name, f"{split} is a {type(uris).__name__}, expected a list of shard URIs")
        splits[split] = tuple(_check_uri(uri, f"{split}[{i}]", name) for i, uri in enumerate(uris))
    if not splits["train"]:
        raise ManifestError(f"manifest {name} lists no train shards")
    return splits


def _check_unknown(key: str, value: object, name: str, where: str = "") -> None:
    if not isinstance(value, _SCALARS):
        raise _fail(
            name,
            f"unknown key {where}{key!r} holds a {type(value).__name__}; unknown keys may hold only a string, "
            "number, boolean or None",
        )


def _check_dict(value: object, key: str, name: str, what: str) -> dict[str, Any]:
    if type(value) is not dict:
        raise _fail(name, f"{key} is a {type(value).__name__}, expected {what}")
    return value


def _check_fields(
    value: object, key: str, name: str, what: str, fields: dict[str, Callable[[str, Any, str], None]]
) -> dict[str, Any] | None:
    """An optional dict `key`: each field `fields` knows is checked by its function (field, value,
    manifest name); any other field may hold only a scalar."""
    if value is None:
        return None
    value = _check_dict(value, key, name, what)
    for field, item in value.items():
        check = fields.get(field)
        if check is None:
            _check_unknown(field, item, name, f"{key}.")
        else:
            check(field, item, name)
    return value


def _check_class_names(key: str, value: Any, name: str) -> None:
    if type(value) is not list or tuple(value) != CLASS_NAMES:
        shown = ",".join(map(str, value)) if type(value) is list else _shown(value)
        raise ManifestError(f"manifest {name} has classes {one_line(shown)}; this job expects {','.join(CLASS_NAMES)}")


def _check_metadata_names(key: str, value: Any, name: str) -> None:
    if type(value) is not list or len(value) != METADATA_SIZE or not all(type(v) is str for v in value):
        raise _fail(name, f"schema metadata_names {_shown(value)} is not a list of {METADATA_SIZE} names")


def _check_image_shape(key: str, value: Any, name: str) -> None:
    if not (type(value) is list and len(value) == 3 and all(_is_count(v) and v > 0 for v in value)):
        raise _fail(name, f"schema image_shape {_shown(value)} is not [height, width, channels]")


def _check_image_encoding(key: str, value: Any, name: str) -> None:
    if value not in _IMAGE_ENCODINGS:
        raise _fail(name, f"schema image_encoding {_shown(value)} is not one of {', '.join(_IMAGE_ENCODINGS)}")


def _check_split_count(key: str, value: Any, name: str) -> None:
    """`counts[split]` is a total or a per-class dict."""
    per_class = type(value) is dict and all(k in CLASS_NAMES and _is_count(v) for k, v in value.items())
    if not (_is_count(value) or per_class):
        raise _fail(name, f"counts {key} is {_shown(value)}, expected a count or class name → count")


def _check_skipped(key: str, value: Any, name: str) -> None:
    if not _is_count(value):
        raise _fail(name, f"counts skipped_unk is {_shown(value)}, expected a count")


_SCHEMA_FIELDS = {
    "class_names": _check_class_names,
    "metadata_names": _check_metadata_names,
    "image_shape": _check_image_shape,
    "image_encoding": _check_image_encoding,
}
_COUNT_FIELDS = {**dict.fromkeys(SPLITS, _check_split_count), "skipped_unk": _check_skipped}


def _check_sha256(sha: object, name: str) -> dict[str, str]:
    if sha is None:
        return {}
    sha = _check_dict(sha, "sha256", name, "a dict of shard URI → hex digest")
    by_shard: dict[str, tuple[str, str]] = {}  # shard_key → (URI, digest)
    for uri, digest in sha.items():
        _check_uri(uri, "sha256 key", name)
        if not (type(digest) is str and _SHA256.fullmatch(digest)):
            raise _fail(name, f"sha256 entry {_shown(uri)} is not a 64-digit lowercase hex digest")
        other, known = by_shard.setdefault(shard_key(uri), (uri, digest))
        if known != digest:
            raise _fail(name, f"sha256 gives {_shown(other)} and {_shown(uri)}, one shard, two different digests")
    return dict(sha)


def _check_overlap(splits: dict[str, tuple[str, ...]], sha: dict[str, str], name: str) -> None:
    """Each shard in one split, once: by the shard its URI names (`shard_key`) and, where the manifest
    gives its sha256, by its bytes. A shard listed twice counts twice; one in train and in val or test
    scores the model on its own training data (and the run would exit 0)."""
    digests = {shard_key(uri): digest for uri, digest in sha.items()}
    by_shard: dict[str, tuple[str, str]] = {}  # shard_key or sha256 → (where, URI) of its first listing
    for split in SPLITS:
        for index, uri in enumerate(splits[split]):
            here = (f"{split}[{index}]", uri)
            key = shard_key(uri)
            digest = digests.get(key)
            for seen, how in (
                (key, "is the same shard as"),
                (digest, f"has the same sha256 {(digest or '')[:12]}… as"),
            ):
                if seen is not None and seen in by_shard:
                    raise _overlap(name, by_shard[seen], here, how)
            by_shard[key] = here
            if digest is not None:
                by_shard[digest] = here


def _overlap(name: str, first: tuple[str, str], then: tuple[str, str], how: str) -> ManifestError:
    (first_at, first_uri), (then_at, then_uri) = first, then
    split, other = first_at.partition("[")[0], then_at.partition("[")[0]
    if split == other:
        why, fix = f"listed twice, its records would count twice in {split}", "list each shard once"
    elif "train" in (split, other):
        why, fix = (
            f"in {split} and {other}, the model would be scored on its own training data",
            "keep a shard in one split",
        )
    else:
        why, fix = f"in {split} and {other}, both would score the same images", "keep a shard in one split"
    return _fail(name, f"{then_at} {_shown(then_uri)} {how} {first_at} {_shown(first_uri)} ({why}); {fix}")


def _check_created(created: object, name: str) -> None:
    if created is None:
        return
    try:
        datetime.datetime.fromisoformat(created)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise _fail(name, f"created is {_shown(created)}, expected an ISO 8601 time") from None


def _check_images(images: object, name: str) -> None:
    if images is None:
        return
    images = _check_dict(images, "images", name, "a dict of split → image ids")
    for split, ids in images.items():
        if split not in SPLITS or type(ids) is not list or not all(type(i) is str and i for i in ids):
            raise _fail(name, f"images {_shown(split)} is not a split with a list of image ids")


def _check_source(source: object, name: str) -> None:
    if source is None:
        return
    for key, value in _check_dict(source, "source", name, "a dict of provenance values").items():
        if not isinstance(value, _SCALARS):
            raise _fail(name, f"source {key!r} holds a {type(value).__name__}, expected a string, number or None")


def _images_in(count: object) -> int | None:
    """`counts[split]` may be a total or a per-class dict; anything else is unknown."""
    if isinstance(count, int) and not isinstance(count, bool):
        return count
    if isinstance(count, dict) and count and all(isinstance(v, int) for v in count.values()):
        return sum(count.values())
    return None


__all__ = [
    "MAX_BYTES",
    "MAX_DEPTH",
    "MAX_ITEMS",
    "MAX_STRING",
    "MAX_TEXT",
    "Manifest",
    "ManifestError",
    "check_size",
    "one_line",
    "parse",
    "read_file",
    "shard_key",
    "summary_lines",
]
