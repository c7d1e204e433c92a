"""The Vertex AI job spec: pools, accelerators, spot, secrets only by name; accepted by the real SDK."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tools import vertex_submit
from tools.vertex_submit import build_job_spec

ROOT = Path(__file__).resolve().parent.parent
BASE = [
    *("--project", "my-project", "--region", "us-central1", "--image", "us-docker.pkg.dev/my-project/r/training:v1"),
    *("--bucket", "gs://my-bucket/", "--dvc-tag", "dataset_v02", "--dvc-repo", "https://registry.test/org/reg.git"),
]
SECRET_VALUES = ("user:SECRETTOKEN123", "SECRETKEY456")


def spec(**overrides):
    kwargs = {
        "project": "my-project",
        "region": "us-central1",
        "image": "img:v1",
        "bucket": "my-bucket",
        "dvc_tag": "dataset_v02",
        "dvc_repo": "https://registry.test/org/reg.git",
        "display_name": "job",
    }
    return build_job_spec(**{**kwargs, **overrides})


def test_dry_run_prints_the_spec_without_the_sdk_or_secrets(tmp_path):
    # The secrets sit in this environment, as on a developer's machine: they must not reach the spec.
    code = (
        "import sys, tools.vertex_submit as v; rc = v.main(sys.argv[1:]); "
        "assert 'google.cloud.aiplatform' not in sys.modules, 'dry run imported the SDK'; sys.exit(rc)"
    )
    args = [*BASE, "--spot", "--replica-count", "3", "--accelerator-count", "2", "--dry-run"]
    args += ["--git-login-secret", "registry-login", "--wandb-key-secret", "projects/other/secrets/wb/versions/4"]
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "GIT_LOGIN": SECRET_VALUES[0],
        "WANDB_API_KEY": SECRET_VALUES[1],
    }
    result = subprocess.run(
        [sys.executable, "-c", code, *args, "--", "-e", "20", "-x"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert not any(secret in result.stdout + result.stderr for secret in SECRET_VALUES)
    job = json.loads(result.stdout)
    chief, workers = job["worker_pool_specs"]
    assert (chief["replica_count"], workers["replica_count"]) == (1, 2)
    assert chief["machine_spec"] == {
        "machine_type": "n1-standard-8",
        "accelerator_type": "NVIDIA_TESLA_T4",
        "accelerator_count": 2,
    }
    assert chief["container_spec"] == workers["container_spec"]
    container = chief["container_spec"]
    assert container["image_uri"] == "us-docker.pkg.dev/my-project/r/training:v1"
    assert container["args"] == ["my-project", "my-bucket", "-", "-", "dataset_v02", "2", "--", "-e", "20", "-x"]
    assert container["env"] == [
        {"name": "DVC_REPO", "value": "https://registry.test/org/reg.git"},
        {"name": "GIT_LOGIN_SECRET", "value": "projects/my-project/secrets/registry-login/versions/latest"},
        {"name": "WANDB_API_KEY_SECRET", "value": "projects/other/secrets/wb/versions/4"},
    ]
    assert job["base_output_dir"] == "gs://my-bucket/vertex"
    assert job["scheduling"] == {"strategy": "SPOT", "restart_job_on_worker_restart": True}
    assert (job["project"], job["location"]) == ("my-project", "us-central1")
    assert job["display_name"].startswith("dermaid-dataset_v02-")


def test_single_machine_cpu_job_on_standard_vms():
    job = spec(accelerator_type=None)
    (pool,) = job["worker_pool_specs"]
    assert pool["machine_spec"] == {"machine_type": "n1-standard-8"} and pool["replica_count"] == 1
    assert pool["container_spec"]["args"] == ["my-project", "my-bucket", "-", "-", "dataset_v02", "1"]
    assert job["scheduling"] == {"restart_job_on_worker_restart": False}
    assert spec(accelerator_count=0)["worker_pool_specs"][0]["machine_spec"] == {"machine_type": "n1-standard-8"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--project", "P"], "--project 'P' is not a project id"),
        (["--region", "us central"], "is not a region"),
        (["--bucket", "gs://b/models"], "is not a bucket name"),
        (["--dvc-tag=-x"], "is not a tag"),
        (["--dvc-repo", "https://user:SECRETTOKEN123@host/r.git"], "must not embed credentials"),
        (["--dvc-repo", "https://SECRETTOKEN123@host/org/r.git"], "must not embed credentials"),
        (
            ["--dvc-repo", "https://x-access-token:SECRETTOKEN123@host/org/r.git"],
            "pass its name with --git-login-secret",
        ),
        (["--dvc-repo", "ssh://git:SECRETTOKEN123@host/org/r.git"], "must not embed credentials"),
        (["--dvc-repo", "https://SECRETTOKEN123@[::1/r.git"], "--dvc-repo is not a valid URL"),
        (["--dvc-repo", "https://host/org/r.git?access_token=SECRETTOKEN123"], "must not carry a token in its query"),
        (["--dvc-repo", "https://host/r.git?ref=main&private_token=SECRETTOKEN123"], "--git-login-secret"),
        (["--dvc-repo", "https://host/r.git?X-Goog-Signature=SECRETTOKEN123"], "must not carry a token"),
        (["--dvc-repo", "https://host/r.git#access_token=SECRETTOKEN123"], "must not carry a token"),
        (["--accelerator-count", "-1"], "--accelerator-count must be >= 0"),
        (["--accelerator-type", "nvidia t4"], "is not like NVIDIA_TESLA_T4"),
        (["--replica-count", "0"], "--replica-count must be at least 1"),
        (["--replica-count", "two"], "invalid int value"),
        (["--git-login-secret", "projects/p/secrets/a b"], "is not projects/P/secrets/NAME"),
    ],
)
def test_bad_arguments_exit_2_with_one_error_line(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        vertex_submit.main([*BASE, *args, "--dry-run"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line, no usage block
    assert err.startswith("python -m tools.vertex_submit: error: ") and message in err
    assert "SECRETTOKEN123" not in err
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    "repo", ["https://host/org/r.git", "ssh://git@host/org/r.git", "git@host:org/r.git", "/srv/registry"]
)
def test_repo_urls_without_credentials_are_kept(repo):
    (pool,) = spec(dvc_repo=repo)["worker_pool_specs"]
    assert pool["container_spec"]["env"][0] == {"name": "DVC_REPO", "value": repo}


def test_a_credential_in_an_argument_for_the_container_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        vertex_submit.main([*BASE, "--dry-run", "--", "--output", "https://u:SECRETTOKEN123@host/out"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "an argument after -- holds a credential" in err.strip().splitlines()[-1]
    assert "SECRETTOKEN123" not in err


def test_help_and_spec_never_show_a_token_from_dvc_repo(monkeypatch, capsys):
    monkeypatch.setenv("DVC_REPO", "https://x-access-token:SECRETTOKEN123@host/org/r.git")
    with pytest.raises(SystemExit) as exit_info:
        vertex_submit.main(["--help"])
    assert exit_info.value.code == 0 and "SECRETTOKEN123" not in capsys.readouterr().out
    base = [arg for arg in BASE if arg not in ("--dvc-repo", "https://registry.test/org/reg.git")]
    with pytest.raises(SystemExit) as exit_info:  # the variable is read, and refused like the flag
        vertex_submit.main([*base, "--dry-run"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "must not embed credentials" in err and "SECRETTOKEN123" not in err
    monkeypatch.setenv("DVC_REPO", "https://registry.test/org/env.git")
    assert vertex_submit.main([*base, "--dry-run"]) == 0
    assert '"value": "https://registry.test/org/env.git"' in capsys.readouterr().out


def test_without_dvc_repo_the_image_keeps_its_own(monkeypatch, capsys):
    """The image carries the registry URL (--build-arg DVC_REPO=…): a spec without one sets no DVC_REPO."""
    monkeypatch.delenv("DVC_REPO", raising=False)
    base = [arg for arg in BASE if arg not in ("--dvc-repo", "https://registry.test/org/reg.git")]
    assert vertex_submit.main([*base, "--dry-run"]) == 0
    (pool,) = json.loads(capsys.readouterr().out)["worker_pool_specs"]
    assert "env" not in pool["container_spec"]
    assert spec(dvc_repo="", git_login_secret="login")["worker_pool_specs"][0]["container_spec"]["env"] == [
        {"name": "GIT_LOGIN_SECRET", "value": "projects/my-project/secrets/login/versions/latest"}
    ]


def test_help_shows_each_default_once(capsys):
    with pytest.raises(SystemExit):
        vertex_submit.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: n1-standard-8)" in out and "(default: None)" not in out
    assert out.count("(default: dermaid-TAG-TIMESTAMP)") == 1 and "(default: $DVC_REPO; unset" in out
    assert "(default: False)" not in out


def test_missing_required_flag_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        vertex_submit.main(["--project", "my-project", "--dry-run"])
    assert exit_info.value.code == 2 and "required" in capsys.readouterr().err


def test_the_sdk_accepts_the_spec_and_submit_sends_spot_scheduling(monkeypatch):
    """The spec goes through the real aiplatform CustomJob; only the API client is a stand-in."""
    from google.auth.credentials import AnonymousCredentials

    sent = {}

    class FakeJobClient:
        def create_custom_job(self, parent, custom_job, timeout=None):
            sent["parent"], sent["job"] = parent, custom_job
            custom_job.name = "projects/123/locations/us-central1/customJobs/456"
            return custom_job

    real_make = vertex_submit.make_custom_job

    def make_offline(job_spec, credentials=None):
        job = real_make(job_spec, AnonymousCredentials())
        job.api_client = FakeJobClient()
        return job

    monkeypatch.setattr(vertex_submit, "make_custom_job", make_offline)
    job = vertex_submit.submit(
        spec(spot=True, replica_count=2, service_account="job@my-project.iam.gserviceaccount.com")
    )

    assert job.resource_name == "projects/123/locations/us-central1/customJobs/456"
    assert sent["parent"] == "projects/my-project/locations/us-central1"
    proto = sent["job"]
    assert proto.display_name == "job" and proto.labels["dvc_tag"] == "dataset_v02"
    job_spec = proto.job_spec
    assert job_spec.base_output_directory.output_uri_prefix == "gs://my-bucket/vertex"
    assert job_spec.service_account == "job@my-project.iam.gserviceaccount.com"
    assert job_spec.scheduling.strategy.name == "SPOT" and job_spec.scheduling.restart_job_on_worker_restart
    chief, workers = job_spec.worker_pool_specs
    assert chief.machine_spec.accelerator_type.name == "NVIDIA_TESLA_T4" and chief.machine_spec.accelerator_count == 1
    assert (chief.replica_count, workers.replica_count) == (1, 1)
    assert list(chief.container_spec.args) == ["my-project", "my-bucket", "-", "-", "dataset_v02", "1"]
    assert [e.name for e in chief.container_spec.env] == ["DVC_REPO"]


def test_submit_failure_is_one_line_exit_1(monkeypatch, capsys):
    def no_credentials(job_spec, credentials=None):
        raise RuntimeError("Your default credentials were not found.\nTo set up ...")

    monkeypatch.setattr(vertex_submit, "submit", no_credentials)
    assert vertex_submit.main(BASE) == 1
    err = capsys.readouterr().err
    assert (
        err
        == "vertex_submit: error: submitting the job failed: RuntimeError: Your default credentials were not found.\n"
    )
