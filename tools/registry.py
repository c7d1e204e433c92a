"""Publish a dataset manifest to the DVC data registry under a git tag (DESIGN §2.3).

    python -m tools.registry --registry DIR --manifest PATH --tag TAG [--remote URI]

The registry is a plain git repository whose folder `Versioning/` is tracked by DVC
(`Versioning.dvc`); each dataset version is one tag (`dataset_v01`, …). `sh dvc_pull.sh -t TAG -r DIR`
(or `dvc get DIR Versioning --rev TAG`) reads it back. The first publish creates the repository
(git + `dvc init`) and needs `--remote` (a local folder or `gs://bucket/prefix`); later publishes
reuse the configured remote unless a new one is given.

Order matters: the manifest is pushed to the DVC remote *before* the commit and the tag, so a tag
never points at data the remote lacks. With STORAGE_EMULATOR_HOST set, a gs:// remote gets
`endpointurl` in `.dvc/config.local` (machine-specific, never committed); dvc_pull.sh passes the same
endpoint to `dvc get`. A remote URL holding a credential (`user:token@`, `?access_token=`) is refused: it
would be committed in `.dvc/config` and pass through dvc's command line.

This module imports only the standard library (plus `utilities.data.manifest` and `utilities.storage`,
themselves stdlib at import) so dvc_pull.sh can use `load_manifest` / `summary_lines` with any python3.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from utilities.data.manifest import MANIFEST_NAME, REGISTRY_DIR, Manifest, ManifestError, read_file, summary_lines
from utilities.data.manifest import parse as parse_manifest
from utilities.errors import JobError, OneLineParser, redact_url

REMOTE_NAME = "storage"
TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
GIT_IDENTITY = ("DermAID data registry", "registry@dermaid.invalid")
_ERROR_LINE_RE = re.compile(r"^(fatal|error|ERROR):")
# gcsfs warns on every anonymous/emulator request; DVC ends every error with a support link.
_NOISE = ("Could not determine bucket type", "Having any troubles?")


class RegistryError(JobError, RuntimeError):
    """Publishing failed; the message is one line and never holds a credential."""


# ---------------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------------


def load_manifest(path: str | os.PathLike[str]) -> Manifest:
    """The manifest at `path`, unpickled safely and checked (see utilities.data.manifest)."""
    try:
        return parse_manifest(read_file(path), str(path))  # read_file refuses an oversized file unread
    except FileNotFoundError as exc:
        raise RegistryError(f"manifest {path} does not exist") from exc
    except OSError as exc:
        raise RegistryError(f"cannot read manifest {path}: {exc}") from exc
    except ManifestError as exc:
        raise RegistryError(str(exc)) from exc


# ---------------------------------------------------------------------------------------------------
# Publish
# ---------------------------------------------------------------------------------------------------


def validate_tag(tag: str) -> None:
    """Tags go into git refs and shell commands: a safe subset of git's ref-name rules."""
    if not TAG_RE.fullmatch(tag) or ".." in tag or tag.endswith((".", ".lock")):
        raise RegistryError(f"invalid tag {tag!r}: use letters, digits, '.', '_', '-', e.g. dataset_v03")


def publish(registry: Path, manifest: Path | str, tag: str, remote: str | None = None) -> str:
    """Commit `manifest` as `Versioning/versioned_paths.pickle`, push it to the remote, tag; returns the sha."""
    validate_tag(tag)
    if remote is not None and redact_url(remote) != remote:
        raise RegistryError(
            f"--remote {redact_url(remote)} holds a credential, which would be committed in .dvc/config: give the "
            f"URL without it and set it with `dvc remote modify --local {REMOTE_NAME} ...` in the registry"
        )
    registry = Path(registry).resolve()
    with tempfile.TemporaryDirectory(prefix="registry-") as tmp:
        staged = _fetch_manifest(manifest, Path(tmp))
        summary = "; ".join(summary_lines(load_manifest(staged)))
        _ensure_repo(registry)
        with _publish_lock(registry):
            _refuse_existing_tag(registry, tag)
            _configure_remote(registry, remote)
            (registry / REGISTRY_DIR).mkdir(exist_ok=True)
            shutil.copyfile(staged, registry / REGISTRY_DIR / MANIFEST_NAME)
            # No -q: `dvc push -q` swallows the ERROR line we would report.
            _dvc(registry, "add", REGISTRY_DIR)
            _dvc(registry, "push")  # data first: a tag must never name bytes the remote lacks
            _commit(registry, f"{tag}: {summary}")
            _git(registry, "tag", "-a", tag, "-m", f"Dataset {tag}: {summary}")
            return _git(registry, "rev-parse", "HEAD")


def _fetch_manifest(manifest: Path | str, folder: Path) -> Path:
    """A local copy of the manifest (it may live on gs://, where tools.prepare wrote it)."""
    from utilities import storage

    staged = folder / MANIFEST_NAME
    if not storage.is_gcs(str(manifest)) and not Path(manifest).is_file():
        raise RegistryError(f"manifest {manifest} does not exist")
    try:
        storage.download_file(str(manifest), staged)
    except storage.StorageError as exc:
        raise RegistryError(f"cannot read manifest: {exc}") from exc
    return staged


