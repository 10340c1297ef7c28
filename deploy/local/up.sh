#!/usr/bin/env bash
# Why this script exists: it is the one command a newcomer runs to get the
# whole of chatfleet running on this machine: the servers (stack.sh up), a
# build of the workspace, and the five services, each on its own loopback
# HTTP port, checked through GET /healthz. A service whose binary does not
# exist yet (its crate is still being written) is skipped with a warning; one
# that exists but is not healthy within SERVICE_HEALTH_TIMEOUT seconds fails
# the run. Stop everything with deploy/local/down.sh.
#
# Usage: deploy/local/up.sh
#   CHATFLEET_SKIP_BUILD=1   use the binaries already in target/debug
#   other knobs: see env.sh and docs/local-stack.md
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
source "$here/env.sh"
CHATFLEET_LOG_TAG=up
# shellcheck source=lib.sh
source "$here/lib.sh"

services=(chatpersistence chatpersistencechangehandler chatwebsocketshandler
  generalnotificationshandler emailhandler)

"$here/stack.sh" up
# stack.sh up ran install.sh: resolve binary paths again.
# shellcheck source=env.sh
source "$here/env.sh"

if ! command -v curl >/dev/null; then
  [[ $EUID -eq 0 ]] || die "curl is missing; install it (apt-get install curl)"
  log "installing curl"
  DEBIAN_FRONTEND=noninteractive apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q curl
fi

# Development secrets: random, made once, kept in $CHATFLEET_DEV_SECRETS.
if [[ ! -f "$CHATFLEET_DEV_SECRETS" ]]; then
  mkdir -p "$(dirname "$CHATFLEET_DEV_SECRETS")"
  umask 077
  {
    printf 'JWT_SECRET=%s\n' "$(head -c 32 /dev/urandom | base64 | tr -d '/+=\n')"
    printf 'INTERNAL_SERVICE_TOKEN=%s\n' "$(head -c 32 /dev/urandom | base64 | tr -d '/+=\n')"
  } >"$CHATFLEET_DEV_SECRETS"
  log "made development secrets in $CHATFLEET_DEV_SECRETS"
fi
# shellcheck source=env.sh
source "$here/env.sh"

cd "$CHATFLEET_ROOT"
if [[ "${CHATFLEET_SKIP_BUILD:-0}" != 1 ]]; then
  log "cargo build --workspace --bins"
  cargo build --workspace --bins
