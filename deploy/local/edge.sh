#!/usr/bin/env bash
# Why this script exists: in production every browser request goes through one
# origin (Envoy or nginx) that routes public paths only and hashes sockets by
# stream id and user id. The local stack should look the same to a browser, or
# the web app would work locally and break behind the real edge (origins,
# internal paths, hashing). This runs Debian's nginx with the production
# template (deploy/nginx/chatfleet.conf.template, rendered by
# deploy/nginx/render.sh for the local services, one pod each) plus the web app
# (web/) at /, as a process of our own on loopback. up.sh and down.sh call it.
#
# Usage: deploy/local/edge.sh up | down | status
#   EDGE_HTTP_PORT (8000)      the public listener: the web app, the API, the sockets
#   EDGE_INTERNAL_PORT (9000)  the internal listener (bound to 127.0.0.1; unused locally)
# Layout: $STACK_DIR/edge/{nginx.conf,chatfleet.conf,run/}, $STACK_DIR/pids/edge.pid,
# $STACK_DIR/logs/edge.log (nginx's error log) and edge-access.log (no query strings).
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
source "$here/env.sh"
CHATFLEET_LOG_TAG=edge
# shellcheck source=lib.sh
source "$here/lib.sh"

edge_dir="$STACK_DIR/edge"
pidfile="$STACK_DIR/pids/edge.pid"
logfile="$STACK_DIR/logs/edge.log"
# The master's command line names its configuration: that is how a recorded pid
# is known to still be our nginx.
marker="$edge_dir/nginx.conf"

nginx_bin() {
  command -v nginx 2>/dev/null || { [[ -x /usr/sbin/nginx ]] && echo /usr/sbin/nginx; }
}

install_nginx() {
  [[ -n "$(nginx_bin)" ]] && return 0
  [[ $EUID -eq 0 ]] || die "nginx is missing; install it (apt-get install nginx)"
  log "installing nginx (Debian)"
  export DEBIAN_FRONTEND=noninteractive
  local policy=/usr/sbin/policy-rc.d made=0
  # Debian's postinst would start its own nginx on port 80: forbid service starts
  # for the time of the install (only if the machine has no policy already).
  if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\n# temporary, from chatfleet deploy/local/edge.sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    made=1
  fi
  apt-get update -q
  apt-get install -y -q nginx
  if ((made)); then rm -f "$policy"; fi
  [[ -n "$(nginx_bin)" ]] || die "nginx did not install"
}

render() {
  local up=$1
  mkdir -p "$edge_dir" "$STACK_DIR/logs" "$STACK_DIR/pids"
  # A fresh run dir: the relays' unix sockets must not exist when nginx starts.
  rm -rf "$edge_dir/run"
  mkdir -p "$edge_dir/run" "$edge_dir/tmp"
  "$CHATFLEET_ROOT/deploy/nginx/render.sh" \
    --public-listen "$HTTP_HOST:$EDGE_HTTP_PORT" \
    --internal-listen "127.0.0.1:$EDGE_INTERNAL_PORT" \
    --run-dir "$edge_dir/run" \
    --access-log "$STACK_DIR/logs/edge-access.log" \
    --web-root "$CHATFLEET_ROOT/web" \
    --persistence "127.0.0.1:$CHATPERSISTENCE_HTTP_PORT:$CHATPERSISTENCE_INTERNAL_PORT" \
    --chat "chat-0=127.0.0.1:$CHATWEBSOCKETSHANDLER_HTTP_PORT:$CHATWEBSOCKETSHANDLER_INTERNAL_PORT" \
    --notifications "notify-0=127.0.0.1:$GENERALNOTIFICATIONSHANDLER_HTTP_PORT:$GENERALNOTIFICATIONSHANDLER_INTERNAL_PORT" \
    >"$edge_dir/chatfleet.conf"
  # As root nginx would run its workers as nobody, who may not read the checkout.
  local user=""
  [[ $EUID -eq 0 ]] && user="user root root;"
  cat >"$edge_dir/nginx.conf" <<EOF
# Made by deploy/local/edge.sh; do not edit (it is rewritten at every start).
$user
daemon off;
pid $edge_dir/nginx.pid;
error_log $logfile warn;
worker_processes 1;
events { worker_connections 1024; }
http {
  types {
    text/html html;
    text/javascript js mjs;
    text/css css;
    application/json json;
    image/png png;
    image/svg+xml svg;
    text/plain txt ts;
  }
  default_type application/octet-stream;
  sendfile on;
  server_tokens off;
  client_body_temp_path $edge_dir/tmp/body;
  proxy_temp_path $edge_dir/tmp/proxy;
  fastcgi_temp_path $edge_dir/tmp/fastcgi;
  uwsgi_temp_path $edge_dir/tmp/uwsgi;
  scgi_temp_path $edge_dir/tmp/scgi;
  include $edge_dir/chatfleet.conf;
}
EOF
  "$up" -e "$logfile" -t -q -c "$edge_dir/nginx.conf" || die "nginx refused $edge_dir/nginx.conf"
}

up() {
  install_nginx
  local bin pid i
  bin="$(nginx_bin)"
  if pid="$(running_pid "$pidfile" "$marker")"; then
    log "edge: already running (pid $pid) on http://$HTTP_HOST:$EDGE_HTTP_PORT/"
    return 0
  fi
  rm -f "$pidfile"
  ensure_port_free edge "$EDGE_HTTP_PORT" EDGE_HTTP_PORT
  ensure_port_free edge "$EDGE_INTERNAL_PORT" EDGE_INTERNAL_PORT
  render "$bin"
  spawn "$pidfile" "$logfile.out" "$bin" -e "$logfile" -c "$edge_dir/nginx.conf"
  local code=""
  for ((i = 0; i < 200; i++)); do
    code="$(curl -sS -o /dev/null --max-time 2 -w '%{http_code}' "http://127.0.0.1:$EDGE_HTTP_PORT/" 2>&1)" || true
    if [[ "$code" == 200 ]]; then
      log "edge: nginx (pid $(read_pid "$pidfile")) on http://$HTTP_HOST:$EDGE_HTTP_PORT/ (log $logfile)"
      return 0
    fi
    running_pid "$pidfile" "$marker" >/dev/null || break
    sleep 0.1
  done
  tail_log "$logfile" "$logfile.out"
  stop_recorded edge "$pidfile" "$marker"
  die "edge: nginx did not serve http://127.0.0.1:$EDGE_HTTP_PORT/ (last answer: ${code:-none})"
}

case "${1:-}" in
  up) up ;;
  down) stop_recorded edge "$pidfile" "$marker" ;;
  status) running_pid "$pidfile" "$marker" >/dev/null || exit 3 ;;
  *)
    sed -n '/^# Usage:/,/^# Layout/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
