#!/usr/bin/env bash
# Why this script exists: cargo-deny is the dependency gate (deny.toml:
# licenses, duplicate versions, sources, advisories). tests/run.sh calls
#
#   tests/deny.sh install   # cargo install cargo-deny $CARGO_DENY_VERSION once;
#                           # ~0.1 s when ~/.cargo/bin already has that version
#   tests/deny.sh check     # the gate
#
# Advisories: RustSec's database is a git repository on GitHub, and CI reaches
# only the package registries. `check` fetches it first; where that works,
# advisories are checked and fail the gate like the
# rest; where it cannot be fetched, the script says so and checks licenses,
# bans and sources only. CARGO_DENY_ADVISORIES=require makes an unreachable
# database an error (for machines that should reach it).
set -euo pipefail

CARGO_DENY_VERSION=0.20.2
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
say() { printf '[tests/deny.sh] %s\n' "$*"; }

install() {
  local have=""
  if command -v cargo-deny >/dev/null; then
    have="$(cargo-deny --version 2>/dev/null | awk '{print $2}')"
  fi
  if [[ "$have" == "$CARGO_DENY_VERSION" ]]; then
    say "cargo-deny $have already installed"
    return 0
  fi
  say "cargo install --locked cargo-deny@$CARGO_DENY_VERSION (have: ${have:-none})"
  # The crate's release profile asks for fat LTO and one codegen unit (a long
  # single-threaded final link); a gate does not need that speed. Measured on
  # this 2-core machine: 258 s of CPU with it, 218 s without (~2-4 min wall).
  CARGO_PROFILE_RELEASE_LTO=off CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
    cargo install --locked "cargo-deny@$CARGO_DENY_VERSION"
}

check() {
  command -v cargo-deny >/dev/null || { say "cargo-deny not found (tests/deny.sh install)"; exit 1; }
  local checks=(licenses bans sources)
  # Bounded: where outbound traffic is dropped rather than refused, git would
  # wait for its own (long) timeouts.
  if timeout 120 cargo deny fetch db; then
    checks+=(advisories)
  elif [[ "${CARGO_DENY_ADVISORIES:-}" == require ]]; then
    say "the advisory database cannot be fetched and CARGO_DENY_ADVISORIES=require"
    exit 1
  else
    say "the advisory database (github.com/rustsec/advisory-db) cannot be fetched from here:" \
      "advisories NOT checked; checking ${checks[*]}"
  fi
  cargo deny --log-level warn check "${checks[@]}"
}

case "${1:-}" in
  install) install ;;
  check) check ;;
  *)
    echo "usage: tests/deny.sh install|check" >&2
    exit 2
    ;;
esac
