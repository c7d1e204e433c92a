"""The dataset manifest (`versioned_paths.pickle`, DESIGN §2.2): safe unpickling and validation.

One reader for every consumer: `utilities.data.load_manifest` (training, local or gs://) and
`tools.registry` / `dvc_pull.sh` (publishing and pulling, which must run without TensorFlow). This
module imports only the standard library and `utilities.schema`.

    manifest = parse(read_file("versioned_paths.pickle"), "versioned_paths.pickle")
    manifest.splits["train"]   # shard URIs
    summary_lines(manifest)    # ["train: 5 shards, 441 images", …]

A manifest is data, and this reader accepts nothing else. Before anything is unpickled, the opcode
stream is walked (`pickletools.genops`, which decodes opcodes and never executes them) on a shadow
stack: only dicts, lists, str, int, float, bool and None can be built; no opcode that imports or
calls anything (GLOBAL, STACK_GLOBAL, REDUCE, BUILD, NEWOBJ, INST, OBJ, EXT*, PERSID) and no tuple,
set, bytes or buffer is accepted; a list or dict may be referenced once only (a memo GET of a
container would make a shared or self reference: a 660-byte pickle could then expand to 2^60 items
when written as JSON); dict keys are strings (int keys hash predictably: a crafted pickle could make
every insert collide). Size caps bound what survives the walk, so unpickling afterwards costs at
most a few tens of MB and well under a second:

- MAX_BYTES (4 MiB) on the file, checked before reading it (`read_file`). The manifest prepare
  writes for the whole of ISIC 2019 (25,331 images in 52 shards, every image id listed) is 0.39 MB;
  4 MiB leaves 10× room.
- MAX_ITEMS (100,000) values and MAX_DEPTH (5) nesting. ISIC 2019's manifest holds 25,672 values
  (51,235 opcodes) nested 3 deep. 100,000 values of the costliest kind (empty dicts) take ~11 MB;
  the walk of the 300,000 opcodes allowed takes ~0.2-0.4 s on one busy core.
- MAX_STRING (4,096) characters per string (PATH_MAX; a gs:// URI is at most ~1,300) and
  MAX_TEXT (4 Mi) characters of all strings, a string referenced twice counted twice (ISIC 2019:
  0.31 Mi): a string shared by memo cannot multiply into gigabytes of run.json or W&B config.
  The costliest text allowed (4 Mi characters stored 4 bytes each) peaks at ~16 MB.

Then every key is checked against its exact shape (`_check_*` below). Keys this reader does not
know are accepted only when they hold a string, number, boolean or None, so a newer writer can add a
scalar (a version, a note) that older readers carry along; a structured key needs a reader that
knows its shape. Every refusal is one `ManifestError` line naming the manifest.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import hashlib
import io
import math
import pickle
import pickletools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utilities.errors import JobError, one_line
from utilities.schema import CLASS_NAMES, METADATA_SIZE, SPLITS

MAX_BYTES = 4 * 1024 * 1024
MAX_ITEMS = 100_000
MAX_DEPTH = 5
MAX_STRING = 4096
MAX_TEXT = 4 * 1024 * 1024
_MAX_OPS = 3 * MAX_ITEMS  # a pickler spends at most 3 opcodes on a value (push, memoize, append)
_MAX_INT = 2**63  # manifest ints are counts and sizes; bigger ones would not survive JSON/int64
_SHA256 = re.compile(r"[0-9a-f]{64}")
_GCS_URI = re.compile(r"gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]/[^\x00-\x1f\x7f]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_IMAGE_ENCODINGS = ("raw_uint8", "jpeg", "png")
_KNOWN_KEYS = (*SPLITS, "schema", "counts", "sha256", "created", "images", "source")
_SCALARS = (str, int, float, bool, type(None))
_PLAIN = "a manifest holds only dicts, lists, strings, numbers, booleans and None"


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


def read_file(path: str | Path) -> bytes:
    """The bytes of a local manifest, refused before reading when the file is over MAX_BYTES."""
    with open(path, "rb") as fh:
        data = fh.read(MAX_BYTES + 1)
    _check_size(data, str(path))
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
    schema = _check_schema(raw.get("schema"), name)
    counts = _check_counts(raw.get("counts"), name)
    sha = _check_sha256(raw.get("sha256"), name)
    _check_created(raw.get("created"), name)
    _check_images(raw.get("images"), name)
    _check_source(raw.get("source"), name)
    return Manifest(name, splits, schema, counts, sha, raw, hashlib.sha256(data).hexdigest())


def summary_lines(manifest: Manifest) -> list[str]:
    """One line per split: shards, and images when the manifest carries `counts`."""
    counts = manifest.counts or {}
    lines = []
    for split in SPLITS:
        text = f"{split}: {len(manifest.splits[split])} shards"
        images = _images_in(counts.get(split))
        lines.append(text if images is None else f"{text}, {images} images")
    return lines


# ---------------------------------------------------------------- the opcode stream


def _check_size(data: bytes, name: str) -> None:
    if len(data) > MAX_BYTES:
        raise ManifestError(
            f"manifest {name} is over {MAX_BYTES // 2**20} MiB; a manifest lists shard URIs and is KBs "
            "(ISIC 2019's is ~0.5 MB): refusing to unpickle it"
        )


class _Refused(Exception):
    """Raised by the opcode walk; `_unpickle` turns it into a ManifestError naming the manifest."""


class _Container:
    """A list or dict on the shadow stack: its kind and how deep it nests (an empty one is 1)."""

    __slots__ = ("depth", "kind")

    def __init__(self, kind: str) -> None:
        self.kind, self.depth = kind, 1


_MARK = object()  # a MARK on the shadow stack
_OPS = {op.name: op.code for op in pickletools.opcodes}
_CALLS = frozenset(
    {"REDUCE", "BUILD", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID"}
)


class _Walk:
    """A shadow of the unpickler's stack and memo that tracks kinds only and never builds a value.

    `handlers` maps an opcode (its one-character code) to the method that mirrors it; every opcode
    without a handler is refused. One dict lookup per opcode keeps a 300,000-opcode walk well under 1 s.
    """

    def __init__(self) -> None:
        self.stack: list[Any] = []  # _MARK, _Container, ("str", text) or ("scalar", type name)
        self.memo: list[Any] = []  # what each memo slot holds, by index
        self.items = 0
        self.text = 0  # characters of every string pushed, shared ones counted at each use
        handlers: dict[str, Any] = {
            "PROTO": self.nothing,
            "FRAME": self.nothing,
            "STOP": self.nothing,
            "MARK": self.mark,
        }
        handlers |= dict.fromkeys(
            ("UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "STRING", "BINSTRING", "SHORT_BINSTRING"),
            self.string,
        )
        handlers |= dict.fromkeys(("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1"), self.integer)
        handlers |= dict.fromkeys(("FLOAT", "BINFLOAT"), self.floating)
        handlers |= {"NONE": self.none, "NEWTRUE": self.boolean, "NEWFALSE": self.boolean}
        handlers |= {"EMPTY_LIST": self.empty_list, "EMPTY_DICT": self.empty_dict, "LIST": self.list, "DICT": self.dict}
        handlers |= {"APPEND": self.append, "APPENDS": self.appends, "SETITEM": self.setitem, "SETITEMS": self.setitems}
        handlers |= {"MEMOIZE": self.memoize, "PUT": self.put, "BINPUT": self.put, "LONG_BINPUT": self.put}
        handlers |= {"GET": self.get, "BINGET": self.get, "LONG_BINGET": self.get}
        self.handlers = {_OPS[name]: method for name, method in handlers.items()}

    # -------- pushing values
    def push(self, value: Any) -> None:
        self.items += 1
        if self.items > MAX_ITEMS:
            raise _Refused(f"holds more than {MAX_ITEMS:,} values")
        self.stack.append(value)

    def nothing(self, arg: Any) -> None:
        pass

    def mark(self, arg: Any) -> None:
        self.push(_MARK)

    def string(self, text: str) -> None:
        if len(text) > MAX_STRING:
            raise _Refused(f"has a string of {len(text):,} characters (at most {MAX_STRING:,})")
        self.count_text(len(text))
        self.push(("str", text))

    def count_text(self, chars: int) -> None:
        self.text += chars
        if self.text > MAX_TEXT:
            raise _Refused(f"holds more than {MAX_TEXT:,} characters of text")

    def integer(self, value: int) -> None:
        if not -_MAX_INT <= value < _MAX_INT:
            raise _Refused(f"has an integer beyond 64 bits ({value.bit_length()} bits)")
        self.push(("scalar", type(value).__name__))  # INT "01" decodes as True

    def floating(self, value: float) -> None:
        if not math.isfinite(value):
            raise _Refused(f"has the float {value}")
        self.push(("scalar", "float"))

    def none(self, arg: Any) -> None:
        self.push(("scalar", "NoneType"))

    def boolean(self, arg: Any) -> None:
        self.push(("scalar", "bool"))

    # -------- building containers
    def empty_list(self, arg: Any) -> None:
        self.push(_Container("list"))

    def empty_dict(self, arg: Any) -> None:
        self.push(_Container("dict"))

    def list(self, arg: Any) -> None:
        made = _Container("list")
        self.add(made, self.pop_to_mark())
        self.push(made)

    def dict(self, arg: Any) -> None:
        made = _Container("dict")
        self.add(made, self.pop_to_mark())
        self.push(made)

    def append(self, arg: Any) -> None:
        child = self.pop()
        self.add(self.top("list"), [child])

    def appends(self, arg: Any) -> None:
        children = self.pop_to_mark()
        self.add(self.top("list"), children)

    def setitem(self, arg: Any) -> None:
        value = self.pop()
        key = self.pop()
        self.add(self.top("dict"), [key, value])

    def setitems(self, arg: Any) -> None:
        children = self.pop_to_mark()
        self.add(self.top("dict"), children)

    def pop_to_mark(self) -> list[Any]:
        stack = self.stack
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is _MARK:
                values = stack[i + 1 :]
                del stack[i:]
                return values
        raise _Refused("has no MARK where one is needed")

    def pop(self) -> Any:
        if not self.stack or self.stack[-1] is _MARK:
            raise _Refused("pops an empty stack")
        return self.stack.pop()

    def top(self, kind: str) -> _Container:
        top = self.stack[-1] if self.stack else None
        if not isinstance(top, _Container) or top.kind != kind:
            raise _Refused(f"adds items to something that is not a {kind}")
        return top

    def add(self, parent: _Container, children: list[Any]) -> None:
        if parent.kind == "dict":
            if len(children) % 2:
                raise _Refused("has a dict key without a value")
            for key in children[::2]:
                if not (type(key) is tuple and key[0] == "str"):
                    raise _Refused("has a dict key that is not a string")
        for child in children:
            if type(child) is _Container and child.depth >= parent.depth:
                parent.depth = child.depth + 1
                if parent.depth > MAX_DEPTH:
                    raise _Refused(f"nests deeper than {MAX_DEPTH} levels")

    # -------- the memo
    def memoize(self, arg: Any) -> None:
        self.put(len(self.memo))

    def put(self, index: Any) -> None:
        if not self.stack or self.stack[-1] is _MARK:
            raise _Refused("memoizes an empty stack")
        if index != len(self.memo):  # the pickler numbers memo slots 0, 1, 2, …; a huge index allocates
            raise _Refused(f"uses memo slot {index} out of order")
        self.memo.append(self.stack[-1])

    def get(self, index: Any) -> None:
        if not 0 <= index < len(self.memo):
            raise _Refused(f"reads memo slot {index}, which was never written")
        value = self.memo[index]
        if type(value) is _Container:
            raise _Refused(f"references a {value.kind} twice (a shared or self reference)")
        if value[0] == "str":
            self.count_text(len(value[1]))
        self.push(value)


def _check_opcodes(data: bytes) -> None:
    """Walk the opcodes without executing them; raise _Refused for anything that is not plain data."""
    walk = _Walk()
    handlers = walk.handlers
    stream = io.BytesIO(data)
    for ops, (opcode, arg, pos) in enumerate(pickletools.genops(stream), 1):
        handler = handlers.get(opcode.code)
        if handler is None:
            _refuse_opcode(opcode.name, arg, pos, walk)
        if ops > _MAX_OPS:
            raise _Refused(f"has more than {_MAX_OPS:,} opcodes")
        if opcode.name == "PROTO" and pos != 0:
            raise _Refused("has a PROTO opcode after the start")
        try:
            handler(arg)
        except _Refused as err:
            raise _Refused(f"{err} (opcode {opcode.name} at byte {pos})") from None
    stack = walk.stack  # genops stopped at STOP
    if len(stack) != 1 or stack[0] is _MARK:
        raise _Refused("does not end with exactly one value on its stack")
    kind = stack[0].kind if type(stack[0]) is _Container else stack[0][0] if stack[0][0] == "str" else stack[0][1]
    if kind != "dict":
        raise _Refused(f"holds a {kind}; expected a dict with keys train, val, test")
    if stream.tell() != len(data):
        raise _Refused(f"has {len(data) - stream.tell():,} bytes after its end")


def _refuse_opcode(name: str, arg: Any, pos: int, walk: _Walk) -> None:
    if name in ("GLOBAL", "INST"):  # arg: "module name"
        raise _Refused(f"tries to unpickle {'.'.join(str(arg).split(' ', 1))}")
    if name == "STACK_GLOBAL":  # module and name are the two strings on top of the stack
        named = [v[1] if type(v) is tuple and v[0] == "str" else "?" for v in walk.stack[-2:]]
        raise _Refused(f"tries to unpickle {'.'.join(named)}")
    why = "calls a function" if name in _CALLS else "builds something other than plain data"
    raise _Refused(f"uses pickle opcode {name} at byte {pos} ({why})")


class _NoGlobals(pickle.Unpickler):
    """Belt and braces: the opcode walk has already refused every global."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Neither the walk nor unpickling makes cycles; without the pause, 100,000 new objects trigger
    full collections that traverse every live object of the process (seconds in a big one)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _unpickle(data: bytes, name: str) -> dict[str, Any]:
    _check_size(data, name)
    with _gc_paused():
        return _unpickle_checked(data, name)


