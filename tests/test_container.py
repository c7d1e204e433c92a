"""The image's entry points, run outside Docker: argument handling, secrets, signals, linters.

run-commands.sh runs for real with two stand-ins: PYTHON is a fake interpreter that records what
cli.py would receive (argv, environment) and DVC_PULL_SCRIPT a fake dvc_pull.sh that asks git and
DVC's own git library (scmrepo) for the registry's credentials, as `dvc get` would. Secret values are
then searched for in every output, argument and file the run could have written.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import ClassVar

import pytest

from tests.fixtures.git_http import GitOverHttp

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TOKEN = "SECRETTOKEN123"
GIT_LOGIN = f"user:{TOKEN}"
WANDB_KEY = "SECRETKEY456"
SECRETS = (TOKEN, WANDB_KEY)
REGISTRY = "https://registry.test/org/registry.git"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


FAKE_PYTHON = """#!{python}
# Stand-in for the interpreter that runs cli.py; inline code (-c, the Secret Manager read) runs for real.
# It records what cli.py was given and what the real cli.py makes of it (no training).
import hashlib, json, os, signal, sys, time
if sys.argv[1:2] == ["-c"]:
    os.execv({python!r}, [{python!r}, *sys.argv[1:]])
sys.path.insert(0, {root!r})
import cli
try:
    config = cli.config_from_args(cli.build_parser().parse_args(sys.argv[2:]), os.environ)
    resolved = {{"output": config.output.output, "tracking": config.tracking.enabled, "mode": config.tracking.mode}}
except Exception as exc:
    resolved = {{"error": str(exc)}}
key = os.environ.get("WANDB_API_KEY")
record = {{
    "config": resolved,
    "argv": sys.argv[1:],
    "cwd": os.getcwd(),
    "env_names": sorted(os.environ),
    "wandb_key_sha256": hashlib.sha256(key.encode()).hexdigest() if key is not None else None,
    "wandb_mode": os.environ.get("WANDB_MODE"),
    "google_application_credentials": os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"),
}}
with open(os.path.join(os.environ["FAKE_RECORD_DIR"], "cli.json"), "w") as f:
    json.dump(record, f)
if os.environ.get("FAKE_SLEEP"):
    time.sleep(float(os.environ["FAKE_SLEEP"]))
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
"""

FAKE_DVC_PULL = """#!/bin/sh
# Stand-in for dvc_pull.sh: fetches the registry's credentials as git and DVC (scmrepo) would,
# records only their hashes, and writes a manifest.
set -eu
[ "$1" = -t ] || exit 64
[ -z "${{FAKE_PULL_FAIL:-}}" ] || exit 5
mkdir -p Versioning
printf 'manifest' > Versioning/versioned_paths.pickle
git_password=$(printf 'protocol=https\\nhost=registry.test\\npath=org/registry.git\\n\\n' \\
    | git credential fill 2>/dev/null | sed -n 's/^password=//p') || git_password=""
{{
    echo "tag=$2"
    echo "cwd=$(pwd)"
    echo "wandb_key_set=${{WANDB_API_KEY:+yes}}"
    echo "git_login_set=${{GIT_LOGIN:+yes}}"
    printf 'git_password_sha256=%s\\n' "$(printf %s "$git_password" | sha256sum | cut -d' ' -f1)"
    printf 'scmrepo_password_sha256=%s\\n' "$({python} -c '
import hashlib
from scmrepo.git.credentials import Credential
try:
    password = Credential(url="{registry}").fill(interactive=False).password or ""
except Exception:
    password = ""
print(hashlib.sha256(password.encode()).hexdigest())
')"
}} > "$FAKE_RECORD_DIR/pull.txt"
"""


class Job:
    """A sandbox for one run of run-commands.sh: its own HOME, TMPDIR, secrets and work folder."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.work, self.home, self.tmpdir, self.secrets, self.record = (
            tmp / name for name in ("work", "home", "tmpdir", "secrets", "record")
        )
        for folder in (self.work, self.home, self.tmpdir, self.secrets, self.record):
            folder.mkdir(parents=True)
        fake_python = tmp / "fakepython"
        fake_python.write_text(FAKE_PYTHON.format(python=sys.executable, root=str(ROOT)))
        fake_pull = tmp / "fake_dvc_pull.sh"
        fake_pull.write_text(FAKE_DVC_PULL.format(python=sys.executable, registry=REGISTRY))
        fake_python.chmod(0o755)
        self.env = {
            "PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.home),
            "TMPDIR": str(self.tmpdir),
            "SECRETS_DIR": str(self.secrets),
            "PYTHON": str(fake_python),
            "DVC_PULL_SCRIPT": str(fake_pull),
            "FAKE_RECORD_DIR": str(self.record),
            "DVC_REPO": REGISTRY,
            "LANG": "C.UTF-8",
        }

    def start(self, *args: str, script: str = "run-commands.sh", **env: str) -> subprocess.Popen:
        return subprocess.Popen(
            ["bash", str(ROOT / script), *args],
            cwd=self.work,
            env={**self.env, **env},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group, so a timeout can stop the whole tree
        )

    def run(
        self, *args: str, script: str = "run-commands.sh", timeout: float = 60, stdin: str = "", **env: str
    ) -> subprocess.CompletedProcess:
        proc = self.start(*args, script=script, **env)
        try:
            out, err = proc.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def cli(self) -> dict:
        path = self.record / "cli.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def pull(self) -> dict[str, str]:
        lines = (self.record / "pull.txt").read_text().splitlines()
        return dict(line.split("=", 1) for line in lines)

    def files_containing(self, *needles: str) -> list[Path]:
        """Every file under the sandbox (work dir, HOME, TMPDIR, records) holding one of the values."""
        hits = []
        for path in self.tmp.rglob("*"):
            if path.is_file() and not path.is_symlink() and path.parent != self.secrets:
                data = path.read_bytes()
                hits += [path for needle in needles if needle.encode() in data]
        return hits


