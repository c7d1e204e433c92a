"""Trust boundaries: no credential reaches an output, a log, a command line or a credential store (DESIGN §2.6),
and no repository or tag a user names is ever read as an option.

    .venv/bin/python -m pytest tests/test_secrets.py -q

Real git, dvc and dvc_pull.sh against a loopback git server with basic auth (tests/fixtures/git_http.py), from
a HOME whose ~/.gitconfig keeps every credential that works (`helper = store`); shims on PATH record the
argv of every git, dvc and sh they start.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.git_http import GitOverHttp
from utilities.errors import JobError, one_line, redact_url

ROOT = Path(__file__).resolve().parents[1]
PULL = ROOT / "dvc_pull.sh"
BIN = Path(sys.executable).parent  # the .venv's bin: dvc
TOKEN = "s3cretT0KEN42"
LOGIN = f"user:{TOKEN}"
GIT = shutil.which("git") or "/usr/bin/git"


# ---------------------------------------------------------------------------------------------------
# The one scrubber
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("https://user:TOKEN@host/r.git", "https://***@host/r.git"),
        ("fetch http://TOKEN@127.0.0.1:8/r.git failed", "fetch http://***@127.0.0.1:8/r.git failed"),
        ("https://u:p@ss@host/a@b", "https://***@host/a@b"),  # a password holding "@": up to the authority's last
        ("https://host/r.git?access_token=TOKEN&ref=main", "https://host/r.git?access_token=***&ref=main"),
        ("gs://b/o?X-Goog-Signature=TOKEN&X-Goog-Date=1", "gs://b/o?X-Goog-Signature=***&X-Goog-Date=1"),
        ("https://h/r?KEY=TOKEN;sig=TOKEN#frag", "https://h/r?KEY=***;sig=***#frag"),
        ("https://h/r?private_token=TOKEN&password=TOKEN", "https://h/r?private_token=***&password=***"),
        ('{"manifest": "https://u:TOKEN@h/r@v1"}', '{"manifest": "https://***@h/r@v1"}'),
        ("https://host/org/r.git@dataset_v01", "https://host/org/r.git@dataset_v01"),
        ("/srv/registry@v1 and user@host and ?token=x", "/srv/registry@v1 and user@host and ?token=x"),
    ],
)
def test_redact_url_scrubs_userinfo_and_credential_query_values(text: str, expected: str) -> None:
    assert redact_url(text) == expected


def test_every_one_line_error_is_redacted() -> None:
    assert one_line(OSError("cannot reach https://u:TOKEN@host/r.git\nmore")) == "cannot reach https://***@host/r.git"
    assert str(JobError("fetch https://h/r?access_token=TOKEN failed")) == "fetch https://h/r?access_token=*** failed"


# ---------------------------------------------------------------------------------------------------
# A registry served over http with basic auth, and a HOME that stores every credential it is given
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(prepared, tmp_path_factory: pytest.TempPathFactory):
    """The `prepared` manifest tagged dataset_v01, served at http://127.0.0.1:PORT/registry.git (login user:TOKEN)."""
    from tools.registry import publish

    base = tmp_path_factory.mktemp("served")
    publish(base / "registry", prepared.manifest_path, "dataset_v01", remote=str(base / "dvc-remote"))
    env = {"PATH": os.environ["PATH"], "HOME": str(base)}
    subprocess.run(
        [GIT, "clone", "-q", "--bare", base / "registry", base / "www" / "registry.git"], env=env, check=True
    )
    with GitOverHttp(base / "www", login=LOGIN) as server:
        yield server


