"""The image runs the job as its users run it: Vertex AI style, locally with docker-shell.sh, two workers.

    .venv/bin/python -m pytest tests/container/test_run.py -q

Data: the session's demo shards on the GCS emulator and a registry tagging them, pulled over git
smart HTTP with basic auth (tests/container/conftest.py). Secrets are the test token and W&B key;
every place a container could have put them is searched: console, `docker logs`, the files the
container wrote (`docker diff`), the bucket, and the image's history and configuration.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import threading
import time

import pytest

from tests.container.conftest import (
    GIT_LOGIN,
    SECRETS,
    TAG,
    TINY,
    WANDB_KEY,
    blobs,
    container_files,
    copy_checkout,
    files_containing,
    secrets_folder,
)
from tests.fixtures.gcs import FaultProxy, free_ports
from tests.fixtures.git_http import GitOverHttp

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
RUN_TIMEOUT_S = 900


def assert_image_holds_no_secret(engine, tag: str) -> None:
    history = engine.docker("history", "--no-trunc", tag).stdout
    config = engine.docker("image", "inspect", tag).stdout  # Env, Cmd, Entrypoint, Config, labels
    for secret in SECRETS:
        assert secret not in history and secret not in config, f"{tag}: a secret is in its history or config"
    found = engine.docker(
        *("run", "--rm", "--user", "0", "--entrypoint", "/bin/bash", tag, "-c"),
        f"grep -rlF -e {SECRETS[0]} -e {SECRETS[1]} /app /home /root /etc /tmp /usr/local/bin || true",
    ).stdout
    assert found.strip() == "", f"{tag}: files holding a secret: {found}"


def run_folder(bucket: str, name: str) -> tuple[str, dict[str, bytes]]:
    """The one run folder under gs://bucket/models/name/ and its files (relative names)."""
    found = blobs(bucket, f"models/{name}/")
    runs = {key.split("/")[2] for key in found if key.count("/") >= 3}
    assert len(runs) == 1, sorted(found)
    (run,) = runs
    prefix = f"models/{name}/{run}/"
    return run, {key[len(prefix) :]: data for key, data in found.items() if key.startswith(prefix)}


def assert_complete_run(files: dict[str, bytes]) -> dict:
    assert {"run.json", "metrics.json"} <= set(files), sorted(files)
    assert {"model/saved_model.pb", "model/model.keras"} & set(files), sorted(files)
    return json.loads(files["run.json"])


# ---- Vertex AI style: the six positional arguments, extra flags after -- ----------------------------


@pytest.mark.slow
def test_vertex_style_run_trains_from_the_registry_into_the_bucket(engine, image, registry, numbers, tmp_path):
    bucket = registry.emulator.make_bucket("dermaid-container-vertex")
    container = "dermaid-test-vertex"
    engine.docker("rm", "-f", container, check=False)
    settings = {
        "DVC_REPO": registry.url,  # the registry here instead of the image's default
        "STORAGE_EMULATOR_HOST": registry.emulator.host,  # instead of Google Cloud Storage
        "WANDB_MODE": "offline",  # no W&B server here
    }
    # GIT_LOGIN in the original README's form, https://<user>:<token>
    args = ["p-1", bucket, f"https://{GIT_LOGIN}", WANDB_KEY, TAG, "1", "--", *TINY, "-n", "vertex", "-x"]
    env_flags = [flag for name, value in settings.items() for flag in ("-e", f"{name}={value}")]
    started = time.monotonic()
    result = engine.docker(
        *("run", "--name", container, "--network", "host", *env_flags, image.tag, *args),
        check=False,
        timeout=RUN_TIMEOUT_S,
    )
    numbers["vertex_run_s"] = round(time.monotonic() - started, 1)
    try:
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
        assert registry.server.authorized > 0, "the registry was not reached with the login"

        _, files = run_folder(bucket, "vertex")
        lineage = assert_complete_run(files)
        assert image.commit and lineage["code"]["git_commit"] == image.commit, lineage["code"]
        assert lineage["training"]["epochs_run"] == 1

        # Secrets: passed as arguments (the original's interface), so the container's own Args hold
        # them; nowhere else. Not in its console, logs, written files, the bucket or the image.
        logs = engine.docker("logs", container)
        for secret in SECRETS:
            assert secret not in result.stdout + result.stderr + logs.stdout + logs.stderr
        written = container_files(engine, container, tmp_path / "written")
        assert any(p.name == "versioned_paths.pickle" for p in written), "expected the pulled manifest"
        assert any("offline-run-" in str(p) for p in written), "expected W&B's offline run"
        assert files_containing(written, *SECRETS) == []
        assert [name for name, data in files.items() if any(s.encode() in data for s in SECRETS)] == []
        assert_image_holds_no_secret(engine, image.tag)
    finally:
        engine.docker("rm", "-f", container, check=False)


