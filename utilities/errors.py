"""One base for every error the job raises on purpose, and one way to put an error on one line.

    raise DataError(f"cannot fetch shard {uri}: {one_line(err)}")
    ...
    except JobError as exc:           # cli.py: "error: <one line>", exit exc.exit_code
        print(f"error: {exc}")

`JobError` subclasses keep a builtin base too (`ConfigError(JobError, ValueError)`), so callers that
catch ValueError or RuntimeError still do. `exit_code` 2: the input was wrong (flags, data, manifest,
credentials, devices) and nothing ran that a fix must redo; 1: the run failed on the way (a NaN loss,
a compression step).
"""

from __future__ import annotations


class JobError(Exception):
    """An error meant for the user: `str()` is one line that says what is wrong and, where it can, what to do."""

    exit_code = 2

    def __str__(self) -> str:
        return one_line(super().__str__(), limit=1000)


class RunFailure(JobError):
    """Inputs were fine but the run failed part way (exit 1)."""

    exit_code = 1


def one_line(value: object, limit: int = 300) -> str:
    """An exception's first message line (its type name if it has none), or any text with whitespace
    runs collapsed; cut to `limit` characters."""
    if isinstance(value, BaseException):
        text = str(value).strip()
        value = text.splitlines()[0] if text else type(value).__name__
    line = " ".join(str(value).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"
