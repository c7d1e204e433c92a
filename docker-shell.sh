#!/usr/bin/env bash
# Build the training image and run it on this machine, as Vertex AI would.
#
#   ./docker-shell.sh [--gpu|--cpu] [--no-build] [--shell] [--] [run-commands.sh args...]
#   GCS_BUCKET_NAME=my-bucket DVC_TAG=dataset_v02 DVC_REPO=https://host/org/registry.git \
#       ./docker-shell.sh -- -e 20 -x
#
# secrets/ (git.txt, wandb.txt, gcp.json) is mounted read-only at /secrets. Settings and secrets in
# this shell's environment are passed by name (-e NAME), so their values never appear in the
# docker command line (ps). GOOGLE_APPLICATION_CREDENTIALS, if set, is mounted read-only.
# The GPU image and --gpus all are used when nvidia-smi works (--gpu/--cpu force a choice).
# --shell opens bash in the container instead of training. DOCKER=podman also works.
set -euo pipefail

readonly PROG=docker-shell.sh
readonly USAGE="usage: $PROG [--gpu|--cpu] [--no-build] [--shell] [--] [run-commands.sh args...]"
# Everything the entry point and cli.py read from the environment (DESIGN.md §2.5), plus the
# secret sources of run-commands.sh.
readonly PASS_ENV=(GCP_PROJECT GCS_BUCKET_NAME DVC_REPO DVC_TAG NUM_GPU GIT_LOGIN WANDB_API_KEY
    WANDB_MODE GIT_LOGIN_SECRET WANDB_API_KEY_SECRET STORAGE_EMULATOR_HOST)

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
docker=${DOCKER:-docker}
image=${IMAGE_NAME:-dermaid-training}

usage_error() {
    printf '%s\n%s: error: %s\n' "$USAGE" "$PROG" "$1" >&2
    exit 2
}

gpu=auto
build=1
shell=0
while (($#)); do
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
if [[ $gpu == auto ]]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then gpu=1; else gpu=0; fi
fi

target=cpu
tag=$image
if ((gpu)); then
    target=gpu
    tag=$image-gpu
fi

if ((build)); then
    build_args=(build --target "$target" -t "$tag")
    # The image user takes this uid so that secrets/ files (mode 0600) stay readable; root and
    # system uids keep the image default.
    uid=$(id -u)
    if ((uid >= 1000)); then build_args+=(--build-arg "APP_UID=$uid"); fi
    # run.json records the code's commit; the image has no .git to ask.
    if commit=$(git -C "$here" rev-parse HEAD 2>/dev/null); then build_args+=(--build-arg "GIT_COMMIT=$commit"); fi
    # An index URL may hold credentials: give it to BuildKit as a secret, never as a build-arg.
    if [[ -n ${PIP_INDEX_URL:-} ]]; then build_args+=(--secret "id=pip_index_url,env=PIP_INDEX_URL"); fi
    DOCKER_BUILDKIT=1 "$docker" "${build_args[@]}" "$here"
fi

run_args=(run --rm --init)
if [[ -t 0 && -t 1 ]]; then run_args+=(-it); fi
if ((gpu)); then run_args+=(--gpus all); fi
if [[ -d $here/secrets ]]; then
    run_args+=(-v "$here/secrets:/secrets:ro")
else
    printf '%s: note: no secrets/ folder; secrets come from the environment only\n' "$PROG" >&2
fi
for name in "${PASS_ENV[@]}"; do
    if [[ -n ${!name+set} ]]; then run_args+=(-e "$name"); fi
done
if [[ -n ${GOOGLE_APPLICATION_CREDENTIALS:-} ]]; then
    [[ -f $GOOGLE_APPLICATION_CREDENTIALS ]] || usage_error "GOOGLE_APPLICATION_CREDENTIALS is not a file"
    run_args+=(-v "$GOOGLE_APPLICATION_CREDENTIALS:/gcp/credentials.json:ro"
        -e GOOGLE_APPLICATION_CREDENTIALS=/gcp/credentials.json)
fi
if ((shell)); then run_args+=(--entrypoint /bin/bash); fi

exec "$docker" "${run_args[@]}" "$tag" "$@"
