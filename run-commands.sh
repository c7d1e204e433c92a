#!/usr/bin/env bash
# Entry point of the training image: resolves settings and secrets, then runs run-training.sh.
#
#   run-commands.sh [GCP_PROJECT GCS_BUCKET_NAME GIT_LOGIN WANDB_API_KEY DVC_TAG NUM_GPU] [--] [cli.py args...]
#   run-commands.sh --shell      # the same set-up, then an interactive bash (docker-shell.sh's default)
#   docker run IMAGE my-project my-bucket - - dataset_v02 1 -- -e 20 -x
#
# The six positionals are the original Vertex AI job's interface and stay accepted, all six or none.
# A positional "" or "-" (or leaving them all out) takes the value from, in order:
#   the environment variable of the same name;
#   for the secrets, $SECRETS_DIR/git.txt (GIT_LOGIN) and $SECRETS_DIR/wandb.txt (WANDB_API_KEY),
#   SECRETS_DIR defaulting to /secrets (docker-shell.sh mounts secrets/ there);
#   for the secrets, a Secret Manager version named by GIT_LOGIN_SECRET / WANDB_API_KEY_SECRET
#   ("projects/P/secrets/S[/versions/V]"), read with the job's own credentials (how
#   tools/vertex_submit.py provides them: a Vertex AI job spec has no secret fields).
# GCS_BUCKET_NAME and DVC_TAG are required (not with --shell), NUM_GPU defaults to 1, DVC_REPO comes
# from the environment (the image sets a default registry). GOOGLE_APPLICATION_CREDENTIALS passes
# through; if unset, $SECRETS_DIR/gcp.json or the original's $SECRETS_DIR/ac215-dermaid.json is used.
#
# Secrets: never printed, never on a command line we start, never in a file outside a private
# directory (mktemp -d, mode 0700) deleted on exit. GIT_LOGIN ("user:token", or the original's
# "https://user:token") reaches the data registry through a git credential helper scoped to
# DVC_REPO's https origin (git-credentials.sh); WANDB_API_KEY reaches only the environment of the
# training process, which then tracks with W&B; without it W&B is off (or offline with -x).
# Exit status: 2 for usage errors, otherwise run-training.sh's (that is cli.py's).
set -euo pipefail

readonly PROG=run-commands.sh
readonly USAGE="usage: $PROG [GCP_PROJECT GCS_BUCKET_NAME GIT_LOGIN WANDB_API_KEY DVC_TAG NUM_GPU] [--] [cli.py args...]  (\"-\": from environment or \$SECRETS_DIR)"
readonly NAMES=(GCP_PROJECT GCS_BUCKET_NAME GIT_LOGIN WANDB_API_KEY DVC_TAG NUM_GPU)

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=git-credentials.sh
. "$here/git-credentials.sh"
secrets_dir=${SECRETS_DIR:-/secrets}
python=${PYTHON:-python}

usage_error() {
    printf '%s\n%s: error: %s\n' "$USAGE" "$PROG" "$1" >&2
    exit 2
}

die() {
    printf '%s: error: %s\n' "$PROG" "$1" >&2
    exit "${2:-1}"
}

warn() {
    printf '%s: warning: %s\n' "$PROG" "$1" >&2
}

