# shellcheck shell=bash
# Shared helpers for the scripts in scripts/ and .ci/. Source it; do not run it.
#
#   . "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"
#
# Sets REPO_ROOT and cds there, so every script works from any cwd.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export REPO_ROOT
cd "$REPO_ROOT" || exit 1

# The scripts always build from the local, debootstrap-made base image (never pulled).
IPYBOX_LOCAL_BASE_IMAGE="ipybox/debian-base:bookworm"
export IPYBOX_BASE_IMAGE="$IPYBOX_LOCAL_BASE_IMAGE"

VENV="$REPO_ROOT/.venv"

# log MESSAGE... -- one short progress line on stderr (stdout stays for results).
log() {
    printf 'ipybox: %s\n' "$*" >&2
}

die() {
    printf 'ipybox: error: %s\n' "$*" >&2
    exit 1
}

is_root() {
    [[ $(id -u) -eq 0 ]]
}

is_debian() {
    [[ -f /etc/debian_version ]]
}

# run_logged LOGFILE CMD... -- run CMD with its output in LOGFILE; on failure show the
# tail of the log and return CMD's exit code.
run_logged() {
    local logfile=$1 rc=0
    shift
    "$@" >"$logfile" 2>&1 || rc=$?
    if ((rc != 0)); then
        log "command failed (exit $rc): $*"
        tail -n 40 "$logfile" | sed 's/^/  | /' >&2
        log "full log: $logfile"
    fi
    return "$rc"
}

# apt_install PKG... -- root + Debian only; runs apt-get update only when needed.
apt_install() {
    local logfile=/var/log/ipybox-apt.log
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends "$@" >"$logfile" 2>&1; then
        run_logged "$logfile" apt-get update -q || return
        run_logged "$logfile" apt-get install -y -q --no-install-recommends "$@" || return
    fi
}

# ensure_venv -- create .venv if missing/broken and (re)install the package with the
# dev extra. The editable install is redone whenever pyproject.toml changed (new
# dependencies land); set IPYBOX_REINSTALL=1 to force it.
ensure_venv() {
    local stamp="$VENV/.ipybox-install-stamp" want have=""
    if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
        log "creating virtualenv $VENV"
        rm -rf "$VENV"
        python3 -m venv "$VENV" || die "python3 -m venv failed (on Debian: apt-get install -y python3-venv)"
    fi
    want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
    [[ -f "$stamp" ]] && have="$(cat "$stamp")"
    if [[ "${IPYBOX_REINSTALL:-0}" != 1 && "$want" == "$have" && -x "$VENV/bin/ipybox" ]]; then
        return 0
    fi
    log "installing ipybox (editable, with dev extra) into .venv"
    rm -f "$stamp"
    run_logged "$VENV/pip-install.log" \
        "$VENV/bin/python" -m pip install --disable-pip-version-check -q -e '.[dev]' ||
        die "pip install -e '.[dev]' failed"
    printf '%s\n' "$want" >"$stamp"
}

# Engine handling for scripts that need Docker. Usage:
#   trap engine_cleanup EXIT
#   engine_ensure
# engine_ensure starts the engine if needed; engine_cleanup stops it only if
# engine_ensure started it, and keeps the script's exit status.
IPYBOX_ENGINE_STARTED_BY_US=0

engine_ensure() {
    local out
    out="$("$REPO_ROOT/scripts/engine" start)" || die "no Docker engine available (see messages above)"
    # Contract of `scripts/engine start`: last stdout line is `started` or `running`.
    if [[ "${out##*$'\n'}" == started ]]; then
        IPYBOX_ENGINE_STARTED_BY_US=1
    fi
}

engine_cleanup() {
    local rc=$?
    if ((IPYBOX_ENGINE_STARTED_BY_US == 1)); then
        IPYBOX_ENGINE_STARTED_BY_US=0
        "$REPO_ROOT/scripts/engine" stop >/dev/null || log "warning: could not stop the Docker engine we started"
    fi
    exit "$rc"
}

# Make Ctrl-C / SIGTERM go through the EXIT trap with a conventional status.
trap 'exit 130' INT
trap 'exit 143' TERM

# ensure_debootstrap -- the image build makes the base image with debootstrap when it
# is missing; install debootstrap up front (root + Debian) so the build need not.
ensure_debootstrap() {
    if command -v debootstrap >/dev/null 2>&1; then
        return 0
    fi
    if docker image inspect "$IPYBOX_LOCAL_BASE_IMAGE" >/dev/null 2>&1; then
        return 0
    fi
    if is_root && is_debian; then
        log "installing debootstrap (needed to create $IPYBOX_LOCAL_BASE_IMAGE)"
        apt_install debootstrap || die "apt-get install debootstrap failed"
    fi
}

# ensure_docker_registry -- the pull tests run a local registry server (Debian package
# docker-registry, /usr/bin/docker-registry); install it when missing (root + Debian).
ensure_docker_registry() {
    if [[ -x /usr/bin/docker-registry ]]; then
        return 0
    fi
    if is_root && is_debian; then
        log "installing docker-registry (a local registry server for the pull tests)"
        apt_install docker-registry || die "apt-get install docker-registry failed"
    fi
}
