"""The manifest's safe unpickler: an opcode walk lets only plain data within size caps through, then a no-globals unpickler.

Library module (no command line), used by `utilities.data.manifest.parse` only; imports only the standard
library and `utilities.errors`:

    raw = loads(data)        # a dict of plain data, or PickleRefused("tries to unpickle os.system; …")

A manifest is data, and this reader accepts nothing else. Before anything is unpickled, the opcode
stream is walked (`pickletools.genops`, which decodes opcodes and never executes them) on a shadow
stack: only dicts, lists, str, int, float, bool and None can be built; no opcode that imports or
calls anything (GLOBAL, STACK_GLOBAL, REDUCE, BUILD, NEWOBJ, INST, OBJ, EXT*, PERSID) and no tuple,
set, bytes or buffer is accepted; a list or dict may be referenced once only (a memo GET of a
container would make a shared or self reference: a 660-byte pickle could then expand to 2^60 items
when written as JSON); dict keys are strings (int keys hash predictably: a crafted pickle could make
every insert collide). Size caps bound what survives the walk, so unpickling afterwards costs at
most a few tens of MB and well under a second (the file itself is capped by `manifest.MAX_BYTES`):

- MAX_ITEMS (100,000) values and MAX_DEPTH (5) nesting. ISIC 2019's manifest holds 25,672 values
  (51,235 opcodes) nested 3 deep. 100,000 values of the costliest kind (empty dicts) take ~11 MB;
  the walk of the 300,000 opcodes allowed takes ~0.2-0.4 s on one busy core.
- MAX_STRING (4,096) characters per string (PATH_MAX; a gs:// URI is at most ~1,300) and
  MAX_TEXT (4 Mi) characters of all strings, a string referenced twice counted twice (ISIC 2019:
  0.31 Mi): a string shared by memo cannot multiply into gigabytes of run.json or W&B config.
  The costliest text allowed (4 Mi characters stored 4 bytes each) peaks at ~16 MB.
"""

from __future__ import annotations

import contextlib
import gc
import io
import math
import pickle
import pickletools
from collections.abc import Iterator
from typing import Any

from utilities.errors import one_line

MAX_ITEMS = 100_000
MAX_DEPTH = 5
MAX_STRING = 4096
MAX_TEXT = 4 * 1024 * 1024
_MAX_OPS = 3 * MAX_ITEMS  # a pickler spends at most 3 opcodes on a value (push, memoize, append)
_MAX_INT = 2**63  # manifest ints are counts and sizes; bigger ones would not survive JSON/int64
_PLAIN = "a manifest holds only dicts, lists, strings, numbers, booleans and None"


class PickleRefused(ValueError):
    """A pickle `loads` will not unpickle; `str()` is one line meant to follow the manifest's name:
    "tries to unpickle os.system; …", "is not a valid pickle: …"."""


def loads(data: bytes) -> dict[str, Any]:
    """Check the opcodes, then unpickle (plain data only); anything else → PickleRefused."""
    with _gc_paused():
        return _loads_checked(data)


class _Refused(Exception):
    """Raised by the opcode walk; `_loads_checked` turns it into a PickleRefused."""


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


def _loads_checked(data: bytes) -> dict[str, Any]:
    try:
        _check_opcodes(data)
    except _Refused as err:
        text = str(err)
        if text.startswith("tries to unpickle"):
            raise PickleRefused(f"{one_line(text)}; only plain containers and scalars are allowed") from None
        suffix = f"; {_PLAIN}" if text.startswith("uses pickle opcode") else ""
        raise PickleRefused(f"{one_line(text)}{suffix}") from None
    except Exception as err:  # genops: unknown opcode, truncated argument, bad number or string
        raise PickleRefused(f"is not a valid pickle: {one_line(err)}") from None
    try:
        return _NoGlobals(io.BytesIO(data)).load()
    except Exception as err:  # what the walk cannot see: bad frames, undecodable py2 strings
        raise PickleRefused(f"is not a valid pickle: {one_line(err)}") from None
