"""tools.registry + dvc_pull.sh: publish tagged manifests, pull them back byte-for-byte.

Run: .venv/bin/python -m pytest tests/test_registry.py -q   (real git, dvc and the GCS emulator)
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tools import registry
from tools.registry import RegistryError

ROOT = Path(__file__).resolve().parents[1]
PULL = ROOT / "dvc_pull.sh"
BIN = Path(sys.executable).parent  # the .venv's bin: dvc, git helpers, shellcheck, python3


def _manifest(path: Path, n_train: int, counts: dict | None = None) -> Path:
    data: dict = {
        "train": [f"gs://data/train/{i:04d}.tfrecords" for i in range(n_train)],
        "val": ["gs://data/val/0000.tfrecords"],
        "test": ["gs://data/test/0000.tfrecords"],
    }
    if counts is not None:
        data["counts"] = counts
    path.write_bytes(pickle.dumps(data))
    return path


def _pull(cwd: Path, *args: str, env: dict[str, str] | None = None, script: Path = PULL) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("DVC_REPO", "DVC_TAG", "GIT_LOGIN")}
    base["PATH"] = f"{BIN}{os.pathsep}{base.get('PATH', '')}"
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        ["sh", str(script), *args], cwd=cwd, env={**base, **(env or {})}, capture_output=True, text=True, timeout=300
    )


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------------
# Fast: validation, manifests, usage errors
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tag", ["dataset_v01", "v1.2", "ds-2024_01"])
def test_valid_tags(tag: str) -> None:
    registry.validate_tag(tag)


@pytest.mark.parametrize("tag", ["", "-x", "a b", "a..b", "x.lock", "v1.", "a/b", "t;rm", "ü"])
def test_invalid_tags(tag: str) -> None:
    with pytest.raises(RegistryError, match="invalid tag"):
        registry.validate_tag(tag)


class _Boom:
    def __reduce__(self):  # unpickling would run os.system
        return (os.system, ("touch /tmp/dermaid-pwned",))


def test_manifest_loader_refuses_code(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pickle"
    evil.write_bytes(pickle.dumps({"train": [_Boom()], "val": [], "test": []}))
    with pytest.raises(RegistryError, match=r"tries to unpickle posix\.system"):
        registry.load_manifest(evil)


def test_manifest_checks_and_summary(tmp_path: Path) -> None:
    good = _manifest(tmp_path / "m.pickle", 2, counts={"train": 150, "val": {"MEL": 3, "NV": 7}})
    assert registry.summary_lines(registry.load_manifest(good)) == [
        "train: 2 shards, 150 images",
        "val: 1 shards, 10 images",
        "test: 1 shards",
    ]
    (tmp_path / "bad.pickle").write_bytes(pickle.dumps({"train": ["a"], "val": "b", "test": []}))
    with pytest.raises(RegistryError, match="val is a str, expected a list"):
        registry.load_manifest(tmp_path / "bad.pickle")
    (tmp_path / "empty.pickle").write_bytes(pickle.dumps({"train": [], "val": [], "test": []}))
    with pytest.raises(RegistryError, match="lists no train shards"):
        registry.load_manifest(tmp_path / "empty.pickle")


def test_cli_errors_are_one_line_and_touch_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = _manifest(tmp_path / "m.pickle", 1)
    reg = tmp_path / "reg"
    assert registry.main(["--registry", str(reg), "--manifest", str(manifest), "--tag", "bad tag"]) == 2
    assert capsys.readouterr().err.startswith("error: invalid tag 'bad tag'")
    assert registry.main(["--registry", str(reg), "--manifest", str(tmp_path / "no.pickle"), "--tag", "v1"]) == 2
    assert capsys.readouterr().err == f"error: manifest {tmp_path / 'no.pickle'} does not exist\n"
    assert not reg.exists()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "x.txt").write_text("mine")
    assert registry.main(["--registry", str(tmp_path / "notes"), "--manifest", str(manifest), "--tag", "v1"]) == 2
    assert "is not a git repository" in capsys.readouterr().err and not (tmp_path / "notes" / ".git").exists()


def test_meaningful_line_prefers_errors_and_redacts() -> None:
    output = "Could not determine bucket type …\nERROR: failed for https://u:tok@host/r\n\nHaving any troubles? …\n"
    assert registry.meaningful_line(output) == "ERROR: failed for https://***@host/r"
    assert registry.meaningful_line("a\nlast words\n") == "last words"


def test_remote_holding_a_credential_is_refused_before_anything(tmp_path: Path, capsys) -> None:
    reg = tmp_path / "reg"
    args = ["--registry", str(reg), "--manifest", str(_manifest(tmp_path / "m.pickle", 1)), "--tag", "v1"]
    for remote in ("https://user:S3CRET@host/dvc", "gs://bucket/dvc?X-Goog-Signature=S3CRET"):
        assert registry.main([*args, "--remote", remote]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --remote ") and "holds a credential" in err and err.count("\n") == 1
        assert "S3CRET" not in err
    assert not reg.exists()
    assert registry.meaningful_line("ERROR: https://h/r?access_token=S3CRET\n") == "ERROR: https://h/r?access_token=***"


def test_pull_usage_errors(tmp_path: Path) -> None:
    for args in ([], ["-r", str(tmp_path)], ["-t", "dataset_v01"], ["-t", "v1", "-x"], ["-t", "a b", "-r", "r"]):
        proc = _pull(tmp_path, *args)
        assert proc.returncode == 2 and _one_line_error(proc).startswith("usage: sh dvc_pull.sh [-t TAG]"), args
    # The original README runs `sh dvc_pull.sh` with DVC_TAG set; with neither, the error names both ways.
    assert "pass -t TAG or set DVC_TAG" in _one_line_error(_pull(tmp_path, "-r", "r"))


def test_pull_unknown_repo_is_one_line_and_redacted(tmp_path: Path) -> None:
    proc = _pull(tmp_path / "cwd", "-t", "dataset_v01", "-r", str(tmp_path / "missing"))
    assert proc.returncode == 1
    assert _one_line_error(proc).startswith(f"error: cannot read registry {tmp_path / 'missing'}: fatal:")
    proc = _pull(tmp_path / "cwd", "-t", "dataset_v01", env={"DVC_REPO": "https://user:s3cret-token@127.0.0.1:9/r.git"})
    assert proc.returncode == 1 and "s3cret" not in proc.stderr + proc.stdout
    assert "https://***@127.0.0.1:9/r.git" in _one_line_error(proc)
    assert os.listdir(tmp_path / "cwd") == []  # no temp folder left behind


def test_pull_script_is_shellcheck_clean() -> None:
    proc = subprocess.run([str(BIN / "shellcheck"), "-x", str(PULL)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


# ---------------------------------------------------------------------------------------------------
# Slow: a real registry with a local remote
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_registry(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("registry")
    m1 = _manifest(base / "m1.pickle", 2, counts={"train": 150, "val": 10, "test": 20})
    m2 = _manifest(base / "m2.pickle", 3)
    reg = base / "reg"
    sha1 = registry.publish(reg, m1, "dataset_v01", remote=str(base / "remote"))
    sha2 = registry.publish(reg, m2, "dataset_v02")  # reuses the configured remote
    # Same manifest again, through the command line: no new commit, the new tag names the same one.
    assert registry.main(["--registry", str(reg), "--manifest", str(m2), "--tag", "dataset_v03"]) == 0
    shutil.rmtree(reg / ".dvc" / "cache")  # pulls must come from the remote, not the registry's cache
    return {"base": base, "reg": reg, "m1": m1, "m2": m2, "sha1": sha1, "sha2": sha2}


@pytest.mark.slow
def test_publish_commits_and_tags(local_registry: dict) -> None:
    reg = local_registry["reg"]
    assert local_registry["sha1"] != local_registry["sha2"]
    assert _git(reg, "rev-parse", "dataset_v01^{commit}") == local_registry["sha1"]
    assert _git(reg, "rev-parse", "dataset_v02^{commit}") == local_registry["sha2"]
    assert _git(reg, "rev-parse", "dataset_v03^{commit}") == local_registry["sha2"]
    assert _git(reg, "status", "--porcelain") == ""
    assert "endpointurl" not in (reg / ".dvc" / "config").read_text()
    with pytest.raises(
        RegistryError, match=r"tag dataset_v01 already exists .*\(tags: dataset_v01, dataset_v02, dataset_v03\)"
    ):
        registry.publish(reg, local_registry["m2"], "dataset_v01")
    assert _git(reg, "rev-parse", "HEAD") == local_registry["sha2"]


@pytest.mark.slow
def test_pull_each_tag_byte_for_byte(local_registry: dict, tmp_path: Path) -> None:
    reg, cwd = local_registry["reg"], tmp_path / "job"
    first = _pull(cwd, "-t", "dataset_v01", "-r", str(reg))
    assert first.returncode == 0, first.stderr
    pulled = cwd / "Versioning" / "versioned_paths.pickle"
    assert pulled.read_bytes() == local_registry["m1"].read_bytes()
    assert f"commit: {local_registry['sha1']}" in first.stdout
    assert "train: 2 shards, 150 images" in first.stdout and b"gs://data" not in first.stdout.encode()

    second = _pull(cwd, env={"DVC_REPO": str(reg), "DVC_TAG": "dataset_v02"})  # as the original: no flags
    assert second.returncode == 0, second.stderr
    assert pulled.read_bytes() == local_registry["m2"].read_bytes()
    assert f"commit: {local_registry['sha2']}" in second.stdout
    assert sorted(os.listdir(cwd)) == ["Versioning"]


@pytest.mark.slow
def test_pull_missing_tag_lists_tags_and_keeps_old_manifest(local_registry: dict, tmp_path: Path) -> None:
    cwd = tmp_path / "job"
    (cwd / "Versioning").mkdir(parents=True)
    (cwd / "Versioning" / "versioned_paths.pickle").write_bytes(b"previous")
    proc = _pull(cwd, "-t", "dataset_v07", "-r", str(local_registry["reg"]))
    assert proc.returncode == 1
    assert _one_line_error(proc) == (
        f"error: tag dataset_v07 not found in {local_registry['reg']}; available tags: dataset_v01, dataset_v02, dataset_v03"
    )
    assert (cwd / "Versioning" / "versioned_paths.pickle").read_bytes() == b"previous"
    assert sorted(os.listdir(cwd)) == ["Versioning"]


@pytest.mark.slow
def test_pull_outside_the_checkout_uses_its_own_restricted_loader(local_registry: dict, tmp_path: Path) -> None:
    lone = tmp_path / "bin" / "dvc_pull.sh"
    lone.parent.mkdir()
    shutil.copy(PULL, lone)  # no tools/ beside it: the inline unpickler summarizes
    proc = _pull(tmp_path / "job", "-t", "dataset_v01", "-r", str(local_registry["reg"]), script=lone)
    assert proc.returncode == 0, proc.stderr
    assert "train: 2 shards\n" in proc.stdout


# ---------------------------------------------------------------------------------------------------
# Slow: a gs:// remote on the emulator
# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_gs_remote_push_then_pull_by_tag(gcs_emulator, tmp_path: Path) -> None:
    from utilities import storage

    bucket = gcs_emulator.make_bucket(f"reg-{uuid.uuid4().hex[:10]}")
    manifest = _manifest(tmp_path / "m.pickle", 4)
    reg = tmp_path / "reg"
    sha = registry.publish(reg, manifest, "dataset_v01", remote=f"gs://{bucket}/dvc")
    assert storage.list_uris(f"gs://{bucket}/dvc/files/"), "dvc push stored nothing in the bucket"
    assert "127.0.0.1" not in (reg / ".dvc" / "config").read_text()  # the endpoint stays machine-local
    shutil.rmtree(reg / ".dvc" / "cache")

    proc = _pull(tmp_path / "fresh", "-t", "dataset_v01", "-r", str(reg))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "fresh" / "Versioning" / "versioned_paths.pickle").read_bytes() == manifest.read_bytes()
    assert f"commit: {sha}" in proc.stdout


@pytest.mark.slow
def test_gs_remote_missing_bucket_fails_before_any_tag(gcs_emulator, tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    with pytest.raises(RegistryError) as err:
        registry.publish(reg, _manifest(tmp_path / "m.pickle", 1), "dataset_v01", remote="gs://no-such-bucket-reg/dvc")
    assert "bucket gs://no-such-bucket-reg does not exist" in str(err.value) and "\n" not in str(err.value)
    assert _git(reg, "tag", "--list") == ""


@pytest.mark.slow
def test_first_publish_needs_a_remote(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="has no DVC remote yet; pass --remote"):
        registry.publish(tmp_path / "reg", _manifest(tmp_path / "m.pickle", 1), "dataset_v01")
