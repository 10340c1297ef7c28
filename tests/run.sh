#!/usr/bin/env bash
# Why this script exists: it is the repo's one test command; CI's .ci/run
# execs it on a fresh Debian 12 clone, and a developer runs the same thing.
# It installs the servers the integration tests need (deploy/local/install.sh:
# redis-server, tansu, nx-27017, the SMTP sink), exports their paths, builds
# the workspace and runs the tests (then the web phase: tests/web/run.sh starts
# its own isolated stack and a browser). It does not start the stack: the Rust
# tests spawn their own isolated servers on free ports from these binaries:
#
#   TANSU_BIN NX27017_BIN REDIS_SERVER_BIN SMTP_SINK PYTHON_BIN
#
# Usage: tests/run.sh [extra args for cargo nextest run / cargo test]
# Prints the time of each phase; exits non-zero when a phase fails.
# shellcheck source-path=SCRIPTDIR/..
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=deploy/local/env.sh
source "$root/deploy/local/env.sh"

say() { printf '[tests/run.sh] %s\n' "$*"; }

run_start=$(date +%s)
phases=()
# phase NAME CMD...: run CMD, print and record its time; stop on failure.
phase() {
  local name=$1 start rc secs
  shift
  say "=== $name: $*"
  start=$(date +%s)
  if "$@"; then rc=0; else rc=$?; fi
  secs=$(($(date +%s) - start))
  phases+=("$(printf '%-8s %5ss  %s' "$name" "$secs" "$([[ $rc -eq 0 ]] && echo ok || echo "FAILED (exit $rc)")")")
  say "=== $name: $([[ $rc -eq 0 ]] && echo ok || echo "FAILED (exit $rc)") in ${secs}s"
  return "$rc"
}
summary() {
  local rc=$? line
  say "phase times:"
  for line in "${phases[@]}"; do say "  $line"; done
  say "total $(($(date +%s) - run_start))s, exit $rc"
}
trap summary EXIT

if ! command -v cargo >/dev/null && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
  PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null || { say "cargo not found (install Rust with rustup)"; exit 1; }

phase install "$root/deploy/local/install.sh"
phase deploy-tools "$root/deploy/check/install.sh" --with-apt
phase deny-tool "$root/tests/deny.sh" install
# Binary paths that did not exist before the install resolve now.
# shellcheck source=deploy/local/env.sh
source "$root/deploy/local/env.sh"
export TANSU_BIN NX27017_BIN REDIS_SERVER_BIN SMTP_SINK PYTHON_BIN
for var in TANSU_BIN NX27017_BIN REDIS_SERVER_BIN SMTP_SINK PYTHON_BIN; do
  say "$var=${!var}"
done

if command -v cargo-nextest >/dev/null; then
  runner=(cargo nextest run --workspace --no-fail-fast)
else
  say "cargo-nextest not found; falling back to cargo test"
  runner=(cargo test --workspace --no-fail-fast)
fi

# A fresh CI build never reuses incremental state; writing it only costs disk.
if [[ "${CI:-}" == true ]]; then export CARGO_INCREMENTAL=0; fi
say "disk free: $(df -h "$root" | awk 'NR==2 {print $4}')"

# The gates CI enforces before any test runs: formatting and lints.
phase fmt cargo fmt --all -- --check
phase clippy cargo clippy --workspace --all-targets -- -D warnings
# Dependencies: licenses, duplicate versions, sources (and advisories where
# RustSec's database can be fetched): deny.toml, tests/deny.sh.
phase deny "$root/tests/deny.sh" check
phase build cargo build --workspace --all-targets
phase test "${runner[@]}" "$@"
# The JavaScript SDK and the web app against an isolated local stack behind the
# local edge, in Debian's chromium (installs it); CHATFLEET_WEB_TESTS=0 skips it.
if [[ "${CHATFLEET_WEB_TESTS:-1}" != 0 ]]; then
  phase web "$root/tests/web/run.sh"
fi
