"""Submit the training image as a Vertex AI custom job.

    python -m tools.vertex_submit --project my-project --region us-central1 \
        --image us-docker.pkg.dev/my-project/dermaid/training:v1 --bucket my-bucket \
        --dvc-tag dataset_v02 --dvc-repo https://host/org/registry.git \
        --git-login-secret registry-login --wandb-key-secret wandb-key --spot --dry-run -- -e 20 -x

The container gets the image's six positional arguments (GCP_PROJECT GCS_BUCKET_NAME GIT_LOGIN
WANDB_API_KEY DVC_TAG NUM_GPU) with both secrets as "-": a job spec is readable by anyone who can
list jobs, so it holds only Secret Manager resource *names* (env GIT_LOGIN_SECRET /
WANDB_API_KEY_SECRET); run-commands.sh reads the values at start-up with the job's service account,
which needs roles/secretmanager.secretAccessor on them. Nothing that looks like a credential may enter
the spec: a --dvc-repo with `user:token@` or a `?access_token=` (token, key, password, sig, …) query, or an
argument after -- holding such a URL, is refused.

`--dry-run` prints the job spec as JSON: no API call, no credentials, no aiplatform import.
With --replica-count N > 1 the job has a chief pool and a pool of N-1 workers; Vertex AI sets
TF_CONFIG for MultiWorkerMirroredStrategy. Exit codes: 0 submitted/printed, 2 bad arguments, 1 API error.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from utilities.errors import JobError, OneLineParser, redact_url

DEFAULT_MACHINE_TYPE = "n1-standard-8"
DEFAULT_ACCELERATOR = "NVIDIA_TESLA_T4"

_PROJECT = re.compile(r"^([a-z0-9.-]+:)?[a-z][a-z0-9-]{4,28}[a-z0-9]$")  # optional legacy domain prefix
_REGION = re.compile(r"^[a-z]+(-[a-z]+)+[0-9]+$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
_ACCELERATOR = re.compile(r"^[A-Z][A-Z0-9_]+$")
_MACHINE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)+$")
_SECRET_NAME = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
_SECRET_REF = re.compile(r"^projects/[^/\s]+/secrets/[A-Za-z0-9_-]{1,255}(/versions/[A-Za-z0-9_-]+)?$")
_LABEL_BAD = re.compile(r"[^a-z0-9_-]")
DVC_REPO_FROM_ENV = "$DVC_REPO"  # --dvc-repo's default, read when used: --help never shows the variable's value


class SpecError(JobError, ValueError):
    """An argument that cannot make a valid job; the message is one line for the user."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise SpecError(message)


def bucket_name(text: str) -> str:
    """`my-bucket`, `gs://my-bucket` and `gs://my-bucket/` all name the same bucket."""
    name = text.removeprefix("gs://").rstrip("/")
    _check(bool(_BUCKET.match(name)), f"--bucket {text!r} is not a bucket name")
    return name


def secret_version(project: str, secret: str) -> str:
    """A Secret Manager version name from a short secret name or a full resource name."""
    if secret.startswith("projects/"):
        _check(bool(_SECRET_REF.match(secret)), f"{secret!r} is not projects/P/secrets/NAME[/versions/V]")
        return secret if "/versions/" in secret else f"{secret}/versions/latest"
    _check(bool(_SECRET_NAME.match(secret)), f"{secret!r} is not a Secret Manager secret name")
    return f"projects/{project}/secrets/{secret}/versions/latest"


def _check_repo_url(url: str) -> None:
    """The spec is readable by anyone who can list jobs: no `user:token@`, no `token@` and no credential-like
    query or fragment parameter (`?access_token=…`, `token`, `key`, `password`, `sig`, …) in the repo URL.

    Over HTTPS any userinfo is a credential (a bare token is the username part); only `ssh://git@host`
    (a user name, the key stays on the machine) may name a user. The message never repeats the URL.
    """
    try:
        parts = urlsplit(url)
        user, password = parts.username, parts.password
    except ValueError:
        raise SpecError("--dvc-repo is not a valid URL") from None
    ssh_user_only = parts.scheme in ("ssh", "git+ssh") and password is None
    _check(
        (user is None and password is None) or ssh_user_only,
        "--dvc-repo must not embed credentials (user:token@ or token@); store them in Secret Manager "
        "and pass its name with --git-login-secret",
    )
    params = f"q://h/?{parts.query}&{parts.fragment}"
    _check(
        redact_url(params) == params,
        "--dvc-repo must not carry a token in its query (access_token=, token=, key=, ...); store user:token in "
        "Secret Manager and pass its name with --git-login-secret",
    )