@pytest.fixture
def job(tmp_path: Path) -> Job:
    return Job(tmp_path)


def assert_no_leak(job: Job, result: subprocess.CompletedProcess) -> None:
    for secret in SECRETS:
        assert secret not in result.stdout and secret not in result.stderr
        assert not any(secret in arg for arg in job.cli().get("argv", []))
    assert job.files_containing(*SECRETS) == []
    # The private credential folder is gone and nothing went into the user's git config.
    assert list(job.tmpdir.iterdir()) == []
    assert not (job.home / ".gitconfig").exists()


def assert_secrets_delivered(job: Job) -> None:
    cli, pull = job.cli(), job.pull()
    assert pull["git_password_sha256"] == sha(TOKEN), "git did not get the registry token"
    assert pull["scmrepo_password_sha256"] == sha(TOKEN), "DVC's git client did not get the registry token"
    assert pull["wandb_key_set"] == "", "the W&B key reached the data pull"
    assert pull["git_login_set"] == ""
    assert cli["wandb_key_sha256"] == sha(WANDB_KEY)
    assert "GIT_LOGIN" not in cli["env_names"] and "GIT_CONFIG_GLOBAL" not in cli["env_names"]


# ---- linters ---------------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint():
    result = subprocess.run([BIN / "hadolint", "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "script", ["docker-shell.sh", "run-commands.sh", "run-training.sh", "dvc_pull.sh", "git-credentials.sh"]
)
def test_shell_scripts_pass_shellcheck(script):
    result = subprocess.run([BIN / "shellcheck", "-x", script], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_contract():
    text = (ROOT / "Dockerfile").read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    addresses = re.findall(r"\S+://\S+", code)
    assert addresses == ["DVC_REPO=https://github.com/csci-e-115/dermaid-versioning.git"], (
        "no index, mirror or registry address may be committed; the original's data registry is the one default"
    )
    assert re.search(r"^ARG PIP_INDEX_URL$", code, re.M), "the index ARG must have no default"
    assert "pipenv==${PIPENV_VERSION}" in code and "ARG PIPENV_VERSION=2026.10.3" in code
    assert "pipenv install --deploy --system" in code
    # One stage: the legacy builder builds every stage up to the target, so a GPU stage before the
    # default CPU one would be built (CUDA wheels and all) for every CPU image.
    assert len(re.findall(r"^FROM ", code, re.M)) == 1 and "ARG ACCELERATOR=cpu" in code
    assert "--mount=" not in code, "RUN --mount needs BuildKit; the image must build without it"
    assert code.index("pipenv install") < code.index("COPY . .") < code.index("ARG GIT_COMMIT")
    assert code.index("pipenv install") < code.index("ARG ACCELERATOR"), "CPU and GPU share the locked layer"
    assert code.count('ENTRYPOINT ["/bin/bash", "run-commands.sh"]') == 1
    assert all(user != "root" and user != "0" for user in re.findall(r"^USER (\S+)", code, re.M))
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in ("secrets/", ".venv/", ".tools/", "demo/", "outputs/", "wandb/", ".git/", ".cache/"):
        assert entry in ignored


# ---- run-commands.sh: arguments --------------------------------------------------------------------


def test_env_only_run_builds_the_cli_command(job):
    result = job.run("--", "-e", "1", "-x", GCS_BUCKET_NAME="my-bucket", DVC_TAG="dataset_v02")
    assert result.returncode == 0, result.stderr
    assert job.cli()["argv"] == [
        str(ROOT / "cli.py"),
        *("-g", "1", "--manifest", "Versioning/versioned_paths.pickle"),
        *("--data-tag", "dataset_v02", "-e", "1", "-x"),
    ]
    assert job.cli()["cwd"] == str(job.work) and job.pull()["tag"] == "dataset_v02"
    # The variables pass through unchanged; cli.py derives the output and the W&B mode once.
    assert job.cli()["wandb_mode"] is None and job.cli()["wandb_key_sha256"] is None
    assert job.cli()["config"] == {"output": "gs://my-bucket/models", "tracking": True, "mode": "offline"}


def test_six_positionals_win_over_the_environment(job):
    result = job.run(
        *("my-project", "gs://pos-bucket", "-", "", "dataset_v01", "2", "-e", "3"),
        GCS_BUCKET_NAME="env-bucket",
        DVC_TAG="dataset_v09",
        NUM_GPU="4",
    )
    assert result.returncode == 0, result.stderr
    argv = job.cli()["argv"]
    assert argv[1:3] == ["-g", "2"] and argv[-4:] == ["--data-tag", "dataset_v01", "-e", "3"]
    assert job.cli()["config"]["output"] == "gs://pos-bucket/models"
    assert "GCP_PROJECT" in job.cli()["env_names"]


def test_local_folder_as_bucket_is_the_output(job):
    result = job.run(GCS_BUCKET_NAME="./outputs", DVC_TAG="dataset_v02")
    assert result.returncode == 0, result.stderr
    assert "--output" not in job.cli()["argv"] and job.cli()["config"]["output"] == "./outputs"


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ((), {"DVC_TAG": "t"}, "GCS_BUCKET_NAME is required"),
        ((), {"GCS_BUCKET_NAME": "b-1"}, "DVC_TAG is required"),
        (("p-1", "b-1", "-", "-", "t", "two"), {}, "NUM_GPU must be a positive integer"),
        ((), {"GCS_BUCKET_NAME": "b-1", "DVC_TAG": "t", "NUM_GPU": "0"}, "NUM_GPU must be a positive integer"),
        (("p-1", "b-1", "-"), {}, "all six positional arguments or none, got 3"),
        (("p-1", "b-1", "-", "-", "t", "1", "SECRETX"), {}, "unexpected argument"),
        ((), {"GCS_BUCKET_NAME": "b-1", "DVC_TAG": "t", "GIT_LOGIN": "SECRETX"}, "GIT_LOGIN must be user:token"),
        (
            (),
            {"GCS_BUCKET_NAME": "b-1", "DVC_TAG": "t", "GIT_LOGIN_SECRET": "SECRETX"},
            "GIT_LOGIN_SECRET must look like",
        ),
    ],
)
def test_usage_errors_exit_2_with_usage_line(job, args, env, message):
    result = job.run(*args, **env)
    assert result.returncode == 2
    usage, error = result.stderr.splitlines()
    assert usage.startswith("usage: run-commands.sh ") and message in error
    assert "SECRETX" not in result.stderr, "a misplaced value may be a secret: never echo it"
    assert not (job.record / "pull.txt").exists() and job.cli() == {}


