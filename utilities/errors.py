"""One base for every error the job raises on purpose, and one way to put an error on one line.

    raise DataError(f"cannot fetch shard {uri}: {one_line(err)}")
    ...
    except JobError as exc:           # cli.py: "error: <one line>", exit exc.exit_code
        print(f"error: {exc}")

`JobError` subclasses keep a builtin base too (`ConfigError(JobError, ValueError)`), so callers that
catch ValueError or RuntimeError still do. `exit_code` 2: the input was wrong (flags, data, manifest,
credentials, devices) and nothing ran that a fix must redo; 1: the run failed on the way (a NaN loss,
a compression step).

Credentials never reach a message, a log or a record: `redact_url` scrubs every URL in a text first.

    redact_url("fetch https://user:TOKEN@host/r.git?access_token=T2&ref=main failed")
    # 'fetch https://***@host/r.git?access_token=***&ref=main failed'
"""

from __future__ import annotations

import argparse
import re

REDACTED = "***"
# A URL inside any text: a scheme, "://", then up to whitespace or a quote (JSON, shell, Markdown).
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>`]+")
# Its user info: everything before the last "@" of the authority (a password may hold an unescaped "@").
_USERINFO = re.compile(r"^([^:]+://)[^/?#]*@")
# Query (or ;-parameter) values whose name says credential: access_token, private_token, key, api_key,
# password, passwd, pwd, secret, sig, X-Goog-Signature, X-Amz-Credential, X-Amz-Security-Token, auth, …
_CREDENTIAL_PARAM = re.compile(
    r"([?&;][^=&;#]*(?:token|key|secret|pass|pwd|sig|credential|auth)[^=&;#]*=)[^&;#]*", re.IGNORECASE
)


class JobError(Exception):
    """An error meant for the user: `str()` is one line that says what is wrong and, where it can, what to do."""

    exit_code = 2

    def __str__(self) -> str:
        return one_line(super().__str__(), limit=1000)


class RunFailure(JobError):
    """Inputs were fine but the run failed part way (exit 1)."""

    exit_code = 1


class CompressionError(RunFailure, RuntimeError):
    """A compression step (pruning, distillation, TFLite) that cannot run as asked; one line."""


def one_line(value: object, limit: int = 300) -> str:
    """An exception's first message line (its type name if it has none), or any text with whitespace
    runs collapsed and URLs redacted (`redact_url`); cut to `limit` characters."""
    if isinstance(value, BaseException):
        text = str(value).strip()
        value = text.splitlines()[0] if text else type(value).__name__
    line = redact_url(" ".join(str(value).split()))
    return line if len(line) <= limit else line[: limit - 1] + "…"


def redact_url(text: str) -> str:
    """`text` with every URL's user info (`user:password@`, `token@`) and credential-like query values
    replaced by `***`; everything else, and any text that holds no URL, unchanged."""
    return _URL.sub(_redact_one, text)


def _redact_one(match: re.Match[str]) -> str:
    url = _USERINFO.sub(rf"\1{REDACTED}@", match.group(0), count=1)
    return _CREDENTIAL_PARAM.sub(rf"\1{REDACTED}", url)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, unless its help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        # An on/off switch has no default worth printing: "--no-augment (default: True)" reads as "on".
        # Nor has a `-p [BOOL]` flag (off unless given); no default (None, or an empty list: `-q`
        # repeated zero times) prints nothing either; a help that names its default keeps its own words.
        switch = isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction)
        switch = switch or isinstance(action.default, bool)
        if switch or action.default is None or action.default == [] or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)

    def _expand_help(self, action: argparse.Action) -> str:
        # A default read from the environment (DVC_REPO) may hold a token: --help is shown to anyone.
        return redact_url(super()._expand_help(action))


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag or value is one line on stderr (exit 2), not the whole usage first:
    `cli.py: error: unrecognized arguments: --epoch 3 (see cli.py --help)`; `--help` shows every
    default (`DefaultsHelpFormatter`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {redact_url(message)} (see {self.prog} --help)\n")
