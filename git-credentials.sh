# shellcheck shell=sh disable=SC2034  # sourced: sets variables for the caller
# Git credentials that never reach a command line, a log or a repository's config (POSIX sh).
# Sourced by run-commands.sh and dvc_pull.sh:
#
#     . ./git-credentials.sh
#     split_login "https://user:token"        # or "user:token" → $login_user, $login_token
#     split_url "https://user:token@host/org/repo.git"  # → $url_clean, $url_origin, $url_user, $url_token
#     git_credentials "$url_origin" "$login_user" "$login_token"   # exports GIT_CONFIG_GLOBAL
#     ...; git_credentials_cleanup                                   # in an EXIT trap
#
# The credential lives in a private directory (mktemp -d, umask 077) with a helper script answering
# git's "get" for that origin only (gitcredentials(7)). GIT_CONFIG_GLOBAL points at a config holding
# only the helper (plus an include of the user's own config), so git and DVC (dulwich reads the same
# file) find it while ~/.gitconfig and every .git/config stay untouched. printf is a shell builtin:
# the token is never in the argv of any process.

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
    {
        # Keep the user's own settings (proxies, URL rewrites) when running outside the image.
        _user_config=${GIT_CONFIG_GLOBAL:-${HOME:-/nonexistent}/.gitconfig}
        if [ -f "$_user_config" ]; then printf '[include]\n\tpath = %s\n' "$_user_config"; fi
        printf '[credential "%s"]\n\thelper = !'"'"'%s'"'"'\n' "$1" "$GIT_CREDENTIALS_DIR/helper"
    } >"$GIT_CREDENTIALS_DIR/gitconfig"
    GIT_CONFIG_GLOBAL=$GIT_CREDENTIALS_DIR/gitconfig
    export GIT_CONFIG_GLOBAL
    umask "$_umask"
}

git_credentials_cleanup() {
    if [ -n "${GIT_CREDENTIALS_DIR:-}" ]; then rm -rf -- "$GIT_CREDENTIALS_DIR"; fi
}