def test_run_training_requires_dvc_repo(job):
    env = {**job.env, "GCS_BUCKET_NAME": "b-1", "DVC_TAG": "t"}
    del env["DVC_REPO"]
    result = subprocess.run(["bash", ROOT / "run-training.sh"], cwd=job.work, env=env, capture_output=True, text=True)
    assert result.returncode == 2 and "DVC_REPO is required" in result.stderr


def test_exit_status_is_the_trainers_and_a_failed_pull_stops_the_run(job):
    env = {"GCS_BUCKET_NAME": "b-1", "DVC_TAG": "t"}
    assert job.run(FAKE_EXIT="3", **env).returncode == 3
    (job.record / "cli.json").unlink()
    result = job.run(FAKE_PULL_FAIL="1", **env)
    assert result.returncode == 5 and "dvc_pull.sh -t t failed (exit 5)" in result.stderr
    assert job.cli() == {}


# ---- run-commands.sh: secrets ----------------------------------------------------------------------


def test_secrets_from_environment_reach_only_their_consumers(job):
    result = job.run("--", "-e", "1", GCS_BUCKET_NAME="b-1", DVC_TAG="t", GIT_LOGIN=GIT_LOGIN, WANDB_API_KEY=WANDB_KEY)
    assert result.returncode == 0, result.stderr
    assert_secrets_delivered(job)
    assert_no_leak(job, result)
    assert job.cli()["wandb_mode"] is None and job.cli()["config"]["mode"] == "online"