def build_job_spec(
    *,
    project: str,
    region: str,
    image: str,
    bucket: str,
    dvc_tag: str,
    dvc_repo: str,
    display_name: str,
    machine_type: str = DEFAULT_MACHINE_TYPE,
    accelerator_type: str | None = DEFAULT_ACCELERATOR,
    accelerator_count: int = 1,
    replica_count: int = 1,
    spot: bool = False,
    git_login_secret: str | None = None,
    wandb_key_secret: str | None = None,
    service_account: str | None = None,
    extra_args: Sequence[str] = (),
) -> dict[str, Any]:
    """The whole job as plain data: what --dry-run prints and what `submit` sends. Pure."""
    _check(bool(_PROJECT.match(project)), f"--project {project!r} is not a project id")
    _check(bool(_REGION.match(region)), f"--region {region!r} is not a region like us-central1")
    _check(bool(image) and not any(c.isspace() for c in image), "--image must be an image URI without spaces")
    bucket = bucket_name(bucket)
    _check(
        bool(dvc_tag) and not dvc_tag.startswith("-") and not any(c.isspace() for c in dvc_tag),
        f"--dvc-tag {dvc_tag!r} is not a tag",
    )
    if dvc_repo:  # none: the image's own (docker build --build-arg DVC_REPO=…)
        _check_repo_url(dvc_repo)
    _check(
        all(redact_url(arg) == arg for arg in extra_args),
        "an argument after -- holds a credential in a URL (user:token@ or ?token=); the job spec is readable "
        "by anyone who can list jobs: use a Secret Manager secret",
    )
    _check(bool(_MACHINE.match(machine_type)), f"--machine-type {machine_type!r} is not a machine type")
    _check(accelerator_count >= 0, "--accelerator-count must be >= 0")
    _check(replica_count >= 1, "--replica-count must be at least 1")
    _check(0 < len(display_name) <= 128, "--display-name must be 1 to 128 characters")
    gpus = accelerator_count if accelerator_type and accelerator_count else 0
    if gpus:
        _check(
            bool(_ACCELERATOR.match(accelerator_type or "")),
            f"--accelerator-type {accelerator_type!r} is not like NVIDIA_TESLA_T4",
        )

    machine_spec: dict[str, Any] = {"machine_type": machine_type}
    if gpus:
        machine_spec |= {"accelerator_type": accelerator_type, "accelerator_count": gpus}
    env = [{"name": "DVC_REPO", "value": dvc_repo}] if dvc_repo else []
    if git_login_secret:
        env.append({"name": "GIT_LOGIN_SECRET", "value": secret_version(project, git_login_secret)})
    if wandb_key_secret:
        env.append({"name": "WANDB_API_KEY_SECRET", "value": secret_version(project, wandb_key_secret)})
    # The image's positional interface; "-" makes run-commands.sh look for the secrets elsewhere.
    # NUM_GPU is the replicas on one machine: its GPUs, or one CPU replica.
    args = [project, bucket, "-", "-", dvc_tag, str(max(gpus, 1))]
    if extra_args:
        args += ["--", *extra_args]
    container: dict[str, Any] = {"image_uri": image, "args": args, **({"env": env} if env else {})}

    def pool(count: int) -> dict[str, Any]:
        return {"machine_spec": dict(machine_spec), "replica_count": count, "container_spec": copy.deepcopy(container)}

    # Vertex AI makes pool 0 the chief (one replica) and pool 1 the workers.
    pools = [pool(1)] if replica_count == 1 else [pool(1), pool(replica_count - 1)]
    spec: dict[str, Any] = {
        "project": project,
        "location": region,
        "display_name": display_name,
        "base_output_dir": f"gs://{bucket}/vertex",
        "staging_bucket": f"gs://{bucket}/vertex/staging",
        "labels": {"app": "dermaid-training", "dvc_tag": _LABEL_BAD.sub("-", dvc_tag.lower())[:63]},
        "worker_pool_specs": pools,
        # Multi-worker training does not survive one worker restarting alone (e.g. a spot
        # preemption): then restart the whole job.
        "scheduling": {"restart_job_on_worker_restart": replica_count > 1},
    }
    if spot:
        spec["scheduling"]["strategy"] = "SPOT"
    if service_account:
        spec["service_account"] = service_account
    return spec


