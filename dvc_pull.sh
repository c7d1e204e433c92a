#!/bin/sh
# Fetch one dataset version's manifest from the data registry (DESIGN §2.3):
#
#     sh dvc_pull.sh -t dataset_v02 [-r REPO]        # REPO defaults to $DVC_REPO
#     sh dvc_pull.sh                                   # the tag in $DVC_TAG, as the original README runs it
#
# Result: ./Versioning/versioned_paths.pickle as tagged (the same as
# `dvc get REPO Versioning --rev TAG --force`). REPO is the registry's git path or URL
# (tools/registry.py builds one). Needs git, dvc and python3 on PATH. With STORAGE_EMULATOR_HOST
# set, a gs:// DVC remote is read from that emulator.
# Exit status: 0 done, 2 usage error, 1 anything else (unknown repo or tag, failed download).
# Credentials never reach a command line or the log: a token in an https REPO URL
# (https://user:TOKEN@host/..., https://TOKEN@host/...) or in $GIT_LOGIN (user:token, or the original's
# https://user:token) is handed to git and DVC by a private credential helper (git-credentials.sh),
# and the URL is printed as https://***@host/.... A token in the URL's query (?access_token=...) is refused:
# it would reach git's command line. Pass the repository in DVC_REPO rather than -r when it holds a
# token (a command line is readable by every process). A REPO or TAG starting with "-" is refused (it
# would be read as an option), and git may speak only file, git, http(s) and ssh (GIT_ALLOW_PROTOCOL;
# set it yourself for a remote helper such as codecommit::).
set -eu

USAGE="usage: sh dvc_pull.sh [-t TAG] [-r REPO]   (TAG defaults to \$DVC_TAG, REPO to \$DVC_REPO)"

usage() { # usage [REASON]: one line on stderr, exit 2
    printf '%s%s\n' "$USAGE" "${1:+   -- $1}" >&2
    exit 2
}

die() { # die MESSAGE: one line on stderr, exit 1
    printf 'error: %s\n' "$1" >&2
    exit 1
}

# Query parameters named like a credential, in any case: access_token, key, password, X-Goog-Signature, ...
SECRET_PARAM='[Tt][Oo][Kk][Ee][Nn]|[Kk][Ee][Yy]|[Ss][Ee][Cc][Rr][Ee][Tt]|[Pp][Aa][Ss][Ss]|[Pp][Ww][Dd]|[Ss][Ii][Gg]|[Cc][Rr][Ee][Dd][Ee][Nn][Tt][Ii][Aa][Ll]|[Aa][Uu][Tt][Hh]'

redact_query() { # hide the values of credential-like query parameters (as utilities.errors.redact_url)
    printf '%s' "$1" | sed -E "s/([?&;][^=&;#[:space:]]*($SECRET_PARAM)[^=&;#[:space:]]*=)[^&;#[:space:]]*/\\1***/g"
}

redact() { # hide user:password@ / token@ (up to the authority's last @) and credential query values in URLs
    redact_query "$1" | sed -E 's|://[^/?#[:space:]]*@|://***@|g'
}

explain() { # the line of a git/dvc log that says what went wrong, redacted
    line=$(grep -E '^(fatal|error|ERROR):' "$1" | head -n 1 || true)
    if [ -z "$line" ]; then
        line=$(grep -v -e '^[[:space:]]*$' -e 'Could not determine bucket type' "$1" | tail -n 1 || true)
    fi
    redact "${line:-no output}"
}

# Prints the manifest's splits. Uses tools.registry's restricted loader when this checkout is
# importable, else a restricted unpickler of its own: a manifest must never be able to run code.
SUMMARY_PY='
import pickle, sys
path, root = sys.argv[1], sys.argv[2]
sys.path.insert(0, root)
try:
    from tools.registry import load_manifest, summary_lines
except Exception:
    load_manifest = None
try:
    if load_manifest is not None:
        lines = summary_lines(load_manifest(path))
    else:
        class Plain(pickle.Unpickler):
            def find_class(self, module, name):
                raise pickle.UnpicklingError("refers to %s.%s; only plain data is allowed" % (module, name))
        with open(path, "rb") as fh:
            manifest = Plain(fh).load()
        lines = ["%s: %d shards" % (s, len(manifest[s])) for s in ("train", "val", "test")]
except Exception as exc:
    sys.exit("invalid manifest: %s" % " ".join(str(exc).split()))
print("\n".join("  " + line for line in lines))
'

tag="${DVC_TAG:-}"
repo="${DVC_REPO:-}"
while getopts ":t:r:h" opt; do # leading ':': report bad options ourselves, in one line
    case "$opt" in
    t) tag=$OPTARG ;;
    r) repo=$OPTARG ;;
    h)
        echo "$USAGE"
        exit 0
        ;;
    :) usage "option -$OPTARG needs a value" ;;
    *) usage "unknown option -$OPTARG" ;;
    esac