def test_secrets_from_files_with_windows_line_ends(job):
    (job.secrets / "git.txt").write_text(f"  {GIT_LOGIN}\r\n")
    (job.secrets / "wandb.txt").write_text(f"{WANDB_KEY}\n\n")
    result = job.run("p-1", "b-1", "-", "-", "t", "1", WANDB_API_KEY="")
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr
    assert_secrets_delivered(job)
    assert_no_leak(job, result)


def test_the_originals_git_login_form_and_key_file_name(job):
    """Original users wrote `https://<user>:<token>` in git.txt and named their key ac215-dermaid.json."""
    (job.secrets / "git.txt").write_text(f"https://{GIT_LOGIN}\n")
    (job.secrets / "wandb.txt").write_text(WANDB_KEY)
    (job.secrets / "ac215-dermaid.json").write_text("{}")
    result = job.run("p-1", "b-1", "-", "-", "t", "1")
    assert result.returncode == 0, result.stderr
    assert_secrets_delivered(job)
    assert_no_leak(job, result)
    assert job.cli()["google_application_credentials"] == str(job.secrets / "ac215-dermaid.json")
    assert job.cli()["wandb_mode"] is None  # a key: cli.py tracks online by default, as the original


def test_shell_mode_prepares_credentials_and_runs_piped_commands(job):
    """docker-shell.sh's default: the job's set-up, then a shell; the credential folder outlives no shell."""
    (job.secrets / "git.txt").write_text(GIT_LOGIN)
    commands = (
        'echo "tag=$DVC_TAG gpus=$NUM_GPU"\n'
        "printf 'protocol=https\\nhost=registry.test\\n\\n' | git credential fill | grep -c '^password='\n"
        'ls "$TMPDIR" | wc -l\n'
    )
    result = job.run("--shell", stdin=commands, DVC_TAG="dataset_v09")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["tag=dataset_v09", "gpus=1", "1", "1"]
    assert "run: sh dvc_pull.sh, then python cli.py" in result.stderr
    assert_no_leak(job, result)
    assert job.run("--shell", "-e", "1").returncode == 2


def test_positional_secrets_still_work_with_a_warning(job):
    # The original Vertex job passed secrets as arguments; they win over the files.
    (job.secrets / "git.txt").write_text("other:OTHERTOKEN\n")
    result = job.run("p-1", "b-1", GIT_LOGIN, WANDB_KEY, "t", "1")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("visible to every process") == 2
    assert_secrets_delivered(job)
    for secret in SECRETS:
        assert secret not in result.stderr and secret not in job.cli()["argv"]
    assert list(job.tmpdir.iterdir()) == []