# ---- locally: sh docker-shell.sh, secrets/ mounted read-only -----------------------------------------


def bridge_gateway(engine) -> str:
    """This host's address on the default bridge network (what a container there reaches it by)."""
    name = engine.docker(
        "network", "inspect", "bridge", "--format", '{{index .Options "com.docker.network.bridge.name"}}'
    ).stdout.strip()
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", name or "docker0"], capture_output=True, text=True)
    match = re.search(r"inet (\d+\.\d+\.\d+\.\d+)", out.stdout)
    assert match, f"no IPv4 address on the bridge {name}: {out.stdout}{out.stderr}"
    return match.group(1)


class TcpForward:
    """Accepts on (host, any port) and pipes each connection to 127.0.0.1:target_port."""

    def __init__(self, host: str, target_port: int):
        self.target_port = target_port
        self.sock = socket.create_server((host, 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.sock.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket):
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self):
        self.sock.close()


@pytest.mark.slow
def test_docker_shell_builds_and_trains_with_secrets_mounted(engine, image, registry, numbers, tmp_path):
    repo = copy_checkout(tmp_path / "repo")
    secrets_folder(repo)  # repo/secrets: git.txt and wandb.txt, as the original's users have them
    tag = "dermaid-training-shell"
    # docker-shell.sh's container is on the default bridge: it reaches this host at the gateway.
    gateway = bridge_gateway(engine)
    bucket = registry.emulator.make_bucket("dermaid-container-shell")
    forward = TcpForward(gateway, registry.emulator.port)
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(tmp_path),
        "DOCKER_HOST": engine.host,
        "IMAGE_NAME": tag,
        "GCS_BUCKET_NAME": bucket,
        "DVC_TAG": TAG,
        "STORAGE_EMULATOR_HOST": f"http://{gateway}:{forward.port}",
        "WANDB_MODE": "offline",
    }
    try:
        with GitOverHttp(registry.served, login=GIT_LOGIN, host=gateway) as server:
            env["DVC_REPO"] = server.url("registry.git")
            # As the original README: `sh docker-shell.sh`, then inside `sh dvc_pull.sh` and `python cli.py`
            # (typed at its shell; piped here). /secrets is there, readable and read-only, for a non-root user.
            commands = [
                'echo "uid=$(id -u)"',
                "cat /secrets/git.txt >/dev/null && echo secrets=readable",
                "touch /secrets/x 2>/dev/null || echo secrets=read-only",
                "sh dvc_pull.sh || exit $?",
                " ".join(["python cli.py", *TINY, "-n shell -x"]),
            ]
            started = time.monotonic()
            result = subprocess.run(
                ["sh", repo / "docker-shell.sh", "--cpu"],
                env=env,
                input="\n".join(commands) + "\n",
                capture_output=True,
                text=True,
                timeout=RUN_TIMEOUT_S + 600,
            )
            numbers["docker_shell_build_and_run_s"] = round(time.monotonic() - started, 1)
            assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
            assert server.authorized > 0, "the login from secrets/git.txt did not reach the registry"
            said = result.stdout.splitlines()  # after the build's own output
            assert "uid=0" not in said and any(line.startswith("uid=") for line in said), result.stdout
            assert "secrets=readable" in said and "secrets=read-only" in said, result.stdout
        _, files = run_folder(bucket, "shell")
        assert_complete_run(files)
        for secret in SECRETS:
            assert secret not in result.stdout + result.stderr
        assert [name for name, data in files.items() if any(s.encode() in data for s in SECRETS)] == []
        # The build context held secrets/ (with the token): .dockerignore must have kept it out.
        assert_image_holds_no_secret(engine, tag)
    finally:
        forward.close()
        engine.docker("rmi", tag, check=False)


