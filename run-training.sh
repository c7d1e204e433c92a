#!/usr/bin/env bash
# Pull the dataset version, then train once. run-commands.sh resolves settings and secrets first;
# with them already in the environment this can also run on its own:
#
#   GCS_BUCKET_NAME=my-bucket DVC_TAG=dataset_v02 DVC_REPO=https://host/org/registry.git \
#       NUM_GPU=1 bash run-training.sh -e 20 -x
#   GCS_BUCKET_NAME=./outputs ...   # a value starting with / or . is a local output folder
#
# Writes ./Versioning/ (the manifest) in the current directory; cli.py's outputs go to
# gs://$GCS_BUCKET_NAME/models (or the local folder): cli.py derives that from the variable (and refuses
# a value that is not a bucket name); this script passes it through. Exit status: 2 for usage errors,
# the pull's status if it fails, otherwise cli.py's.
# PYTHON (default python) and DVC_PULL_SCRIPT (default dvc_pull.sh beside this file) can be overridden.
set -euo pipefail

readonly PROG=run-training.sh
readonly USAGE="usage: GCS_BUCKET_NAME=B DVC_TAG=T DVC_REPO=URL [NUM_GPU=1] $PROG [cli.py args...]"
readonly MANIFEST=Versioning/versioned_paths.pickle

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${PYTHON:-python}
dvc_pull=${DVC_PULL_SCRIPT:-$here/dvc_pull.sh}

usage_error() {
    printf '%s\n%s: error: %s\n' "$USAGE" "$PROG" "$1" >&2
    exit 2
}

bucket=${GCS_BUCKET_NAME:-}
tag=${DVC_TAG:-}
gpus=${NUM_GPU:-1}
[[ -n $bucket ]] || usage_error "GCS_BUCKET_NAME is required"
[[ -n $tag && $tag != -* ]] || usage_error "DVC_TAG is required and must not start with -"
[[ -n ${DVC_REPO:-} ]] || usage_error "DVC_REPO is required (the data registry: git URL or path)"
[[ $gpus =~ ^[1-9][0-9]{0,3}$ ]] || usage_error "NUM_GPU must be a positive integer"

# The repository stays in DVC_REPO's environment rather than on the command line: an https URL may
# carry credentials. The W&B key is not needed to pull data, so it is kept from that process.
status=0
env -u WANDB_API_KEY sh "$dvc_pull" -t "$tag" || status=$?
if ((status != 0)); then
    printf '%s: error: dvc_pull.sh -t %s failed (exit %d)\n' "$PROG" "$tag" "$status" >&2
    exit "$status"
fi
if [[ ! -f $MANIFEST ]]; then
    printf '%s: error: dvc_pull.sh -t %s did not produce ./%s\n' "$PROG" "$tag" "$MANIFEST" >&2
    exit 1
fi

# Training needs no git credentials: drop run-commands.sh's credential config (git-credentials.sh) from
# its environment; without GIT_CONFIG_COUNT, the GIT_CONFIG_KEY_n/VALUE_n left behind are not read.
exec env -u GIT_CONFIG_GLOBAL -u GIT_CONFIG_NOSYSTEM -u GIT_CONFIG_COUNT "$python" "$here/cli.py" -g "$gpus" --manifest "$MANIFEST" \
    --data-tag "$tag" "$@"
