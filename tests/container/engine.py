"""A private Docker engine for the container tests and bench/container.py.

    .venv/bin/python -m pytest tests/container -q        # uses this through tests/container/conftest.py
    .venv/bin/python -m bench.container                    # the image's numbers

`Engine.start(repo)`: as root, installs docker.io when `dockerd` is missing, starts
`dockerd --data-root REPO/.cache/docker/data` with its own socket and pidfile under `.cache/docker`
(DOCKER_HOST=unix://…), and `stop()` ends it by its pid. Not root: the user's running engine
($DOCKER_HOST or /var/run/docker.sock) if there is one, left running. `ensure_base(...)` makes the image the
Dockerfile's `FROM` names when it cannot be pulled (no registry reachable): a Debian bookworm
rootfs from debootstrap (python3, pip, venv, CA certificates), given this host's extra CA
certificates, imported under exactly that name. The rootfs tarball is cached under
`.cache/container/`, the engine's layers under `.cache/docker/`, so a rerun starts warm.

Everything host-specific (mirror, certificates) goes into the stand-in base only, never into the
project's Dockerfile.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pip._internal.models.index import PyPI

DEFAULT_MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
STANDIN_PACKAGES = "python3,python3-pip,python3-venv,ca-certificates"
READY_TIMEOUT_S = 60


class EngineUnavailable(RuntimeError):
    """No Docker engine can run here; the message says why (one line)."""


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    return subprocess.run([str(c) for c in cmd], **kwargs)


def one_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


# ---------------------------------------------------------------------------------------------------
# Installing and starting the engine
# ---------------------------------------------------------------------------------------------------


def install_engine() -> None:
    """apt-get the engine (and debootstrap for the stand-in base, tini for `docker run --init`)."""
    if os.geteuid() != 0:
        raise EngineUnavailable(
            "dockerd is not installed and we are not root to install it (apt-get install docker.io)"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    packages = ["docker.io", "debootstrap", "tini"]
    result = run(["apt-get", "install", "-y", "--no-install-recommends", *packages], env=env)
    if result.returncode != 0:  # a stale package list: refresh once
        run(["apt-get", "update"], env=env)
        result = run(["apt-get", "install", "-y", "--no-install-recommends", *packages], env=env)
    if result.returncode != 0 or not shutil.which("dockerd"):
        raise EngineUnavailable(f"apt-get install docker.io failed: {one_line(result.stderr)}")


def docker_client() -> str:
    client = shutil.which("docker")
    if not client:
        raise EngineUnavailable("no docker client on PATH")
    return client


@dataclass
class Engine:
    """A dockerd we started (pid) on a socket of our own, and the client to talk to it."""

    cache: Path  # REPO/.cache/docker
    host: str  # DOCKER_HOST value
    pid: int | None = None
    log: Path | None = None
    exec_root: Path | None = None  # ours: sockets, network namespaces
    client: str = field(default_factory=docker_client)

    @property
    def env(self) -> dict[str, str]:
        """os.environ with DOCKER_HOST pointing at this engine (and no BuildKit request)."""
        env = {k: v for k, v in os.environ.items() if k not in ("DOCKER_BUILDKIT", "DOCKER_CONTEXT")}
        return env | {"DOCKER_HOST": self.host}

    def docker(self, *args: object, check: bool = True, timeout: float | None = 600, **kwargs):
        result = run([self.client, *args], env=kwargs.pop("env", self.env), timeout=timeout, **kwargs)
        if check and result.returncode != 0:
            raise RuntimeError(f"docker {' '.join(map(str, args[:3]))} failed ({result.returncode}): {result.stderr}")
        return result

    @classmethod
    def start(cls, repo: Path) -> Engine:
        if os.geteuid() != 0:  # dockerd needs root: use the user's running engine, if any (never stopped)
            reason = cls.unavailable_reason(repo)
            if reason:
                raise EngineUnavailable(reason)
            return cls._users(repo)
        if not shutil.which("dockerd"):
            install_engine()
        cache = repo / ".cache" / "docker"
        (cache / "data").mkdir(parents=True, exist_ok=True)
        # Sockets (ours and containerd's, under exec-root) must stay within the 108-byte limit of a
        # unix socket path; a deep checkout gets a short temporary exec-root instead.
        exec_root = cache / "exec"
        if len(str(exec_root)) > 60:
            exec_root = Path(tempfile.mkdtemp(prefix="dermaid-dockerd-"))
        exec_root.mkdir(exist_ok=True)
        socket = exec_root / "docker.sock"
        pidfile = cache / "dockerd.pid"
        stale = _read_pid(pidfile)
        if stale and _alive(stale) and _is_dockerd(stale):
            _terminate(stale)  # a previous session's engine that was killed before it could stop it
        log = cache / "dockerd.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [
                    *("dockerd", "--data-root", cache / "data", "--exec-root", exec_root),
                    *("--pidfile", pidfile, "-H", f"unix://{socket}", "--log-level", "warn"),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # not killed by a Ctrl-C meant for pytest before we stop it
            )
        engine = cls(cache=cache, host=f"unix://{socket}", pid=process.pid, log=log, exec_root=exec_root)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while engine.docker("version", "--format", "{{.Server.Version}}", check=False, timeout=10).returncode:
            if process.poll() is not None or time.monotonic() > deadline:
                engine.stop()
                raise EngineUnavailable(f"dockerd did not start: {one_line(log.read_text(errors='replace'))}")
            time.sleep(0.2)
        return engine

    @classmethod
    def _users(cls, repo: Path) -> Engine:
        host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        return cls(cache=repo / ".cache" / "docker", host=host)

    @classmethod
    def unavailable_reason(cls, repo: Path) -> str | None:
        """Why no engine can be had here, or None. Root can always try (install, start dockerd)."""
        if os.geteuid() == 0:
            return None
        if not shutil.which("docker"):
            return "not root (to install and start dockerd) and no docker client"
        engine = cls._users(repo)
        with contextlib.suppress(subprocess.TimeoutExpired):
            if engine.docker("version", "--format", "{{.Server.Version}}", check=False, timeout=20).returncode == 0:
                return None
        return f"not root (to start dockerd) and no running Docker engine at {engine.host}"

    def stop(self) -> None:
        """Stop our dockerd (SIGTERM, it stops its containers) and wait for it, by pid.

        dockerd 20.10 leaves its network namespace mounted under the exec-root when it exits; that
        mount would keep `rm -rf .cache` (or `git clean`) from removing the folder, so it goes too.
        """
        if self.pid is not None:
            _terminate(self.pid)
            self.pid = None
            for mount in reversed(_mounts_under(self.exec_root, self.cache)):
                run(["umount", "-l", mount])


def _mounts_under(*folders: Path | None) -> list[str]:
    """Mount points (in /proc/self/mounts order) inside any of `folders`."""
    roots = [str(folder) + "/" for folder in folders if folder is not None]
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1].encode().decode("unicode_escape") for line in mounts]
    return [p for p in points if any((p + "/").startswith(root) for root in roots)]


def _read_pid(path: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(path.read_text().strip())
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_dockerd(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/comm").read_text().strip() == "dockerd"
    return False


def _terminate(pid: int, timeout: float = 60) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our child: reap it
                return
        time.sleep(0.2)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


# ---------------------------------------------------------------------------------------------------
# The base image
# ---------------------------------------------------------------------------------------------------


def base_image_name(dockerfile: Path) -> str:
    """The image the Dockerfile's FROM asks for (an `ARG NAME=default` in FROM is resolved)."""
    text = dockerfile.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    name = re.search(r"^FROM (\S+)", text, re.M).group(1)
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], name)