done
shift $((OPTIND - 1))
[ $# -eq 0 ] || usage "unexpected argument: $(redact "$1")"
[ -n "$tag" ] || usage "no dataset tag: pass -t TAG or set DVC_TAG"
if [ -z "$repo" ] && [ -n "${GIT_URL:-}" ]; then # the original's variable, with the login inside: never echoed
    usage "missing -r REPO (or set DVC_REPO): GIT_URL is not read; put the registry URL without its login in DVC_REPO and the login in GIT_LOGIN"
fi
[ -n "$repo" ] || usage "missing -r REPO (or set DVC_REPO)"
case "$tag" in
-* | *[!A-Za-z0-9._-]*) usage "invalid tag: use letters, digits, '.', '_', '-'" ;;
esac
# The repository is never echoed here: it may hold a token.
case "$repo" in
-*) usage "invalid REPO: it starts with '-' and would be read as an option" ;;
*[[:cntrl:]]*) usage "invalid REPO: it holds a control character" ;;
esac
[ "$(redact_query "$repo")" = "$repo" ] ||
    usage "REPO has a credential in its query, which git would put on its command line: use https://user:TOKEN@host/... in DVC_REPO, or GIT_LOGIN=user:token"
for tool in git dvc python3; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found on PATH (activate the project's .venv)"
done

shown=$(redact "$repo")
here=$(cd "$(dirname "$0")" && pwd)
export GIT_TERMINAL_PROMPT=0 DVC_NO_ANALYTICS=1 GIT_ALLOW_PROTOCOL="${GIT_ALLOW_PROTOCOL:-file:git:http:https:ssh}"
# Download beside the destination, then rename: an interrupted pull never leaves half a Versioning/.
work=$(mktemp -d ./.dvc_pull.XXXXXX)
trap 'rm -rf "$work"; git_credentials_cleanup' EXIT
trap 'exit 1' HUP INT TERM

# --- Credentials: out of the URL (and argv) into a credential helper ---------------------------------
git_credentials_cleanup() { :; } # git-credentials.sh replaces it
if [ -f "$here/git-credentials.sh" ]; then
    # shellcheck source=git-credentials.sh
    . "$here/git-credentials.sh"
    if split_url "$repo"; then
        if [ -n "$url_user" ]; then
            login_user=$url_user login_token=$url_token
        elif [ -n "${GIT_LOGIN:-}" ]; then
            split_login "$GIT_LOGIN" || usage "GIT_LOGIN must be user:token or https://user:token, on one line"
        fi
        repo=$url_clean
        if [ -n "${login_user:-}" ]; then
            git_credentials "$url_origin" "$login_user" "${login_token:-}" || die "cannot create a private credential folder"
        fi
    fi
    unset login_token url_token GIT_LOGIN
else
    case $repo in *://*@*) die "a registry URL with credentials needs git-credentials.sh beside dvc_pull.sh" ;; esac
fi

# --- Resolve the tag (peeled: an annotated tag's ^{} line names the commit) ---------------------------
git ls-remote --tags -- "$repo" >"$work/tags" 2>"$work/log" || die "cannot read registry $shown: $(explain "$work/log")"
sha=$(awk -v ref="refs/tags/$tag" '$2 == ref { s = $1 } $2 == ref "^{}" { p = $1 } END { print (p != "" ? p : s) }' "$work/tags")
if [ -z "$sha" ]; then
    tags=$(sed -n 's#^[0-9a-f]*[[:space:]]*refs/tags/##p' "$work/tags" | grep -v '\^{}$' | sort | paste -s -d , - | sed 's/,/, /g' || true)
    die "tag $tag not found in $shown; available tags: ${tags:-none}"
fi

# --- Fetch Versioning/ at that commit --------------------------------------------------------------
# Options first, then "--": the repository is only ever a positional argument.
set -- --rev "$sha" -o "$work/Versioning"
if [ -n "${STORAGE_EMULATOR_HOST:-}" ]; then
    # endpointurl is valid only for cloud remotes (DVC rejects it for a local folder): ask first.
    url=$(dvc get --show-url "$@" -- "$repo" Versioning 2>"$work/log") || die "dvc get --show-url failed for $tag: $(explain "$work/log")"
    case "$url" in
    gs://*) set -- "$@" --remote-config "endpointurl=$STORAGE_EMULATOR_HOST" ;;
    esac
fi
dvc get "$@" -- "$repo" Versioning >"$work/log" 2>&1 || die "dvc get of $tag from $shown failed: $(explain "$work/log")"
manifest="$work/Versioning/versioned_paths.pickle"
[ -f "$manifest" ] || die "registry $shown has no Versioning/versioned_paths.pickle at $tag"
summary=$(python3 -c "$SUMMARY_PY" "$manifest" "$here" 2>"$work/log") || die "$tag: $(explain "$work/log")"

rm -rf ./Versioning
mv "$work/Versioning" ./Versioning
echo "tag: $tag"
echo "commit: $sha"
echo "registry: $shown"
echo "manifest: Versioning/versioned_paths.pickle"
echo "$summary"
