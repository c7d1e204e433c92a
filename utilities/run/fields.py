"""Where a `Config` field's value comes from, declared on the field itself: its flag(s) and help
(`flag`, `switch`, `flags`, or `opt` for a field with a default), and the environment variable read
when no flag gives one (`env=`, or `from_env` for a field without a flag; a field that cli.DERIVED
computes names every variable its rule reads, the main one first). `cli.py` reads these
declarations (`source(field)`) to build its parser and fill the `Config`; `parse_bool` is how every
`[BOOL]` flag and boolean variable is read.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from utilities.errors import JobError


class ConfigError(JobError, ValueError):
    """A configuration value that makes no sense; the message is one line meant for the user."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


_TRUE = {"1", "true", "t", "yes", "y", "on"}
_FALSE = {"0", "false", "f", "no", "n", "off"}


def parse_bool(text: str) -> bool:
    """`-x False` must mean off (the original's `type=bool` made every string True)."""
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


@dataclass(frozen=True)
class Flag:
    """One flag of a field: its spellings (the first long one is the main one), help and argparse options.

    `type` defaults to the field's annotation (int, float, else str); `default` to the field's default.
    """

    names: tuple[str, ...]
    help: str
    options: dict[str, Any]


@dataclass(frozen=True)
class Source:
    """Where cli.py takes a field's value from: the flags, then `env` (a variable) when none gave one."""

    flags: tuple[Flag, ...] = ()
    env: tuple[str, ...] = ()  # the variables it is read from: the main one, then any a derivation reads
    exclusive: bool = False  # the flags contradict each other: cli.py keeps their values apart for `pick`

    def pick(self, given: Sequence[Any]) -> Any:
        """The value of an exclusive field from its flags' values in order (None: that flag not given)."""
        chosen = [(f, value) for f, value in zip(self.flags, given, strict=True) if value is not None]
        check(len(chosen) <= 1, " and ".join(f.names[0] for f, _ in chosen) + " contradict each other; choose one")
        return chosen[0][1] if chosen else None


Variables = str | tuple[str, ...] | None  # one variable's name, several, or none


def _names(env: Variables) -> tuple[str, ...]:
    return (env,) if isinstance(env, str) else tuple(env or ())


def flag(*names: str, help: str, env: Variables = None, **options: Any) -> dict[str, Source]:
    """Field metadata: one flag (all its spellings), its help, and optionally the variable(s) read without it."""
    return {"source": Source((Flag(names, help, options),), _names(env))}


def switch(*names: str, help: str) -> dict[str, Source]:
    """An on/off flag that also takes a value, as the original's `-p True`: `-p`, `-p True`, `-p no`."""
    return flag(*names, help=help, nargs="?", const=True, type=parse_bool, metavar="BOOL")


def flags(*declared: dict[str, Source], env: Variables = None, exclusive: bool = False) -> dict[str, Source]:
    """Field metadata: several flags setting one field (the last given wins, or, `exclusive`, only one may be)."""
    return {"source": Source(tuple(f for d in declared for f in d["source"].flags), _names(env), exclusive)}


def opt(default: Any, /, *names: str, help: str, env: Variables = None, **options: Any) -> Any:
    """A field with one flag: `epochs: int = opt(10, "-e", "--epochs", help="epochs")`."""
    return field(default=default, metadata=flag(*names, help=help, env=env, **options))


def from_env(env: str | tuple[str, ...], default: str | None = None) -> Any:
    """A field without a flag that cli.py fills from the variable `env` (or by a rule in cli.DERIVED over
    the variables `env` names)."""
    return field(default=default, metadata={"source": Source(env=_names(env))})


def source(f: dataclasses.Field) -> Source | None:
    """A field's declared source, or None: the field keeps its default."""
    return f.metadata.get("source")