def apt_mirror() -> str:
    """The Debian mirror of this machine's apt sources (one-line or deb822 format)."""
    candidates = []
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        if not path.is_file() or not path.name.endswith((".list", ".sources")):
            continue
        text = path.read_text(errors="replace")
        for line in text.splitlines():  # deb [options] URI SUITE COMPONENTS...
            parts = re.sub(r"\[[^]]*\]", "", line.split("#")[0]).split()
            if len(parts) >= 3 and parts[0] == "deb":
                candidates.append((parts[1], parts[2:3]))
        for block in re.split(r"\n\s*\n", text):  # deb822: Types / URIs / Suites
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", block, re.M))
            if "deb" in fields.get("Types", "").split() and fields.get("URIs"):
                candidates.extend((uri, fields.get("Suites", "").split()) for uri in fields["URIs"].split())
    for uri, suites in candidates:
        if SUITE in suites:
            return uri.rstrip("/")
    return DEFAULT_MIRROR


def ensure_base(engine: Engine, name: str, cache: Path, log=print) -> str:
    """Make sure image `name` exists: present, pulled, or a stand-in imported from debootstrap.

    Returns how it was obtained: "present", "pulled", "imported" (cached tarball) or "made".
    """
    if engine.docker("image", "inspect", name, check=False).returncode == 0:
        return "present"
    if engine.docker("pull", name, check=False, timeout=300).returncode == 0:
        return "pulled"
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / f"base-{re.sub(r'[^A-Za-z0-9._-]', '_', name)}.tar"
    how = "imported"
    if not tarball.exists():
        log(f"container tests: {name} cannot be pulled; making a stand-in with debootstrap (~3 min, cached)")
        _make_standin_tarball(tarball)
        how = "made"
    with open(tarball, "rb") as data:
        engine.docker(
            *("import", "--change", "ENV LANG=C.UTF-8", "--change", 'CMD ["python3"]', "-", name),
            stdin=data,
            text=False,
        )
    return how


