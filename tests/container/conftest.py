"""Fixtures of the container tests: a private Docker engine, the image (built once), data and servers.

    .venv/bin/python -m pytest tests/container -q          # also part of `make test`
    .venv/bin/python -m pytest -m 'not container'          # everything else

- `engine` (session): tests/container/engine.py's dockerd on REPO/.cache/docker, stopped at the end.
  Without an engine (not installed and not root, or dockerd fails) every container test skips with
  one line saying why; with CI=true that is a failure instead.
- `image` (session): the project's Dockerfile built ONCE per session (the engine's default builder:
  the legacy one here), base image pulled or made as a stand-in. Every container test uses it.
- `registry` (session): the demo shards on the GCS emulator (gs://), a data registry tagging them
  (DVC remote on that bucket), served by git over HTTP with basic auth on 127.0.0.1.
- `numbers` (session): measurements the tests record; printed at the end of the session (a section
  of tests/fixtures/summary.py) and written to .cache/container/numbers.json.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.container.engine import Engine, EngineUnavailable, base_image_name, build, ensure_base
from tests.fixtures import summary
from tests.fixtures.gcs import upload_prepared
from tests.fixtures.git_http import GitOverHttp

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "container"
IMAGE = "dermaid-training:test"
TOKEN = "SECRETTOKEN321"
GIT_LOGIN = f"user:{TOKEN}"
WANDB_KEY = "SECRETWANDBKEY654"
SECRETS = (TOKEN, WANDB_KEY)
DATA_BUCKET = "dermaid-container-data"
TAG = "dataset_v01"
SPLITS = ("train", "val", "test")
# The smallest real run: DenseNet121 at 32 px, random weights, one epoch.
# A frozen backbone and no SavedModel export: the container runs stay within minutes on 2 shared cores.
TINY = ["--weights", "none", "--freeze-backbone", "--no-saved-model", "--image-size", "32"]
TINY += ["-b", "16", "-f", "16", "-e", "1", "--patience", "0"]

BUILD_TIMEOUT_S = 3600

_numbers: dict[str, object] = {}
summary.SECTIONS["container numbers (also in .cache/container/numbers.json)"] = _numbers


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    ours = [item for item in items if here in Path(item.fspath).parents]
    for item in ours:
        item.add_marker(pytest.mark.container)
        item.add_marker(pytest.mark.xdist_group("docker"))  # one engine and one image build: one worker
        # Whichever test comes first sets up the engine and builds the image: cold, that is
        # ~3 min of debootstrap plus ~6 min of build (the locked environment, TF wheels included).
        item.add_marker(pytest.mark.timeout(BUILD_TIMEOUT_S))
    # Not root and no engine running: leave them out with one line (the session's summary) rather
    # than one skip per test. In CI they stay, and the engine fixture fails them.
    reason = Engine.unavailable_reason(ROOT) if ours and not _in_ci() else None
    if reason:
        items[:] = [item for item in items if item not in ours]
        config.hook.pytest_deselected(items=ours)
        summary.SECTIONS["container tests not run"] = [f"{len(ours)} tests: {reason}"]


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def pytest_sessionfinish(session):
    if _numbers:
        CACHE.mkdir(parents=True, exist_ok=True)
        (CACHE / "numbers.json").write_text(json.dumps(_numbers, indent=2) + "\n")


@pytest.fixture(scope="session")
def numbers() -> dict[str, object]:
    return _numbers


# ---------------------------------------------------------------------------------------------------
# Engine and image
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    try:
        started = time.monotonic()
        engine = Engine.start(ROOT)
    except EngineUnavailable as exc:
        if _in_ci():
            pytest.fail(f"container tests: no Docker engine in CI: {exc}", pytrace=False)
        pytest.skip(f"container tests: no Docker engine: {exc}")
    _numbers["engine_start_s"] = round(time.monotonic() - started, 1)
    try:
        yield engine
    finally:
        if engine.pid is not None:  # our own engine: drop the layers no tag uses any more (older builds)
            engine.docker("image", "prune", "-f", check=False)
        engine.stop()


@dataclass(frozen=True)
class Image:
    tag: str
    commit: str | None  # the GIT_COMMIT it was built with


@pytest.fixture(scope="session")
def image(engine: Engine) -> Image:
    started = time.monotonic()
    how = ensure_base(engine, base_image_name(ROOT / "Dockerfile"), CACHE, log=lambda m: print(m, file=sys.stderr))
    _numbers["base_image"] = f"{how} in {time.monotonic() - started:.0f} s"
    seconds = build(engine, ROOT, IMAGE, log_path=CACHE / "build.log")
    _numbers["build_s"] = round(seconds, 1)
    # The commit the build baked in (HEAD may move while the tests run).
    env = engine.docker("inspect", "--format", "{{range .Config.Env}}{{println .}}{{end}}", IMAGE).stdout.split()
    baked = next((line.split("=", 1)[1] for line in env if line.startswith("DERMAID_GIT_COMMIT=")), "")
    assert baked, f"the image was built without GIT_COMMIT: {env}"
    return Image(IMAGE, baked)


# ---------------------------------------------------------------------------------------------------
# Data: shards on the emulated bucket, a registry tagging them, served over authenticated HTTP
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Registry:
    served: Path  # folder holding registry.git (bare), for more servers
    server: GitOverHttp  # on 127.0.0.1
    emulator: object  # tests.fixtures.gcs.GcsEmulator

    @property
    def url(self) -> str:
        return self.server.url("registry.git")


def gcs_client():
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(project="emulator", credentials=AnonymousCredentials())


@pytest.fixture(scope="session")
def registry(prepared, gcs_emulator, tmp_path_factory) -> Iterator[Registry]:
    tmp = tmp_path_factory.mktemp("container-registry")
    client = gcs_client()
    gcs_emulator.make_bucket(DATA_BUCKET)
    manifest = upload_prepared(prepared.manifest_path, client, DATA_BUCKET)
    manifest_path = tmp / "versioned_paths.pickle"
    manifest_path.write_bytes(pickle.dumps(manifest, protocol=4))

    env = {**os.environ, "HOME": str(tmp), "STORAGE_EMULATOR_HOST": gcs_emulator.host}
    registry_dir, served = tmp / "registry", tmp / "served"
    subprocess.run(
        [
            *(sys.executable, "-m", "tools.registry", "--registry", registry_dir, "--manifest", manifest_path),
            *("--tag", TAG, "--remote", f"gs://{DATA_BUCKET}/dvc"),
        ],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    subprocess.run(["git", "clone", "-q", "--bare", registry_dir, served / "registry.git"], env=env, check=True)
    with GitOverHttp(served, login=GIT_LOGIN) as server:
        yield Registry(served, server, gcs_emulator)


# ---------------------------------------------------------------------------------------------------
# Helpers for the tests
# ---------------------------------------------------------------------------------------------------


def blobs(bucket: str, prefix: str = "") -> dict[str, bytes]:
    client = gcs_client()
    return {b.name: b.download_as_bytes() for b in client.list_blobs(bucket, prefix=prefix)}


def container_files(engine: Engine, container: str, dest: Path) -> list[Path]:
    """Every file the container added or changed (`docker diff`), copied out under `dest`."""
    diff = engine.docker("diff", container).stdout.split("\n")
    changed = {line[2:] for line in diff if line[:2] in ("A ", "C ")}
    tops = sorted({"/" + p.strip("/").split("/")[0] for p in changed if p.strip("/")})
    dest.mkdir(parents=True, exist_ok=True)
    files = []
    for top in tops:
        tar = dest / (top.strip("/") + ".tar")
        with open(tar, "wb") as out:
            engine.docker("cp", f"{container}:{top}", "-", stdout=out, capture_output=False, text=False)
        unpacked = dest / top.strip("/")
        unpacked.mkdir(exist_ok=True)
        subprocess.run(["tar", "-xf", tar, "-C", dest, "--no-same-owner"], check=False, capture_output=True)
        tar.unlink()
        files += [dest / p.lstrip("/") for p in changed if p.startswith(top + "/") or p == top]
    return sorted(p for p in files if p.is_file() and not p.is_symlink())


def files_containing(paths: list[Path], *needles: str) -> list[str]:
    hits = []
    for path in paths:
        data = path.read_bytes()
        hits += [f"{path} holds {needle[:6]}…" for needle in needles if needle.encode() in data]
    return hits


def secrets_folder(tmp: Path) -> Path:
    """A secrets/ folder as a user has it (git.txt, wandb.txt); world-readable: the image user is uid 1000."""
    secrets = tmp / "secrets"
    secrets.mkdir(mode=0o755)
    (secrets / "git.txt").write_text(GIT_LOGIN + "\n")
    (secrets / "wandb.txt").write_text(WANDB_KEY + "\n")
    for path in (secrets, *secrets.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return secrets


def copy_checkout(dest: Path) -> Path:
    """The working tree's tracked files (as they are now, uncommitted changes included) in `dest`."""
    listed = subprocess.run(
        ["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest
