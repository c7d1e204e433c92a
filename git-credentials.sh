# shellcheck shell=sh disable=SC2034  # sourced: sets variables for the caller
# Git credentials that never reach a command line, a log or a repository's config (POSIX sh).
# Sourced by run-commands.sh and dvc_pull.sh:
#
#     . ./git-credentials.sh
#     split_login "https://user:token"        # or "user:token" → $login_user, $login_token
#     split_url "https://user:token@host/org/repo.git"  # → $url_clean, $url_origin, $url_user, $url_token
#     git_credentials "$url_origin" "$login_user" "$login_token"   # exports GIT_CONFIG_GLOBAL, GIT_CONFIG_NOSYSTEM, GIT_CONFIG_COUNT
#     ...; git_credentials_cleanup                                   # in an EXIT trap
#
# The credential lives in a private directory (mktemp -d, umask 077) with a helper script answering
# git's "get" for that origin only (gitcredentials(7)). GIT_CONFIG_GLOBAL points at a config holding
# the helper (plus includes of the system's and the user's own config), so git and DVC (dulwich reads
# the same file) find it while ~/.gitconfig and every .git/config stay untouched. printf is a shell
# builtin: the token is never in the argv of any process.
#
# No other credential helper ever sees the token: after a request that worked, git hands the
# credential to every configured helper to *store* (`helper = store` in ~/.gitconfig would write
# https://user:TOKEN@host into ~/.git-credentials), and so does DVC's git client (scmrepo), which
# calls the helpers it reads from the global and system files. So: an empty `helper =` after the
# includes clears git's list (and is the last value scmrepo reads in the generic section), every
# section that names a helper gets an empty one too (scmrepo reads each section on its own), the
# system file is read through ours (GIT_CONFIG_NOSYSTEM; scmrepo would read it separately), and the
# same reset plus our helper come again as command-line config (GIT_CONFIG_COUNT/KEY_n/VALUE_n),
# which git reads after a repository's own .git/config.

# split_login LOGIN: the original's GIT_LOGIN ("https://<user>:<token>") or "user:token".
split_login() {
    _login=${1#https://}
    _login=${_login#http://}
    _login=${_login%@}
    login_user=${_login%%:*}
    login_token=${_login#*:}
    case $_login in
    *:*) ;;
    *) return 1 ;;
    esac
    [ -n "$login_user" ] && [ -n "$login_token" ] || return 1
    case $_login in *[[:cntrl:]]* | */* | *@*) return 1 ;; esac
    return 0
}

# split_url URL: an http(s) URL without its user info ($url_clean), its origin ($url_origin), and the
# user info it carried ($url_user, $url_token; "TOKEN@host" gives the token as user and no password).
# Returns 1 for anything that is not an http(s) URL.
split_url() {
    case $1 in
    https://* | http://*) ;;
    *) return 1 ;;
    esac
    _scheme=${1%%://*}://
    _rest=${1#*://}
    _authority=${_rest%%/*}
    _path=${_rest#"$_authority"}
    url_user="" url_token=""
    case $_authority in
    *@*)
        _userinfo=${_authority%@*}
        _authority=${_authority##*@}
        case $_userinfo in
        *:*) url_user=${_userinfo%%:*} url_token=${_userinfo#*:} ;;
        *) url_user=$_userinfo ;;
        esac
        ;;
    esac
    url_origin=$_scheme$_authority
    url_clean=$url_origin$_path
}

# git_credentials ORIGIN USER TOKEN: answer git's credential requests for ORIGIN with USER/TOKEN.
git_credentials() {
    _umask=$(umask)
    umask 077
    GIT_CREDENTIALS_DIR=$(mktemp -d "${TMPDIR:-/tmp}/dermaid-git.XXXXXX") || {
        umask "$_umask"
        return 1
    }
    # The helper runs through sh (git and dulwich both honour "!"); a quote in its path would break it.
    case $GIT_CREDENTIALS_DIR in *"'"*)
        umask "$_umask"
        return 1
        ;;
    esac
    printf 'username=%s\npassword=%s\n' "$2" "$3" >"$GIT_CREDENTIALS_DIR/credential"
    cat >"$GIT_CREDENTIALS_DIR/helper" <<'HELPER'
#!/bin/sh
# git credential helper (gitcredentials(7)): answers "get" from the file beside it.
while IFS= read -r line && [ -n "$line" ]; do :; done
[ "$1" = get ] && exec cat "$(dirname "$0")/credential"
exit 0
HELPER
    chmod 700 "$GIT_CREDENTIALS_DIR/helper"
    _helper="!'$GIT_CREDENTIALS_DIR/helper'"
    {
        # Keep the system's and the user's settings (proxies, URL rewrites, CA files) outside the image.
        if [ -z "${GIT_CONFIG_NOSYSTEM:-}" ]; then _git_include "${GIT_CONFIG_SYSTEM:-/etc/gitconfig}"; fi
        if [ -n "${GIT_CONFIG_GLOBAL:-}" ]; then
            _git_include "$GIT_CONFIG_GLOBAL"
        else
            _git_include "${XDG_CONFIG_HOME:-${HOME:-/nonexistent}/.config}/git/config"
            _git_include "${HOME:-/nonexistent}/.gitconfig"
        fi
        # ... but none of their credential helpers (see the top of this file).
        printf '[credential]\n\thelper =\n'
        _git_helper_sections | while IFS= read -r _section; do
            printf '[credential "%s"]\n\thelper =\n' "$_section"
        done
        printf '[credential "%s"]\n\thelper = %s\n' "$1" "$_helper"
    } >"$GIT_CREDENTIALS_DIR/gitconfig"
    GIT_CONFIG_GLOBAL=$GIT_CREDENTIALS_DIR/gitconfig
    GIT_CONFIG_NOSYSTEM=1
    unset GIT_CONFIG_SYSTEM
    export GIT_CONFIG_GLOBAL GIT_CONFIG_NOSYSTEM
    # Command-line config, after the repository's: clear the helpers, then ours (values, not argv).
    _n=${GIT_CONFIG_COUNT:-0}
    case $_n in '' | *[!0-9]*) _n=0 ;; esac
    export "GIT_CONFIG_KEY_$_n=credential.helper" "GIT_CONFIG_VALUE_$_n="
    _n=$((_n + 1))
    export "GIT_CONFIG_KEY_$_n=credential.$1.helper" "GIT_CONFIG_VALUE_$_n=$_helper"
    GIT_CONFIG_COUNT=$((_n + 1))
    export GIT_CONFIG_COUNT
    umask "$_umask"
}

# _git_include FILE: an [include] of FILE when it exists (a path git could not read back is skipped).
_git_include() {
    case $1 in *'"'* | *\\* | *[[:cntrl:]]*) return 0 ;; esac
    if [ -f "$1" ]; then printf '[include]\n\tpath = "%s"\n' "$1"; fi
}

# _git_helper_sections: the URL of each [credential "URL"] section that names a helper in the config
# git reads here (system, global, this repository's, included files), escaped for a section header.
_git_helper_sections() {
    { git config --name-only --get-regexp '^credential\..+\.helper$' 2>/dev/null || true; } |
        sed -n -e 's/[\\"]/\\&/g' -e 's/^credential\.\(.*\)\.helper$/\1/p'
}

git_credentials_cleanup() {
    if [ -n "${GIT_CREDENTIALS_DIR:-}" ]; then rm -rf -- "$GIT_CREDENTIALS_DIR"; fi
}