def _make_standin_tarball(tarball: Path) -> None:
    if not shutil.which("debootstrap"):
        install_engine()
    with tempfile.TemporaryDirectory(prefix="standin-", dir=tarball.parent) as tmp:
        rootfs = Path(tmp) / "rootfs"
        mirror = apt_mirror()
        result = run(
            [
                *("debootstrap", "--variant=minbase", f"--include={STANDIN_PACKAGES}"),
                *(SUITE, rootfs, mirror),
            ]
        )
        if result.returncode != 0:
            raise RuntimeError(f"debootstrap from {mirror} failed: {one_line(result.stdout + result.stderr)}")
        # This host's extra CA certificates (e.g. a TLS-intercepting proxy's), so that pip inside
        # builds and containers trusts what the host trusts. The stand-in only: never the Dockerfile.
        extra = rootfs / "usr/local/share/ca-certificates"
        extra.mkdir(parents=True, exist_ok=True)
        for cert in Path("/usr/local/share/ca-certificates").glob("**/*.crt"):
            shutil.copy(cert, extra / cert.name)
        result = run(["chroot", rootfs, "update-ca-certificates"])
        if result.returncode != 0:
            raise RuntimeError(f"update-ca-certificates in the stand-in failed: {one_line(result.stderr)}")
        # Like the python image: pip may install into the system interpreter; `python` and `pip` exist.
        for marker in rootfs.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
            marker.unlink()
        for link, target in (("python", "python3"), ("pip", "pip3")):
            (rootfs / "usr/bin" / link).unlink(missing_ok=True)
            (rootfs / "usr/bin" / link).symlink_to(target)
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (rootfs / junk).glob("*"):
                if path.is_file():
                    path.unlink()
        partial = tarball.with_suffix(".partial")
        result = run(["tar", "-C", rootfs, "-cf", partial, "."])
        if result.returncode != 0:
            raise RuntimeError(f"tar of the stand-in rootfs failed: {one_line(result.stderr)}")
        partial.rename(tarball)


# ---------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------


def build_args(commit: str | None) -> list[str]:
    """--build-arg flags: GIT_COMMIT, and PIP_INDEX_URL only when another index than pip's default is set.

    (The Makefile exports pip's default; passing it would only split the build cache between
    `make test` and a direct pytest run.) PIP_FIND_LINKS, PIP_CERT & co. stay on this host.
    """
    args = []
    index = os.environ.get("PIP_INDEX_URL", "")
    if index and index.rstrip("/") != PyPI.simple_url.rstrip("/"):
        args += ["--build-arg", "PIP_INDEX_URL"]  # the value comes from the environment, not argv
    if commit:
        args += ["--build-arg", f"GIT_COMMIT={commit}"]
    return args


def git_commit(repo: Path) -> str | None:
    result = run(["git", "-C", repo, "rev-parse", "HEAD"])
    return result.stdout.strip() if result.returncode == 0 else None


def build(engine: Engine, context: Path, tag: str, *extra: str, log_path: Path | None = None) -> float:
    """`docker build` (the engine's default builder), output to log_path; returns seconds taken."""
    started = time.monotonic()
    result = engine.docker(
        "build", *build_args(git_commit(context)), *extra, "-t", tag, context, check=False, timeout=3600
    )
    seconds = time.monotonic() - started
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"docker build of {context} failed:\n{(result.stdout + result.stderr)[-4000:]}")
    return seconds


def layers(engine: Engine, image: str) -> list[tuple[str, int, str]]:
    """(layer id or <missing>, size in bytes, creating instruction) per layer, newest first."""
    out = engine.docker(
        "history", "--no-trunc", "--human=false", "--format", "{{.ID}}\t{{.Size}}\t{{.CreatedBy}}", image
    )
    rows = []
    for line in out.stdout.splitlines():
        layer, size, created_by = line.split("\t", 2)
        rows.append((layer, int(size), created_by))
    return rows