def _unpickle_checked(data: bytes, name: str) -> dict[str, Any]:
    try:
        _check_opcodes(data)
    except _Refused as err:
        text = str(err)
        if text.startswith("tries to unpickle"):
            raise ManifestError(
                f"manifest {name} {one_line(text)}; only plain containers and scalars are allowed"
            ) from None
        suffix = f"; {_PLAIN}" if text.startswith("uses pickle opcode") else ""
        raise ManifestError(f"manifest {name} {one_line(text)}{suffix}") from None
    except Exception as err:  # genops: unknown opcode, truncated argument, bad number or string
        raise ManifestError(f"manifest {name} is not a valid pickle: {one_line(err)}") from None
    try:
        return _NoGlobals(io.BytesIO(data)).load()
    except Exception as err:  # what the walk cannot see: bad frames, undecodable py2 strings
        raise ManifestError(f"manifest {name} is not a valid pickle: {one_line(err)}") from None


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


def _check_schema(schema: object, name: str) -> dict[str, Any] | None:
    if schema is None:
        return None
    schema = _check_dict(schema, "schema", name, "a dict")
    for key, value in schema.items():
        if key == "class_names":
            if type(value) is not list or tuple(value) != CLASS_NAMES:
                shown = ",".join(map(str, value)) if type(value) is list else _shown(value)
                raise ManifestError(
                    f"manifest {name} has classes {one_line(shown)}; this job expects {','.join(CLASS_NAMES)}"
                )
        elif key == "metadata_names":
            if type(value) is not list or len(value) != METADATA_SIZE or not all(type(v) is str for v in value):
                raise _fail(name, f"schema metadata_names {_shown(value)} is not a list of {METADATA_SIZE} names")
        elif key == "image_shape":
            if not (type(value) is list and len(value) == 3 and all(_is_count(v) and v > 0 for v in value)):
                raise _fail(name, f"schema image_shape {_shown(value)} is not [height, width, channels]")
        elif key == "image_encoding":
            if value not in _IMAGE_ENCODINGS:
                raise _fail(name, f"schema image_encoding {_shown(value)} is not one of {', '.join(_IMAGE_ENCODINGS)}")
        else:
            _check_unknown(key, value, name, "schema.")
    return schema