def test_git_login_is_scoped_to_the_registry_host(job):
    (job.secrets / "git.txt").write_text(GIT_LOGIN)
    fill = "printf 'protocol=https\\nhost=elsewhere.test\\n\\n' | git credential fill > \"$FAKE_RECORD_DIR/other.txt\" 2>&1 || true\n"
    pull = Path(job.env["DVC_PULL_SCRIPT"])
    pull.write_text(pull.read_text() + fill)
    result = job.run(GCS_BUCKET_NAME="b-1", DVC_TAG="t")
    assert result.returncode == 0, result.stderr
    assert job.pull()["git_password_sha256"] == sha(TOKEN)
    assert TOKEN not in (job.record / "other.txt").read_text()


def test_sigterm_reaches_training_and_credentials_are_removed(job):
    proc = job.start(GCS_BUCKET_NAME="b-1", DVC_TAG="t", GIT_LOGIN=GIT_LOGIN, FAKE_SLEEP="60")
    deadline = time.monotonic() + 30
    while not (job.record / "cli.json").exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    assert len(list(job.tmpdir.iterdir())) == 1, "the credential folder exists while the job runs"
    (cred_dir,) = job.tmpdir.iterdir()
    assert stat.S_IMODE(cred_dir.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) & 0o077 == 0 for p in cred_dir.iterdir())
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert time.monotonic() - started < 10
    assert proc.returncode == 128 + signal.SIGTERM
    assert list(job.tmpdir.iterdir()) == []


# ---- run-commands.sh: Secret Manager, as on Vertex AI ---------------------------------------------


class _MetadataAndSecretManager(http.server.BaseHTTPRequestHandler):
    """GCE metadata server (how a Vertex AI job gets its credentials) plus Secret Manager's access call."""

    secrets: ClassVar[dict[str, str]] = {
        "projects/p-1/secrets/registry-login/versions/latest": GIT_LOGIN,
        "projects/p-1/secrets/wandb-key/versions/3": WANDB_KEY,
    }

    def log_message(self, *args):  # keep test output clean
        pass

    def _send(self, status: int, body: str | dict, content_type="application/json"):
        data = (json.dumps(body) if isinstance(body, dict) else body).encode()
        self.send_response(status)
        self.send_header("Metadata-Flavor", "Google")
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        path = self.path.split("?")[0]
        if path.startswith("/v1/") and path.endswith(":access"):
            name = path[len("/v1/") : -len(":access")]
            if self.headers.get("Authorization") != "Bearer test-access-token":
                return self._send(401, {"error": "unauthenticated"})
            if name not in self.secrets:
                return self._send(404, {"error": {"message": f"{name} not found"}})
            data = base64.b64encode(self.secrets[name].encode()).decode()
            return self._send(200, {"name": name, "payload": {"data": data}})
        if path.endswith("/service-accounts/default/token"):
            return self._send(200, {"access_token": "test-access-token", "expires_in": 3600, "token_type": "Bearer"})
        if path.endswith("/service-accounts/default/"):
            return self._send(
                200, {"email": "job@p-1.iam.gserviceaccount.com", "scopes": ["cloud-platform"], "aliases": ["default"]}
            )
        if path.endswith("/project/project-id"):
            return self._send(200, "p-1", "application/text")
        return self._send(200, "", "application/text")  # the metadata server's ping


@pytest.fixture
def metadata_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _MetadataAndSecretManager)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host = f"127.0.0.1:{server.server_address[1]}"
    yield {
        "GCE_METADATA_HOST": host,
        "GCE_METADATA_IP": host,
        "SECRET_MANAGER_ENDPOINT": f"http://{host}",
    }
    server.shutdown()
    server.server_close()


def test_secrets_from_secret_manager(job, metadata_server):
    result = job.run(
        *("p-1", "b-1", "-", "-", "t", "1"),
        GIT_LOGIN_SECRET="projects/p-1/secrets/registry-login",
        WANDB_API_KEY_SECRET="projects/p-1/secrets/wandb-key/versions/3",
        **metadata_server,
    )
    assert result.returncode == 0, result.stderr
    assert_secrets_delivered(job)
    assert_no_leak(job, result)