class Sandbox:
    """A HOME whose ~/.gitconfig hands every credential to `store` and to a helper that keeps what it is
    given in stored.log (generic and for the server's origin), shims that log argv, a work dir."""

    def __init__(self, tmp: Path, origin: str):
        self.tmp, self.home, self.work, self.shims = tmp, tmp / "home", tmp / "work", tmp / "shims"
        self.argv_log, self.stored = tmp / "argv.log", tmp / "stored.log"
        for folder in (self.home, self.work, self.shims, tmp / "tmp"):
            folder.mkdir(parents=True)
        keeper = tmp / "keeper"
        keeper.write_text(f'#!/bin/sh\nif [ "$1" = store ]; then cat >>"{self.stored}"; fi\n')
        keeper.chmod(0o755)
        (self.home / ".gitconfig").write_text(
            f'[credential]\n\thelper = store\n\thelper = {keeper}\n[credential "{origin}"]\n\thelper = {keeper}\n'
        )
        for tool, real in (("git", GIT), ("dvc", str(BIN / "dvc")), ("sh", "/bin/sh")):
            shim = self.shims / tool
            shim.write_text(f'#!/bin/sh\nprintf "%s %s\\n" {tool} "$*" >>"{self.argv_log}"\nexec {real} "$@"\n')
            shim.chmod(0o755)
        keep = ("LANG", "LC_ALL", "STORAGE_EMULATOR_HOST")
        self.env = {k: v for k, v in os.environ.items() if k in keep}
        self.env |= {"PATH": f"{self.shims}:{BIN}:/usr/bin:/bin", "HOME": str(self.home), "TMPDIR": str(tmp / "tmp")}

    def pull(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["sh", str(PULL), *args],
            cwd=self.work,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=300,
        )

    def files_holding_the_token(self) -> list[Path]:
        return [p for p in self.tmp.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]

    def assert_no_leak(self) -> None:
        assert not (self.home / ".git-credentials").exists(), (self.home / ".git-credentials").read_text()
        assert not self.stored.exists(), self.stored.read_text()
        assert self.files_holding_the_token() == []  # the argv log included
        assert list((self.tmp / "tmp").glob("dermaid-git.*")) == [], "the private credential folder is removed"


def _one_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("login", ["in the URL", "GIT_LOGIN"])
def test_pull_over_basic_auth_stores_the_token_nowhere(served, prepared, tmp_path: Path, login: str) -> None:
    box = Sandbox(tmp_path, f"http://127.0.0.1:{served.port}")
    # The work dir is a git repository of its own whose config stores credentials too (read after ours).
    subprocess.run([GIT, "init", "-q", str(box.work)], env=box.env, check=True)
    local_store = tmp_path / "local-store"
    subprocess.run([GIT, "-C", str(box.work), "config", "credential.helper", f"store --file={local_store}"], check=True)
    if login == "GIT_LOGIN":
        env = {"DVC_REPO": served.url("registry.git"), "GIT_LOGIN": LOGIN}
    else:
        env = {"DVC_REPO": f"http://{LOGIN}@127.0.0.1:{served.port}/registry.git"}
    before = served.authorized
    proc = box.pull("-t", "dataset_v01", **env)
    assert proc.returncode == 0, proc.stderr
    assert (box.work / "Versioning" / "versioned_paths.pickle").read_bytes() == prepared.manifest_path.read_bytes()
    assert served.authorized > before and TOKEN not in proc.stdout + proc.stderr
    assert "git ls-remote" in box.argv_log.read_text() and "dvc get" in box.argv_log.read_text()
    assert not local_store.exists()
    box.assert_no_leak()


@pytest.mark.slow
def test_dvc_git_client_stores_the_token_nowhere(served, tmp_path: Path) -> None:
    """DVC clones with its own git client (scmrepo/dulwich), which asks the configured helpers to store too."""
    box = Sandbox(tmp_path, f"http://127.0.0.1:{served.port}")
    script = (
        f'. "{ROOT / "git-credentials.sh"}"; git_credentials "$ORIGIN" user "$TOKEN"; unset TOKEN; '
        'status=0; dvc get --rev dataset_v01 -o got -- "$ORIGIN/registry.git" Versioning || status=$?; '
        "git_credentials_cleanup; exit $status"
    )
    env = {**box.env, "ORIGIN": f"http://127.0.0.1:{served.port}", "TOKEN": TOKEN}  # the token: environment only
    before = served.authorized
    proc = subprocess.run(["sh", "-c", script], cwd=box.work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (box.work / "got" / "versioned_paths.pickle").is_file() and served.authorized > before
    box.assert_no_leak()


def _repo_with_origin(box: Sandbox) -> None:
    """The work dir as a git repository with an `origin`: a bare `git ls-remote` would list that."""
    origin = box.tmp / "origin.git"
    subprocess.run([GIT, "init", "-q", "--bare", str(origin)], env=box.env, check=True)
    subprocess.run([GIT, "init", "-q", str(box.work)], env=box.env, check=True)
    subprocess.run([GIT, "-C", str(box.work), "remote", "add", "origin", str(origin)], env=box.env, check=True)


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["-t", "dataset_v01", "-r", "--upload-pack=touch MARKER; git-upload-pack"], {}),
        (["-t", "dataset_v01"], {"DVC_REPO": "--upload-pack=touch MARKER; git-upload-pack"}),
        (["-t", "--upload-pack=touch MARKER; git-upload-pack", "-r", "."], {}),
        (["-t", "dataset_v01", "-r", "--config=core.sshCommand=touch MARKER"], {}),
    ],
)
def test_pull_never_reads_a_repo_or_tag_as_an_option(tmp_path: Path, args: list[str], env: dict) -> None:
    box = Sandbox(tmp_path, "http://127.0.0.1:9")
    _repo_with_origin(box)
    marker = box.work / "MARKER"
    proc = box.pull(*args, **env)
    assert not marker.exists(), "the repository argument ran a command"
    assert proc.returncode == 2 and _one_line(proc).startswith("usage: sh dvc_pull.sh"), proc.stderr
    assert "starts with '-'" in proc.stderr or "invalid tag" in proc.stderr
    assert sorted(os.listdir(box.work)) == [".git"]  # nothing left behind


