#!/usr/bin/env bash
# Why this script exists: the JavaScript SDK and the web app are only proven
# when they run against the real fleet, through the same edge as production,
# in a real browser. This is the test command's "web" phase: it starts an
# isolated copy of the local stack with deploy/local/up.sh (its own STACK_DIR,
# secrets and free ports, so it never touches a developer's stack or another
# test run), runs the SDK's unit tests with Node's test runner against its
# edge, installs Debian's chromium and chromium-driver
# (deploy/local/install-browser.sh) and runs the two-browser scenarios
# (tests/web/browser.test.mjs). It always stops what it started.
#
# Usage: tests/web/run.sh            # everything
#        tests/web/run.sh --sdk-only # the SDK's tests only (no browser)
#        tests/web/run.sh --keep     # leave the stack running afterwards (prints how to stop it)
#        tests/web/run.sh --stack-only  # only start the isolated stack and keep it (for debugging)
# Screenshots and, on failure, the stack's logs land in
# $WEB_TEST_ARTIFACTS (default target/web-test).
# shellcheck source-path=SCRIPTDIR/../..
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
say() { printf '[tests/web] %s\n' "$*"; }

sdk_only=0
keep=0
stack_only=0
for arg in "$@"; do
  case "$arg" in
    --sdk-only) sdk_only=1 ;;
    --keep) keep=1 ;;
    --stack-only) stack_only=1; keep=1 ;;
    *) say "unknown argument: $arg"; exit 2 ;;
  esac
done

if ! command -v node >/dev/null && [[ $EUID -eq 0 ]]; then
  say "installing nodejs (Debian)"
  DEBIAN_FRONTEND=noninteractive apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nodejs
fi
command -v node >/dev/null || { say "node is missing (apt-get install nodejs)"; exit 1; }
node_major="$(node -p 'process.versions.node.split(".")[0]')"
# 20: the test runner's options and WebSocket (--experimental-websocket) in Node.
((node_major >= 20)) || { say "node $node_major is too old (20 or newer: https://nodejs.org or NodeSource)"; exit 1; }

: "${WEB_TEST_ARTIFACTS:=$root/target/web-test}"
mkdir -p "$WEB_TEST_ARTIFACTS"
export WEB_TEST_ARTIFACTS

work="$(mktemp -d /tmp/chatfleet-web.XXXXXX)"
# An isolated stack: nothing shared with deploy/local's defaults but the binaries.
unset JWT_SECRET INTERNAL_SERVICE_TOKEN ALLOWED_ORIGINS
export STACK_DIR="$work/stack" CHATFLEET_DEV_SECRETS="$work/dev-secrets.env"

# free_port: a loopback port nobody listens on, from a range the kernel does not
# hand out as ephemeral ports (so a test's client sockets cannot take it).
taken=" "
free_port() {
  local port i
  for ((i = 0; i < 200; i++)); do
    port=$((20000 + RANDOM % 12000))
    [[ "$taken" == *" $port "* ]] && continue
    # shellcheck disable=SC2016 # $1 is expanded by the inner bash
    if ! timeout 1 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$port" 2>/dev/null; then
      taken+="$port "
      printf '%s\n' "$port"
      return 0
    fi
  done
  return 1
}
port_vars="REDIS_PORT KAFKA_PORT MONGO_PORT SMTP_PORT
  CHATPERSISTENCE_HTTP_PORT CHATPERSISTENCECHANGEHANDLER_HTTP_PORT CHATWEBSOCKETSHANDLER_HTTP_PORT
  GENERALNOTIFICATIONSHANDLER_HTTP_PORT EMAILHANDLER_HTTP_PORT
  CHATPERSISTENCE_INTERNAL_PORT CHATPERSISTENCECHANGEHANDLER_INTERNAL_PORT
  CHATWEBSOCKETSHANDLER_INTERNAL_PORT GENERALNOTIFICATIONSHANDLER_INTERNAL_PORT
  EMAILHANDLER_INTERNAL_PORT EDGE_HTTP_PORT EDGE_INTERNAL_PORT"
for var in $port_vars; do
  port="$(free_port)" || { say "no free port for $var"; exit 1; }
  export "$var=$port"
done
# shellcheck source=deploy/local/env.sh
source "$root/deploy/local/env.sh"

target_dir="${CARGO_TARGET_DIR:-$root/target}"
[[ "$target_dir" == /* ]] || target_dir="$root/$target_dir"
if [[ -x "$target_dir/debug/chatpersistence" && -x "$target_dir/debug/chatwebsocketshandler" ]]; then
  export CHATFLEET_SKIP_BUILD=1
fi

finish() {
  local rc=$?
  if ((rc != 0)); then
    mkdir -p "$WEB_TEST_ARTIFACTS/logs"
    cp -r "$STACK_DIR/logs/." "$WEB_TEST_ARTIFACTS/logs/" 2>/dev/null || true
    say "FAILED (exit $rc); the stack's logs are in $WEB_TEST_ARTIFACTS/logs"
  fi
  if ((keep)); then
    say "stack kept: STACK_DIR=$STACK_DIR; stop it with: (source $work/env && $root/deploy/local/down.sh)"
    return
  fi
  "$root/deploy/local/down.sh" >"$work/down.log" 2>&1 || cat "$work/down.log" >&2
  rm -rf "$work"
}
trap finish EXIT

say "starting an isolated stack (STACK_DIR=$STACK_DIR, edge on 127.0.0.1:$EDGE_HTTP_PORT)"
if ! "$root/deploy/local/up.sh" >"$work/up.log" 2>&1; then
  tail -n 60 "$work/up.log" >&2
  exit 1
fi
grep -q "#token=" "$work/up.log" || { say "up.sh printed no sign-in link"; tail -n 30 "$work/up.log"; exit 1; }

export CHATFLEET_EDGE_URL="http://127.0.0.1:$EDGE_HTTP_PORT"
# What the tests need to make tokens, kill and restart services, and write domain
# documents; kept in $work/env for --stack-only (source it to use that stack).
export CHATFLEET_ROOT STACK_DIR CHATFLEET_DEV_SECRETS
for var in $port_vars CHATFLEET_EDGE_URL STACK_DIR CHATFLEET_DEV_SECRETS CHATFLEET_ROOT; do
  printf 'export %s=%q\n' "$var" "${!var}"
done >"$work/env"

if ((stack_only)); then
  grep "#token=" "$work/up.log"
  say "use it: source $work/env; stop it: (source $work/env && deploy/local/down.sh)"
  exit 0
fi

say "SDK tests (node --test clients/js/test)"
node --experimental-websocket --test --test-concurrency=1 clients/js/test/*.test.mjs

((sdk_only)) && exit 0

"$root/deploy/local/install-browser.sh"
say "browser tests (node --test tests/web)"
node --test --test-concurrency=1 tests/web/*.test.mjs
say "screenshots in $WEB_TEST_ARTIFACTS"