# ---- positionals --------------------------------------------------------------------------------
if (($#)) && [[ $1 == -h || $1 == --help ]]; then
    printf '%s\n' "$USAGE"
    exit 0
fi
shell=0
if (($#)) && [[ $1 == --shell ]]; then
    shell=1
    shift
    (($# == 0)) || usage_error "--shell takes no other argument"
fi
positional=()
while (($#)) && ((${#positional[@]} < 6)); do
    case $1 in
        --) break ;;
        -) positional+=("") ;;
        -?*) break ;; # the first cli.py flag
        *) positional+=("$1") ;;
    esac
    shift
done
# Values are never echoed in these messages: a misplaced argument may well be a token.
if ((${#positional[@]} != 0 && ${#positional[@]} != 6)); then
    usage_error "expected all six positional arguments or none, got ${#positional[@]} (use - for a value from the environment)"
fi
if (($#)) && [[ $1 == -- ]]; then
    shift
elif (($#)) && [[ $1 != -?* ]]; then
    usage_error "unexpected argument after the six positional arguments (cli.py arguments go after --)"
fi

# ---- settings -------------------------------------------------------------------------------------
# Positional first, then the environment. Assigned with printf -v: no subshell, no echo.
for i in "${!NAMES[@]}"; do
    name=${NAMES[i]}
    value=${positional[i]:-}
    if [[ -n $value && ($name == GIT_LOGIN || $name == WANDB_API_KEY) ]]; then
        warn "$name given as an argument is visible to every process on this machine; prefer \$SECRETS_DIR or the environment"
    fi
    [[ -n $value ]] || value=${!name:-}
    printf -v "$name" '%s' "$value"
done

# First line of a secret file, surrounding whitespace (a Windows CR too) removed. A missing file
# is not an error: the secret is optional. $1 file, $2 variable to set.
read_secret_file() {
    local line=""
    [[ -e $1 ]] || return 0
    [[ -r $1 ]] || die "cannot read $1 (check its owner and mode)"
    IFS= read -r line <"$1" || true
    line=${line#"${line%%[![:space:]]*}"}
    line=${line%"${line##*[![:space:]]}"}
    printf -v "$2" '%s' "$line"
}

# Secret Manager: $1 names the variable holding the version's resource name, $2 the variable to set.
# Python (google-auth, in the image) uses Application Default Credentials: on Vertex AI the job's
# service account via the metadata server. The payload travels through a pipe, never an argument.
read_secret_manager() {
    local ref=${!1} value
    [[ $ref == projects/*/secrets/* ]] || usage_error "$1 must look like projects/PROJECT/secrets/NAME[/versions/VERSION]"
    [[ $ref == */versions/* ]] || ref="$ref/versions/latest"
    value=$(SECRET_REF=$ref "$python" -c '
import base64, os, sys
ref = os.environ["SECRET_REF"]
endpoint = os.environ.get("SECRET_MANAGER_ENDPOINT", "https://secretmanager.googleapis.com").rstrip("/")
try:
    import google.auth
    from google.auth.transport.requests import AuthorizedSession

    credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
    response = AuthorizedSession(credentials).get(f"{endpoint}/v1/{ref}:access", timeout=60)
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}")
    sys.stdout.write(base64.b64decode(response.json()["payload"]["data"]).decode().strip())
except Exception as exc:  # one line, and never the payload
    detail = (str(exc).splitlines() or [""])[0][:200]
    sys.exit(f"{type(exc).__name__}: {detail}")
') || die "cannot read the Secret Manager version named by $1"
    printf -v "$2" '%s' "$value"
}

[[ -n $GIT_LOGIN ]] || read_secret_file "$secrets_dir/git.txt" GIT_LOGIN
[[ -n $WANDB_API_KEY ]] || read_secret_file "$secrets_dir/wandb.txt" WANDB_API_KEY
if [[ -z $GIT_LOGIN && -n ${GIT_LOGIN_SECRET:-} ]]; then read_secret_manager GIT_LOGIN_SECRET GIT_LOGIN; fi
if [[ -z $WANDB_API_KEY && -n ${WANDB_API_KEY_SECRET:-} ]]; then read_secret_manager WANDB_API_KEY_SECRET WANDB_API_KEY; fi
for key_file in gcp.json ac215-dermaid.json; do # ours, then the original's name
    if [[ -z ${GOOGLE_APPLICATION_CREDENTIALS:-} && -f $secrets_dir/$key_file ]]; then
        export GOOGLE_APPLICATION_CREDENTIALS=$secrets_dir/$key_file
    fi
done

if ((!shell)); then
    [[ -n $GCS_BUCKET_NAME ]] || usage_error "GCS_BUCKET_NAME is required (argument 2 or environment)"
    [[ -n $DVC_TAG ]] || usage_error "DVC_TAG is required (argument 5 or environment)"
fi
[[ $DVC_TAG != -* ]] || usage_error "DVC_TAG must not start with -"
NUM_GPU=${NUM_GPU:-1}
[[ $NUM_GPU =~ ^[1-9][0-9]{0,3}$ ]] || usage_error "NUM_GPU must be a positive integer"

export NUM_GPU
for name in GCS_BUCKET_NAME DVC_TAG GCP_PROJECT; do
    if [[ -n ${!name} ]]; then export "${name?}"; else unset "$name"; fi
done
# Never ask on a terminal: a container has none and a prompt would hang the job.
export GIT_TERMINAL_PROMPT=0

# ---- W&B ---------------------------------------------------------------------------------------------
# With a key, cli.py tracks by default (as the original did); without one it does not track unless
# asked with -x, and then offline (cli.py decides both, from the variables passed through).
if [[ -n $WANDB_API_KEY ]]; then
    export WANDB_API_KEY
else
    unset WANDB_API_KEY
fi

# ---- git credentials for the data registry ------------------------------------------------------
trap git_credentials_cleanup EXIT
if [[ -n $GIT_LOGIN ]]; then
    split_login "$GIT_LOGIN" || usage_error "GIT_LOGIN must be user:token or https://user:token, on one line"
    if split_url "${DVC_REPO:-}"; then
        git_credentials "$url_origin" "$login_user" "$login_token" || die "cannot create a private credential folder"
    else
        warn "GIT_LOGIN is not used: DVC_REPO is not an https URL"
    fi
fi
unset GIT_LOGIN login_user login_token

# ---- train (or the interactive shell) ----------------------------------------------------------------
# A child rather than exec, so that the credential directory is removed when training ends.
# Docker and Vertex AI stop a job with SIGTERM to this process: pass it on and wait for the child.
if ((shell)); then
    printf '%s: shell with DVC_TAG=%s NUM_GPU=%s; run: sh dvc_pull.sh, then python cli.py [flags]\n' \
        "$PROG" "${DVC_TAG:-(unset)}" "$NUM_GPU" >&2
    # Interactive on a terminal; with commands piped in, it runs them. Foreground: no signal relay.
    status=0
    bash || status=$?
    exit "$status"
fi
bash "$here/run-training.sh" "$@" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null || true' TERM INT
status=0
wait "$child" || status=$?
# A trapped signal interrupts wait while the child is still shutting down: wait for its real status.
while kill -0 "$child" 2>/dev/null; do
    status=0
    wait "$child" || status=$?
done
exit "$status"