@pytest.mark.parametrize("param", ["access_token", "private_token", "key", "X-Goog-Signature", "password"])
def test_pull_refuses_a_token_in_the_repo_query_before_any_command(tmp_path: Path, param: str) -> None:
    box = Sandbox(tmp_path, "http://127.0.0.1:9")
    proc = box.pull("-t", "dataset_v01", DVC_REPO=f"https://127.0.0.1:9/r.git?ref=x&{param}={TOKEN}")
    assert proc.returncode == 2 and "credential in its query" in _one_line(proc) and "GIT_LOGIN" in proc.stderr
    assert TOKEN not in proc.stdout + proc.stderr
    assert [line.split()[0] for line in box.argv_log.read_text().splitlines()] == ["sh"]  # no git, no dvc started


# ---------------------------------------------------------------------------------------------------
# tools.evaluate --tag: the registry in the environment, the records without its token
# ---------------------------------------------------------------------------------------------------


def _tiny_model(path: Path, size: int) -> Path:
    """A model with this job's inputs and outputs, built in a blink (no backbone)."""
    import tf_keras

    image = tf_keras.Input((size, size, 3), name="image")
    metadata = tf_keras.Input((28,), name="metadata")
    pooled = tf_keras.layers.GlobalAveragePooling2D()(tf_keras.layers.Rescaling(1 / 255)(image))
    joined = tf_keras.layers.Concatenate()([pooled, metadata])
    model = tf_keras.Model([image, metadata], tf_keras.layers.Dense(8, activation="softmax")(joined))
    model.save(path)
    return path


@pytest.mark.slow
def test_evaluate_by_tag_keeps_the_registry_token_out_of_records_and_argv(
    served, prepared, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tools import evaluate

    box = Sandbox(tmp_path, f"http://127.0.0.1:{served.port}")
    model = _tiny_model(tmp_path / "tiny.keras", 32)
    for name, value in box.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DVC_REPO", f"http://{LOGIN}@127.0.0.1:{served.port}/registry.git")
    out = box.tmp / "eval"
    args = ["--model", str(model), "--tag", "dataset_v01", "--output", str(out), "--bootstrap", "0"]
    code = evaluate.main([*args, "--gallery", "0", "--cache-dir", str(tmp_path / "cache")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lineage = json.loads((out / "evaluation.json").read_text())
    assert lineage["data"]["manifest"] == f"http://***@127.0.0.1:{served.port}/registry.git@dataset_v01"
    assert f"`http://***@127.0.0.1:{served.port}/registry.git@dataset_v01`" in (out / "report.md").read_text()
    sh_calls = [line for line in box.argv_log.read_text().splitlines() if line.startswith("sh ")]
    assert sh_calls and all(" -r " not in line for line in sh_calls)  # the registry went by the environment
    assert TOKEN not in captured.out + captured.err
    box.assert_no_leak()  # evaluation.json, report.md, the argv log, ~/.git-credentials


def test_evaluate_output_that_is_a_file_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tools import evaluate

    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    for output in (taken, taken / "sub"):
        code = evaluate.main(["--model", str(tmp_path / "m.keras"), "--manifest", "m.pickle", "--output", str(output)])
        err = capsys.readouterr().err
        assert code == 2 and err == f"error: --output {output}: {taken} is a file, not a folder; choose a new folder\n"
    assert taken.read_text() == "mine"
    # The whole stderr of the command is that line: the check runs before TensorFlow loads (and logs).
    args = ["--model", "m.keras", "--manifest", "m.pickle", "--output", str(taken)]
    proc = subprocess.run([sys.executable, "-m", "tools.evaluate", *args], cwd=ROOT, capture_output=True, text=True)
    assert (
        proc.returncode == 2
        and proc.stderr == f"error: --output {taken}: {taken} is a file, not a folder; choose a new folder\n"
    )