fi
target_dir="${CARGO_TARGET_DIR:-$CHATFLEET_ROOT/target}"
[[ "$target_dir" == /* ]] || target_dir="$CHATFLEET_ROOT/$target_dir"
bin_dir="$target_dir/debug"

port_of() {
  local var
  var="$(printf '%s' "$1" | tr '[:lower:]' '[:upper:]')_HTTP_PORT"
  printf '%s\n' "${!var}"
}
internal_port_of() {
  local var
  var="$(printf '%s' "$1" | tr '[:lower:]' '[:upper:]')_INTERNAL_PORT"
  printf '%s\n' "${!var}"
}
port_var_of() { printf '%s_HTTP_PORT\n' "$(printf '%s' "$1" | tr '[:lower:]' '[:upper:]')"; }
pidfile_of() { printf '%s/pids/%s.pid\n' "$STACK_DIR" "$1"; }
logfile_of() { printf '%s/logs/%s.log\n' "$STACK_DIR" "$1"; }
# The trailing space keeps chatpersistence from matching
# chatpersistencechangehandler (see markers in stack.sh).
marker_of() { printf '/%s \n' "$1"; }

export RUST_LOG="${RUST_LOG:-info}"

# Browsers reach the services through the edge only: its origin is the one
# allowed (requests without Origin, e.g. curl on the service ports, are not affected).
allowed_origins="${ALLOWED_ORIGINS:-http://127.0.0.1:$EDGE_HTTP_PORT,http://localhost:$EDGE_HTTP_PORT}"

declare -A state=()
for name in "${services[@]}"; do
  bin="$bin_dir/$name"
  if [[ ! -x "$bin" ]]; then
    warn "$name: no binary at $bin yet; skipping it"
    state[$name]="skipped (no binary)"
    continue
  fi
  if pid="$(running_pid "$(pidfile_of "$name")" "$(marker_of "$name")")"; then
    log "$name: already running (pid $pid)"
    continue
  fi
  rm -f "$(pidfile_of "$name")"
  port="$(port_of "$name")"
  ensure_port_free "$name" "$port" "$(port_var_of "$name")"
  ensure_port_free "$name" "$(internal_port_of "$name")" \
    "$(printf '%s' "$name" | tr '[:lower:]' '[:upper:]')_INTERNAL_PORT"
  HTTP_PORT="$port" INTERNAL_HTTP_PORT="$(internal_port_of "$name")" HTTP_HOST="$HTTP_HOST" \
    ALLOWED_ORIGINS="$allowed_origins" spawn "$(pidfile_of "$name")" "$(logfile_of "$name")" "$bin"
  log "$name: started (pid $(read_pid "$(pidfile_of "$name")"), port $port, log $(logfile_of "$name"))"
done

healthy() {
  [[ "$(curl -sS -o /dev/null --max-time 2 -w '%{http_code}' \
    "http://127.0.0.1:$1/healthz" 2>/dev/null)" == 200 ]]
}

failed=()
deadline=$(($(now_s) + SERVICE_HEALTH_TIMEOUT))
for name in "${services[@]}"; do
  [[ -n "${state[$name]:-}" ]] && continue
  port="$(port_of "$name")"
  while :; do
    if healthy "$port"; then
      state[$name]=healthy
      log "$name: healthy on http://127.0.0.1:$port"
      break
    fi
    why=""
    if ! running_pid "$(pidfile_of "$name")" "$(marker_of "$name")" >/dev/null; then
      why="exited"
    elif (($(now_s) >= deadline)); then
      why="GET /healthz did not answer 200 within ${SERVICE_HEALTH_TIMEOUT}s"
    fi
    if [[ -n "$why" ]]; then
      state[$name]="FAILED: $why"
      failed+=("$name")
      tail_log "$(logfile_of "$name")"
      warn "$name: $why (log: $(logfile_of "$name"))"
      stop_recorded "$name" "$(pidfile_of "$name")" "$(marker_of "$name")"
      break
    fi
    sleep 0.3
  done
done

printf '\n%-30s %-8s %-28s %s\n' SERVICE PID URL STATE
for name in "${services[@]}"; do
  pid="$(running_pid "$(pidfile_of "$name")" "$(marker_of "$name")" || echo -)"
  printf '%-30s %-8s %-28s %s\n' "$name" "$pid" "http://127.0.0.1:$(port_of "$name")" "${state[$name]:-}"
done
printf '\n%-30s %s\n' "Redis (REDIS_URL)" "$REDIS_URL"
printf '%-30s %s\n' "Kafka (KAFKA_BROKERS)" "$KAFKA_BROKERS"
printf '%-30s %s\n' "MongoDB (MONGODB_URI)" "$MONGODB_URI"
printf '%-30s %s\n' "SMTP sink (SMTP_HOST:PORT)" "$SMTP_HOST:$SMTP_PORT, mail in $SMTP_MAIL_DIR"
printf '%-30s %s\n\n' "Logs and pids" "$STACK_DIR/{logs,pids}"

if ((${#failed[@]} > 0)); then
  die "not healthy: ${failed[*]}; the others keep running, stop all with $here/down.sh"
fi
"$here/edge.sh" up
log "all built services are healthy; stop everything with $here/down.sh"
log "try it: TOKEN=\$($here/token.sh alice) and see docs/api.md"

# Sign-in links: a development token in the URL fragment, which the browser
# never sends to a server (so it is in no access log); the app keeps it in the
# tab's sessionStorage and removes it from the address bar.
edge_url="http://127.0.0.1:$EDGE_HTTP_PORT/"
printf '\nOpen the web app (one link per user, e.g. one in a private window):\n'
for user in ${CHATFLEET_DEMO_USERS:-alice bob}; do
  printf '  %-8s %s#token=%s\n' "$user" "$edge_url" "$("$here/token.sh" "$user" "${CHATFLEET_LINK_TTL:-43200}")"
done
printf '\n'
printf '%s\n' "$edge_url" >"$STACK_DIR/edge-url"