def make_custom_job(spec: dict[str, Any], credentials: Any = None) -> Any:
    """An `aiplatform.CustomJob` for the spec; nothing is sent until `.submit`."""
    from google.cloud import aiplatform

    return aiplatform.CustomJob(
        display_name=spec["display_name"],
        worker_pool_specs=spec["worker_pool_specs"],
        base_output_dir=spec["base_output_dir"],
        staging_bucket=spec["staging_bucket"],
        project=spec["project"],
        location=spec["location"],
        labels=spec["labels"],
        credentials=credentials,
    )


def submit(spec: dict[str, Any], credentials: Any = None) -> Any:
    """Create the job on Vertex AI and return it without waiting for it to run."""
    from google.cloud.aiplatform.compat.types import custom_job as gca_custom_job

    job = make_custom_job(spec, credentials)
    scheduling = spec["scheduling"]
    strategy = scheduling.get("strategy")
    job.submit(
        service_account=spec.get("service_account"),
        scheduling_strategy=gca_custom_job.Scheduling.Strategy[strategy] if strategy else None,
        restart_job_on_worker_restart=scheduling["restart_job_on_worker_restart"],
    )
    return job


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m tools.vertex_submit",
        description="Submit the training image as a Vertex AI custom job. Arguments after -- go to cli.py.",
    )
    job = parser.add_argument_group("Job")
    job.add_argument("--project", required=True, help="Google Cloud project id")
    job.add_argument("--region", required=True, help="Vertex AI region, e.g. us-central1")
    job.add_argument("--image", required=True, help="training image URI (built from this repository's Dockerfile)")
    job.add_argument("--display-name", default=None, help="job name (default: dermaid-TAG-TIMESTAMP)")
    job.add_argument(
        "--service-account",
        default=None,
        help="service account the job runs as (needs Secret Manager access for the secrets)",
    )
    job.add_argument("--dry-run", action="store_true", help="print the job spec as JSON; no API call")
    data = parser.add_argument_group("Data and outputs")
    data.add_argument(
        "--bucket", required=True, help="GCS bucket: models in gs://B/models, Vertex outputs in gs://B/vertex"
    )
    data.add_argument("--dvc-tag", required=True, help="dataset version tag in the data registry")
    data.add_argument(
        "--dvc-repo",
        default=DVC_REPO_FROM_ENV,
        help="data registry git URL, without credentials (default: $DVC_REPO; unset: the one built into the image)",
    )
    data.add_argument(
        "--git-login-secret", default=None, help="Secret Manager secret holding user:token for the registry"
    )
    data.add_argument(
        "--wandb-key-secret", default=None, help="Secret Manager secret holding the W&B API key (none: W&B offline)"
    )
    hw = parser.add_argument_group("Machines")
    hw.add_argument("--machine-type", default=DEFAULT_MACHINE_TYPE, help="Compute Engine machine type")
    hw.add_argument("--accelerator-type", default=DEFAULT_ACCELERATOR, help="GPU type; 'none' for CPU only")
    hw.add_argument("--accelerator-count", type=int, default=1, help="GPUs per machine (0: CPU only)")
    hw.add_argument("--replica-count", type=int, default=1, help="machines; > 1 adds a worker pool (multi-worker)")
    hw.add_argument("--spot", action="store_true", help="Spot VMs (cheaper, preemptible)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = build_parser()
    args = parser.parse_args(own)
    accelerator = None if args.accelerator_type.lower() == "none" else args.accelerator_type
    display_name = args.display_name or f"dermaid-{args.dvc_tag}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        spec = build_job_spec(
            project=args.project,
            region=args.region,
            image=args.image,
            bucket=args.bucket,
            dvc_tag=args.dvc_tag,
            dvc_repo=os.environ.get("DVC_REPO", "") if args.dvc_repo == DVC_REPO_FROM_ENV else args.dvc_repo,
            display_name=display_name,
            machine_type=args.machine_type,
            accelerator_type=accelerator,
            accelerator_count=args.accelerator_count,
            replica_count=args.replica_count,
            spot=args.spot,
            git_login_secret=args.git_login_secret,
            wandb_key_secret=args.wandb_key_secret,
            service_account=args.service_account,
            extra_args=extra,
        )
    except SpecError as exc:
        parser.error(str(exc))  # usage line + one-line error, exit 2
    if args.dry_run:
        print(json.dumps(spec, indent=2))
        return 0
    try:
        job = submit(spec)
    except Exception as exc:  # credentials, permissions, quota: one line, not a traceback
        detail = redact_url((str(exc).splitlines() or [""])[0])
        print(f"vertex_submit: error: submitting the job failed: {type(exc).__name__}: {detail}", file=sys.stderr)
        return 1
    print(job.resource_name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