def _check_counts(counts: object, name: str) -> dict[str, Any] | None:
    """`counts[split]` is a total or a per-class dict; `skipped_unk` a total."""
    if counts is None:
        return None
    counts = _check_dict(counts, "counts", name, "a dict of per-split image counts")
    for key, value in counts.items():
        if key in SPLITS:
            per_class = type(value) is dict and all(k in CLASS_NAMES and _is_count(v) for k, v in value.items())
            if not (_is_count(value) or per_class):
                raise _fail(name, f"counts {key} is {_shown(value)}, expected a count or class name → count")
        elif key == "skipped_unk":
            if not _is_count(value):
                raise _fail(name, f"counts skipped_unk is {_shown(value)}, expected a count")
        else:
            _check_unknown(key, value, name, "counts.")
    return counts


def _check_sha256(sha: object, name: str) -> dict[str, str]:
    if sha is None:
        return {}
    sha = _check_dict(sha, "sha256", name, "a dict of shard URI → hex digest")
    for uri, digest in sha.items():
        _check_uri(uri, "sha256 key", name)
        if not (type(digest) is str and _SHA256.fullmatch(digest)):
            raise _fail(name, f"sha256 entry {_shown(uri)} is not a 64-digit lowercase hex digest")
    return dict(sha)


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
    "one_line",
    "parse",
    "read_file",
    "summary_lines",
]