# ---- two containers, one cluster: TF_CONFIG, host networking --------------------------------------


class RecordingProxy(FaultProxy):
    """The emulator proxy of tests/fixtures/gcs.py, recording every request's method."""

    def __init__(self, upstream_port: int):
        super().__init__(upstream_port)
        self.methods: list[str] = []

    def take_fault(self, method: str) -> int | None:
        with self._lock:
            self.methods.append(method)
        return super().take_fault(method)


@pytest.mark.slow
def test_two_worker_containers_train_one_epoch_and_only_the_chief_publishes(engine, image, registry, tmp_path):
    bucket = registry.emulator.make_bucket("dermaid-container-multiworker")
    secrets = secrets_folder(tmp_path)
    worker_proxy = RecordingProxy(registry.emulator.port).start()
    addresses = [f"127.0.0.1:{port}" for port in free_ports(2)]
    names = [f"dermaid-test-worker-{i}" for i in range(2)]
    args = ["p-1", bucket, "-", "-", TAG, "1", "--", *TINY, "-n", "mw", "--run-id", "mw-run", "-x"]
    try:
        for index, name in enumerate(names):
            engine.docker("rm", "-f", name, check=False)
            tf_config = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
            emulator = registry.emulator.host if index == 0 else worker_proxy.host
            engine.docker(
                *("run", "-d", "--name", name, "--network", "host", "-v", f"{secrets}:/secrets:ro"),
                *("-e", f"TF_CONFIG={json.dumps(tf_config)}", "-e", f"DVC_REPO={registry.url}"),
                *("-e", f"STORAGE_EMULATOR_HOST={emulator}", "-e", "WANDB_MODE=offline"),
                *(image.tag, *args),
            )
        statuses = wait_for(engine, names, RUN_TIMEOUT_S)
        logs = [engine.docker("logs", name) for name in names]
        tails = "\n".join(
            f"--- {n} (exit {s}):\n{(log.stdout + log.stderr)[-3000:]}"
            for n, s, log in zip(names, statuses, logs, strict=True)
        )
        assert statuses == [0, 0], tails

        found = blobs(bucket)
        latest = json.loads(found.pop("models/mw/latest.json"))  # the stable pointer the chief writes last
        assert latest["run_id"] == "mw-run", latest
        assert found and all(key.startswith("models/mw/mw-run/") for key in found), sorted(found)
        lineage = assert_complete_run({k[len("models/mw/mw-run/") :]: v for k, v in found.items()})
        assert lineage["devices"]["strategy"] == "MultiWorkerMirroredStrategy", lineage["devices"]
        assert lineage["devices"]["replicas"] == 2 and lineage["training"]["epochs_run"] == 1
        writes = [m for m in worker_proxy.methods if m in WRITE_METHODS]
        assert worker_proxy.methods and not writes, f"the worker wrote to GCS: {writes}"
        for log in logs:
            assert not any(secret in log.stdout + log.stderr for secret in SECRETS)
        # Secrets came from the mounted files: none in the containers' metadata (Env, Args, Cmd, ...).
        metadata = engine.docker("inspect", *names).stdout
        assert not any(secret in metadata for secret in SECRETS)
    finally:
        worker_proxy.stop()
        for name in names:
            engine.docker("rm", "-f", name, check=False)


def wait_for(engine, names: list[str], timeout_s: float) -> list[int]:
    """Exit codes of the containers; all are killed (and the test fails) at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = [
            engine.docker("inspect", "--format", "{{.State.Running}} {{.State.ExitCode}}", name).stdout.split()
            for name in names
        ]
        if all(running == "false" for running, _ in states):
            return [int(code) for _, code in states]
        if time.monotonic() > deadline:
            engine.docker("kill", *names, check=False)
            pytest.fail(f"containers still running after {timeout_s:.0f} s; killed")
        time.sleep(1)
