#!/bin/sh
# Build the training image and start it on this machine (POSIX sh: `sh docker-shell.sh` works where
# sh is dash, as on Debian and Ubuntu, and in bash).
#
#   sh docker-shell.sh                   # a shell in the container: then `sh dvc_pull.sh`, `python cli.py ...`
#   sh docker-shell.sh [--gpu|--cpu] [--no-build] [--shell] [--] [run-commands.sh args...]
#   GCS_BUCKET_NAME=my-bucket sh docker-shell.sh -- -e 20 -x     # train as Vertex AI would, then exit
#
# As the original: DVC_TAG defaults to dataset_v09 and NUM_GPU to 1 (said on stderr when used);
# secrets/ (git.txt, wandb.txt, and ac215-dermaid.json or gcp.json) is mounted read-only at /secrets
# (../secrets, the original's layout, when there is no secrets/ here). Settings and secrets in this
# shell's environment are passed by name (-e NAME), so their values never appear in the docker command
# line (ps). GOOGLE_APPLICATION_CREDENTIALS, if set, is mounted read-only. The GPU image and
# --gpus all are used when nvidia-smi works (--gpu/--cpu force a choice). BuildKit is used when the
# docker client has it (buildx), the legacy builder otherwise. DOCKER=podman also works.
set -eu

PROG="docker-shell.sh"
USAGE="usage: sh $PROG [--gpu|--cpu] [--no-build] [--shell] [--] [run-commands.sh args...]"
# Everything the entry point and cli.py read from the environment (DESIGN.md §2.5), plus the
# secret sources of run-commands.sh.
PASS_ENV="GCP_PROJECT GCS_BUCKET_NAME DVC_REPO DVC_TAG NUM_GPU GIT_LOGIN WANDB_API_KEY
    WANDB_MODE GIT_LOGIN_SECRET WANDB_API_KEY_SECRET STORAGE_EMULATOR_HOST"

here=$(cd "$(dirname "$0")" && pwd)
docker=${DOCKER:-docker}
image=${IMAGE_NAME:-dermaid-training}

usage_error() {
    printf '%s\n%s: error: %s\n' "$USAGE" "$PROG" "$1" >&2
    exit 2
}

note() {
    printf '%s: %s\n' "$PROG" "$1" >&2
}

gpu=auto
build=1
shell=0
while [ $# -gt 0 ]; do
    case $1 in
    --gpu) gpu=1 ;;
    --cpu) gpu=0 ;;
    --no-build) build=0 ;;
    --shell) shell=1 ;;
    -h | --help)
        printf '%s\n' "$USAGE"
        exit 0
        ;;
    --)
        shift
        break
        ;;
    *) break ;; # run-commands.sh's arguments start here
    esac
    shift
done
# No job arguments: an interactive shell, as the original (its README runs the commands inside).
if [ $# -eq 0 ]; then shell=1; fi
if [ $shell = 1 ] && [ $# -gt 0 ]; then usage_error "--shell takes no run-commands.sh arguments"; fi
if [ $gpu = auto ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then gpu=1; else gpu=0; fi
fi

# The original's defaults, for a user who sets nothing.
if [ -z "${DVC_TAG:-}" ]; then
    DVC_TAG=dataset_v09
    note "DVC_TAG not set: using the original's default $DVC_TAG"
fi
if [ -z "${NUM_GPU:-}" ]; then
    NUM_GPU=1
    note "NUM_GPU not set: using 1"
fi
export DVC_TAG NUM_GPU

accelerator=cpu
tag=$image
if [ $gpu = 1 ]; then
    accelerator=gpu
    tag=$image-gpu
fi

if [ $build = 1 ]; then
    # Build args are stored in the image history: an index URL with credentials must not become one.
    case ${PIP_INDEX_URL:-} in
    *://*@*) usage_error "PIP_INDEX_URL holds credentials, which a build argument would store in the image; use an index without them" ;;
    esac
    # The image user takes this uid so that secrets/ files (mode 0600) stay readable; root and
    # system uids keep the image default.
    uid=$(id -u)
    app_uid=""
    if [ "$uid" -ge 1000 ]; then app_uid="APP_UID=$uid"; fi
    # run.json records the code's commit; the image has no .git to ask.
    commit=$(git -C "$here" rev-parse HEAD 2>/dev/null || true)
    if "$docker" buildx version >/dev/null 2>&1; then buildkit=1; else buildkit=0; fi
    DOCKER_BUILDKIT=$buildkit "$docker" build -t "$tag" --build-arg "ACCELERATOR=$accelerator" \
        ${app_uid:+--build-arg "$app_uid"} \
        ${commit:+--build-arg "GIT_COMMIT=$commit"} \
        ${PIP_INDEX_URL:+--build-arg "PIP_INDEX_URL=$PIP_INDEX_URL"} \
        "$here"
fi

# The command is assembled back to front in "$@", which holds the job's arguments (POSIX sh has no arrays).
if [ $shell = 1 ]; then set -- --shell; fi
set -- "$tag" "$@"
for name in $PASS_ENV; do
    eval "is_set=\${$name+set}"
    if [ -n "$is_set" ]; then set -- -e "$name" "$@"; fi
done
if [ -n "${GOOGLE_APPLICATION_CREDENTIALS:-}" ]; then
    [ -f "$GOOGLE_APPLICATION_CREDENTIALS" ] || usage_error "GOOGLE_APPLICATION_CREDENTIALS is not a file"
    set -- -v "$GOOGLE_APPLICATION_CREDENTIALS:/gcp/credentials.json:ro" \
        -e GOOGLE_APPLICATION_CREDENTIALS=/gcp/credentials.json "$@"
fi
secrets=""
for dir in "$here/secrets" "$here/../secrets"; do
    if [ -z "$secrets" ] && [ -d "$dir" ]; then secrets=$(cd "$dir" && pwd); fi
done
if [ -n "$secrets" ]; then
    set -- -v "$secrets:/secrets:ro" "$@"
else
    note "no secrets/ folder; secrets come from the environment only"
fi
if [ $gpu = 1 ]; then set -- --gpus all "$@"; fi
# A shell reads its commands from stdin (a terminal, or a pipe); a terminal also gets a tty.
if [ $shell = 1 ]; then set -- -i "$@"; fi
if [ -t 0 ] && [ -t 1 ]; then set -- -t "$@"; fi

exec "$docker" run --rm --init "$@"