def test_missing_secret_manager_version_is_a_one_line_error(job, metadata_server):
    result = job.run("p-1", "b-1", "-", "-", "t", "1", GIT_LOGIN_SECRET="projects/p-1/secrets/nope", **metadata_server)
    assert result.returncode == 1 and job.cli() == {}
    assert result.stderr.strip().splitlines()[-1] == (
        "run-commands.sh: error: cannot read the Secret Manager version named by GIT_LOGIN_SECRET"
    )


# ---- docker-shell.sh, with a stand-in docker --------------------------------------------------------


@pytest.fixture
def fake_docker(tmp_path: Path):
    # A copy of the script in a checkout of its own, with a secrets/ folder to mount.
    repo = tmp_path / "repo"
    (repo / "secrets").mkdir(parents=True)
    (repo / "docker-shell.sh").write_text((ROOT / "docker-shell.sh").read_text())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "docker.log"
    docker = bin_dir / "docker"
    # No BuildKit (as here): `docker buildx version` fails and is not logged.
    docker.write_text(
        f'#!/bin/sh\n[ "$1" != buildx ] || exit 1\nfor a in "$@"; do printf "%s\\n" "$a"; done >> {log}\necho --- >> {log}\n'
    )
    docker.chmod(0o755)

    def run(*args: str, gpu: bool | None = None, **env: str) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
        smi = bin_dir / "nvidia-smi"
        smi.unlink(missing_ok=True)
        if gpu is not None:
            smi.write_text(f"#!/bin/sh\nexit {0 if gpu else 9}\n")
            smi.chmod(0o755)
        log.unlink(missing_ok=True)
        result = subprocess.run(
            ["sh", repo / "docker-shell.sh", *args],  # sh is dash here, as on Debian and Ubuntu
            env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), **env},
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        text = log.read_text() if log.exists() else ""
        calls = [call.strip("\n").split("\n") for call in text.split("---\n") if call.strip()]
        return result, calls

    return run


def test_docker_shell_passes_secrets_by_name_only(fake_docker):
    result, (build, run) = fake_docker(
        "--",
        "-e",
        "2",
        gpu=False,
        GIT_LOGIN=GIT_LOGIN,
        WANDB_API_KEY=WANDB_KEY,
        DVC_TAG="t",
        PIP_INDEX_URL="https://idx.test/simple",
    )
    assert result.returncode == 0, result.stderr
    assert build[:5] == ["build", "-t", "dermaid-training", "--build-arg", "ACCELERATOR=cpu"]
    assert build[-1].endswith("/repo")
    assert build[build.index("PIP_INDEX_URL=https://idx.test/simple") - 1] == "--build-arg"
    # A build argument is stored in the image history: an index URL with credentials is refused.
    refused, calls = fake_docker(gpu=False, PIP_INDEX_URL="https://user:pw@idx/simple")
    assert refused.returncode == 2 and calls == [] and "user:pw" not in refused.stderr
    assert run[0] == "run" and "--gpus" not in run
    for name in ("GIT_LOGIN", "WANDB_API_KEY", "DVC_TAG"):
        assert run[run.index(name) - 1] == "-e"
    assert "GCS_BUCKET_NAME" not in run, "unset variables are not passed"
    assert not any(secret in arg for arg in build + run for secret in SECRETS)
    assert run[-3:] == ["dermaid-training", "-e", "2"]
    assert run[run.index("-v") + 1].endswith("/repo/secrets:/secrets:ro")


def test_docker_shell_uses_gpus_only_when_nvidia_smi_works(fake_docker):
    _, (build, run) = fake_docker(gpu=True)
    assert "ACCELERATOR=gpu" in build and run[run.index("--gpus") + 1] == "all" and "dermaid-training-gpu" in run
    _, (build, run) = fake_docker("--cpu", gpu=True)
    assert "ACCELERATOR=cpu" in build and "--gpus" not in run
    _, calls = fake_docker("--no-build", "--gpu", gpu=None)
    (run,) = calls
    assert "--gpus" in run and run[-2:] == ["dermaid-training-gpu", "--shell"]


