"""The dataset manifest (`versioned_paths.pickle`, DESIGN §2.2): safe unpickling and validation.

One reader for every consumer: `utilities.data.load_manifest` (training, local or gs://) and
`tools.registry` / `dvc_pull.sh` (publishing and pulling, which must run without TensorFlow). This
module imports only the standard library and `utilities.schema`.

    manifest = parse(Path("versioned_paths.pickle").read_bytes(), "versioned_paths.pickle")
    manifest.splits["train"]   # shard URIs
    summary_lines(manifest)    # ["train: 5 shards, 441 images", …]

A manifest is data: unpickling refuses every global except plain containers and datetime values,
so a pickle that would call os.system is rejected before anything runs.
"""

from __future__ import annotations

import builtins
import datetime
import io
import pickle
from dataclasses import dataclass
from typing import Any

from utilities.schema import CLASS_NAMES, METADATA_SIZE, SPLITS

_SHA256_HEX = frozenset("0123456789abcdef")
# The only globals a manifest may reference (old pickle protocols name containers as globals; a
# `created` timestamp pickles as a datetime).
_SAFE_GLOBALS = {
    ("builtins", n): getattr(builtins, n)
    for n in ("dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int", "float", "bool")
}
_SAFE_GLOBALS.update({("datetime", n): getattr(datetime, n) for n in ("datetime", "date", "timedelta", "timezone")})


class ManifestError(ValueError):
    """A manifest that cannot be used; the message is one line naming the manifest."""


@dataclass(frozen=True)
class Manifest:
    path: str  # where it was loaded from
    splits: dict[str, tuple[str, ...]]  # "train" | "val" | "test" → shard URIs
    schema: dict[str, Any] | None  # class_names, metadata_names, image_shape (new manifests only)
    counts: dict[str, Any] | None  # per split per class, and skipped_unk (new manifests only)
    sha256: dict[str, str]  # shard URI → hex digest; empty for the original three-key form
    raw: dict[str, Any]  # everything that was in the pickle


def parse(data: bytes, name: str) -> Manifest:
    """Unpickle (plain data only) and validate; accepts the original three-key form."""
    raw = _unpickle(data, name)
    splits = _check_splits(raw, name)
    counts = raw.get("counts")
    if counts is not None and not isinstance(counts, dict):
        raise ManifestError(f"manifest {name}: counts is a {type(counts).__name__}, expected a dict")
    return Manifest(name, splits, _check_schema(raw, name), counts, _check_sha256(raw, name), raw)


def summary_lines(manifest: Manifest) -> list[str]:
    """One line per split: shards, and images when the manifest carries `counts`."""
    counts = manifest.counts or {}
    lines = []
    for split in SPLITS:
        text = f"{split}: {len(manifest.splits[split])} shards"
        images = _images_in(counts.get(split))
        lines.append(text if images is None else f"{text}, {images} images")
    return lines


def one_line(text: object, limit: int = 300) -> str:
    """`text` on one line (whitespace runs collapsed), cut to `limit` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


class _PlainUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, name: str) -> None:
        super().__init__(file)
        self._name = name

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        raise ManifestError(
            f"manifest {self._name} tries to unpickle {module}.{name}; only plain containers and scalars are allowed"
        )


def _unpickle(data: bytes, name: str) -> Any:
    try:
        return _PlainUnpickler(io.BytesIO(data), name).load()
    except ManifestError:
        raise
    except Exception as err:  # any malformed pickle: UnpicklingError, EOFError, ValueError, …
        raise ManifestError(f"manifest {name} is not a valid pickle: {one_line(err)}") from None


def _check_splits(raw: Any, name: str) -> dict[str, tuple[str, ...]]:
    if not isinstance(raw, dict):
        raise ManifestError(f"manifest {name} holds a {type(raw).__name__}; expected a dict with keys train, val, test")
    missing = [s for s in SPLITS if s not in raw]
    if missing:
        raise ManifestError(
            f"manifest {name} has no {', '.join(missing)} key(s); expected train, val and test shard lists"
        )
    splits = {}
    for split in SPLITS:
        uris = raw[split]
        if not isinstance(uris, (list, tuple)):
            raise ManifestError(f"manifest {name}: {split} is a {type(uris).__name__}, expected a list of shard URIs")
        for i, uri in enumerate(uris):
            if not isinstance(uri, str) or not uri:
                raise ManifestError(f"manifest {name}: {split}[{i}] is {uri!r}, expected a shard URI string")
        splits[split] = tuple(uris)
    if not splits["train"]:
        raise ManifestError(f"manifest {name} lists no train shards")
    return splits


def _check_sha256(raw: dict[str, Any], name: str) -> dict[str, str]:
    sha = raw.get("sha256") or {}
    if not isinstance(sha, dict):
        raise ManifestError(
            f"manifest {name}: sha256 is a {type(sha).__name__}, expected a dict of shard URI → hex digest"
        )
    for uri, digest in sha.items():
        if not (isinstance(uri, str) and isinstance(digest, str) and len(digest) == 64 and set(digest) <= _SHA256_HEX):
            raise ManifestError(f"manifest {name}: sha256 entry {uri!r} is not a 64-digit lowercase hex digest")
    return dict(sha)


def _check_schema(raw: dict[str, Any], name: str) -> dict[str, Any] | None:
    schema = raw.get("schema")
    if schema is None:
        return None
    if not isinstance(schema, dict):
        raise ManifestError(f"manifest {name}: schema is a {type(schema).__name__}, expected a dict")
    classes = schema.get("class_names")
    if classes is not None and (not isinstance(classes, (list, tuple)) or tuple(classes) != CLASS_NAMES):
        shown = ",".join(map(str, classes)) if isinstance(classes, (list, tuple)) else repr(classes)
        raise ManifestError(f"manifest {name} has classes {shown}; this job expects {','.join(CLASS_NAMES)}")
    metadata = schema.get("metadata_names")
    if metadata is not None and (not isinstance(metadata, (list, tuple)) or len(metadata) != METADATA_SIZE):
        raise ManifestError(
            f"manifest {name}: schema metadata_names {metadata!r} is not a list of {METADATA_SIZE} names"
        )
    return schema


def _images_in(count: object) -> int | None:
    """`counts[split]` may be a total or a per-class dict; anything else is unknown."""
    if isinstance(count, int) and not isinstance(count, bool):
        return count
    if isinstance(count, dict) and count and all(isinstance(v, int) for v in count.values()):
        return sum(count.values())
    return None


__all__ = ["Manifest", "ManifestError", "one_line", "parse", "summary_lines"]