def _ensure_repo(registry: Path) -> None:
    if not (registry / ".git").is_dir():
        if registry.exists() and any(registry.iterdir()):
            raise RegistryError(f"{registry} exists and is not a git repository; give a new or empty folder")
        registry.mkdir(parents=True, exist_ok=True)
        _git(registry, "init", "-q", "-b", "main")
        _git(registry, "config", "user.name", GIT_IDENTITY[0])
        _git(registry, "config", "user.email", GIT_IDENTITY[1])
    if not (registry / ".dvc").is_dir():
        _dvc(registry, "init", "-q")
        _dvc(registry, "config", "core.analytics", "false")


@contextlib.contextmanager
def _publish_lock(registry: Path) -> Iterator[None]:
    """Two publishes into one registry would interleave commits and tags; serialize them."""
    with open(registry / ".git" / "dermaid-publish.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _refuse_existing_tag(registry: Path, tag: str) -> None:
    tags = _git(registry, "tag", "--list").split()
    if tag in tags:
        raise RegistryError(f"tag {tag} already exists in {registry} (tags: {', '.join(tags)}); choose a new tag")


def _configure_remote(registry: Path, remote: str | None) -> None:
    url = _remote_url(registry, remote)
    _check_remote(url)  # before touching the config: a bad --remote leaves the registry as it was
    if remote is not None:
        _dvc(registry, "remote", "add", "-d", "-f", REMOTE_NAME, url)
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if url.startswith("gs://") and emulator:
        _dvc(registry, "remote", "modify", "--local", REMOTE_NAME, "endpointurl", emulator)


def _remote_url(registry: Path, remote: str | None) -> str:
    if remote is not None:
        # DVC resolves a relative path against .dvc/, not the caller's cwd; store it absolute.
        return remote if "://" in remote else str(Path(remote).resolve())
    proc = _run([_dvc_binary(), "config", f"remote.{REMOTE_NAME}.url"], registry)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RegistryError(f"{registry} has no DVC remote yet; pass --remote (a folder or gs://bucket/prefix)")
    return proc.stdout.strip()


def _check_remote(url: str) -> None:
    """DVC reports a missing bucket as "unexpected error - b/NAME/o"; say it plainly, before any commit."""
    from utilities import storage

    try:
        storage.check_writable(url)
    except storage.StorageError as exc:
        raise RegistryError(f"DVC remote is not usable: {exc}") from exc


def _commit(registry: Path, message: str) -> None:
    candidates = (f"{REGISTRY_DIR}.dvc", ".gitignore", ".dvcignore", ".dvc/config", ".dvc/.gitignore")
    _git(registry, "add", "--", *[c for c in candidates if (registry / c).exists()])
    if _run(["git", "diff", "--cached", "--quiet"], registry).returncode == 0:
        return  # same manifest as the last version: the new tag names the existing commit
    _git(registry, "commit", "-q", "-m", message)


# ---------------------------------------------------------------------------------------------------
# Subprocesses
# ---------------------------------------------------------------------------------------------------


def _git(registry: Path, *args: str) -> str:
    return _checked(["git", *args], registry)


def _dvc(registry: Path, *args: str) -> str:
    return _checked([_dvc_binary(), *args], registry)


def _dvc_binary() -> str:
    beside = Path(sys.executable).parent / "dvc"  # the project's virtualenv, even when not on PATH
    found = str(beside) if beside.exists() else shutil.which("dvc")
    if not found:
        raise RegistryError("dvc is not installed: run from the project's .venv (make install)")
    return found


def _run(args: Sequence[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_TERMINAL_PROMPT": "0"}
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, env=env, check=False)


def _checked(args: Sequence[str], cwd: Path) -> str:
    proc = _run(args, cwd)
    if proc.returncode != 0:
        command = f"{Path(args[0]).name} {args[1]}"  # never the full argv: it may hold a remote URL
        raise RegistryError(f"`{command}` failed in {cwd}: {meaningful_line(proc.stderr + proc.stdout)}")
    return proc.stdout.strip()


def meaningful_line(output: str) -> str:
    """The line that explains a git/dvc failure: the first `fatal:`/`ERROR:` line, else the last line."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip() and not ln.startswith(_NOISE)]
    flagged = [ln for ln in lines if _ERROR_LINE_RE.match(ln)]
    line = (flagged or lines or ["no output"])[0 if flagged else -1]
    return redact_url(line)[:300]


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m tools.registry", description=__doc__.splitlines()[0])
    parser.add_argument("--registry", required=True, type=Path, help="git repository of the registry (created if new)")
    parser.add_argument("--manifest", required=True, help="versioned_paths.pickle (local path or gs:// URI)")
    parser.add_argument("--tag", required=True, help="git tag for this dataset version, e.g. dataset_v03")
    parser.add_argument("--remote", help="DVC remote: a folder or gs://bucket/prefix (required the first time)")
    args = parser.parse_args(argv)
    try:
        sha = publish(args.registry, args.manifest, args.tag, args.remote)
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.tag} -> {sha} in {args.registry}")
    for line in summary_lines(load_manifest(Path(args.registry) / REGISTRY_DIR / MANIFEST_NAME)):
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