def test_docker_shell_opens_a_shell_with_the_originals_defaults(fake_docker, tmp_path):
    """`sh docker-shell.sh` alone, as in the original README: a shell inside, DVC_TAG and NUM_GPU defaulted."""
    result, (_, run) = fake_docker(gpu=False)
    assert result.returncode == 0, result.stderr
    assert "DVC_TAG not set: using the original's default dataset_v09" in result.stderr
    assert "NUM_GPU not set: using 1" in result.stderr
    assert run[-2:] == ["dermaid-training", "--shell"] and "-i" in run  # commands come from stdin
    for name in ("DVC_TAG", "NUM_GPU"):
        assert run[run.index(name) - 1] == "-e"
    result, _ = fake_docker("--no-build", gpu=False, DVC_TAG="dataset_v02", NUM_GPU="2")
    assert "not set" not in result.stderr
    # The original's layout kept secrets/ beside the training folder, one level up.
    (tmp_path / "repo" / "secrets").rmdir()
    (tmp_path / "secrets").mkdir()
    _, (run,) = fake_docker("--no-build", gpu=False)
    assert run[run.index("-v") + 1] == f"{tmp_path}/secrets:/secrets:ro"


def test_docker_shell_mounts_application_credentials(fake_docker, tmp_path):
    key = tmp_path / "sa.json"
    key.write_text("{}")
    result, (run,) = fake_docker("--no-build", "--shell", gpu=False, GOOGLE_APPLICATION_CREDENTIALS=str(key))
    assert result.returncode == 0, result.stderr
    assert f"{key}:/gcp/credentials.json:ro" in run and "GOOGLE_APPLICATION_CREDENTIALS=/gcp/credentials.json" in run
    assert run[-1] == "--shell"
    result, _ = fake_docker("--no-build", gpu=False, GOOGLE_APPLICATION_CREDENTIALS=str(tmp_path / "missing.json"))
    assert result.returncode == 2 and "not a file" in result.stderr


# ---- end to end: registry on (emulated) GCS → run-commands.sh → real training → models in the bucket ----


@pytest.mark.slow
def test_end_to_end_run_commands_trains_from_the_registry_into_the_bucket(prepared, gcs_emulator, tmp_path):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    bucket = gcs_emulator.make_bucket("dermaid-e2e")
    job = Job(tmp_path)
    tools_env = {**job.env, "STORAGE_EMULATOR_HOST": gcs_emulator.host}
    registry = tmp_path / "registry"
    subprocess.run(
        [
            *(sys.executable, "-m", "tools.registry", "--registry", registry, "--manifest", prepared.manifest_path),
            *("--tag", "dataset_v01", "--remote", f"gs://{bucket}/dvc"),
        ],
        cwd=ROOT,
        env=tools_env,
        check=True,
        capture_output=True,
    )
    # The real pieces this time: dvc_pull.sh, dvc, cli.py. The secrets are set as a user would.
    job.env = {k: v for k, v in tools_env.items() if k not in ("PYTHON", "DVC_PULL_SCRIPT")}
    job.env |= {"PYTHON": sys.executable, "DVC_REPO": str(registry), "TF_CPP_MIN_LOG_LEVEL": "2"}
    (job.secrets / "wandb.txt").write_text(WANDB_KEY + "\n")
    result = job.run(
        *("p-1", bucket, "-", "-", "dataset_v01", "1", "--"),
        *("--weights", "none", "--freeze-backbone", "--no-saved-model", "--image-size", "32"),
        *("-b", "16", "-e", "1", "-f", "8", "--patience", "0"),
        *("-n", "e2e", "-x", "--cache-dir", str(job.work / "cache")),
        GIT_LOGIN=GIT_LOGIN,  # a local registry needs none: it is dropped with a warning
        WANDB_MODE="offline",
        WANDB_DIR=str(job.work),
        timeout=800,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "GIT_LOGIN is not used" in result.stderr

    client = storage.Client(project="emulator", credentials=AnonymousCredentials())
    blobs = {b.name: b for b in client.list_blobs(bucket, prefix="models/e2e/")}
    assert json.loads(blobs.pop("models/e2e/latest.json").download_as_bytes())["model"].startswith("gs://")
    (run_dir,) = {name.split("/")[2] for name in blobs}
    for name in ("metrics.json", "run.json"):
        assert f"models/e2e/{run_dir}/{name}" in blobs, sorted(blobs)
    run = json.loads(blobs[f"models/e2e/{run_dir}/run.json"].download_as_bytes())
    assert "dataset_v01" in json.dumps(run)
    # Secrets: nowhere in the bucket, the console output, or any local file (W&B's offline run included).
    for name, blob in blobs.items():
        data = blob.download_as_bytes()
        assert not any(secret.encode() in data for secret in SECRETS), name
    assert not any(secret in result.stdout + result.stderr for secret in SECRETS)
    assert list((job.work / "wandb").glob("offline-run-*")), "W&B offline run expected"
    assert job.files_containing(*SECRETS) == []
    assert list(job.tmpdir.glob("dermaid-git.*")) == []


# ---- the registry over authenticated https: the real dvc_pull.sh and `dvc get` --------------------------


def test_git_login_opens_a_private_registry_for_dvc(tmp_path):
    import pickle

    from tools.registry import publish

    manifest = tmp_path / "versioned_paths.pickle"
    manifest.write_bytes(pickle.dumps({"train": ["a/0000.tfrecords"], "val": ["b/0000.tfrecords"], "test": []}))
    registry, served = tmp_path / "registry", tmp_path / "served"
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(tmp_path)}
    publish(registry, manifest, "dataset_v01", remote=str(tmp_path / "dvc-remote"))
    subprocess.run(["git", "clone", "-q", "--bare", registry, served / "registry.git"], env=env, check=True)

    with GitOverHttp(served, login=GIT_LOGIN) as server:
        job = Job(tmp_path / "job")
        job.env = {k: v for k, v in job.env.items() if k != "DVC_PULL_SCRIPT"}  # the real dvc_pull.sh
        job.env["DVC_REPO"] = server.url("registry.git")
        (job.secrets / "git.txt").write_text(GIT_LOGIN)
        result = job.run("p-1", "b-1", "-", "-", "dataset_v01", "1", timeout=300)
        assert result.returncode == 0, result.stderr
        assert (job.work / "Versioning" / "versioned_paths.pickle").read_bytes() == manifest.read_bytes()
        assert server.authorized > 0
        assert_no_leak(job, result)

        # The original's `https://user:token` form, and a token inside DVC_REPO itself: dvc_pull.sh takes
        # it out of the URL into the credential helper, so no git or dvc command line ever holds it.
        shims, argv_log = tmp_path / "shims", tmp_path / "argv.log"
        shims.mkdir()
        for tool, real in (("git", "/usr/bin/git"), ("dvc", str(BIN / "dvc"))):
            (shims / tool).write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {argv_log}\nexec {real} "$@"\n')
            (shims / tool).chmod(0o755)
        port = server.port
        for env in (
            {"DVC_REPO": f"http://{GIT_LOGIN}@127.0.0.1:{port}/registry.git"},
            {"DVC_REPO": f"http://127.0.0.1:{port}/registry.git", "GIT_LOGIN": f"https://{GIT_LOGIN}"},
        ):
            pulled = subprocess.run(
                ["sh", str(ROOT / "dvc_pull.sh")],
                cwd=job.work,
                env={**job.env, "PATH": f"{shims}:{job.env['PATH']}", "DVC_TAG": "dataset_v01", **env},
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert pulled.returncode == 0, pulled.stderr
            assert TOKEN not in pulled.stdout + pulled.stderr
            assert ("registry: http://***@127.0.0.1" in pulled.stdout) == ("GIT_LOGIN" not in env)
            assert argv_log.read_text().count("127.0.0.1") >= 2 and TOKEN not in argv_log.read_text()
            assert list(job.tmpdir.iterdir()) == [], "the credential folder is removed"

        # Without the login the registry stays closed, with a one-line error and no prompt.
        (job.secrets / "git.txt").unlink()
        (job.record / "cli.json").unlink()
        result = job.run("p-1", "b-1", "-", "-", "dataset_v01", "1", timeout=300)
        assert result.returncode == 1 and job.cli() == {}, result.stderr
        assert result.stderr.strip().splitlines()[-1].endswith("dvc_pull.sh -t dataset_v01 failed (exit 1)")
