#!/usr/bin/env bash
# Why this script exists: the web app's tests (tests/web) drive a real browser,
# and a fresh CI machine has none. This installs Debian's chromium and
# chromium-driver (the WebDriver server of the same version), and fonts for
# text and emoji (reactions) when missing, as
# root, without recommends; it is idempotent and takes ~0.1 s when both are
# there. Not part of install.sh: a newcomer who only runs up.sh does not need
# a 300 MB browser.
#
# Usage: deploy/local/install-browser.sh
# Prints the paths and versions it will use.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
source "$here/env.sh"
# shellcheck disable=SC2034 # read by lib.sh's log/warn/die
CHATFLEET_LOG_TAG=install-browser
# shellcheck source=lib.sh
source "$here/lib.sh"

have() { command -v chromium >/dev/null && command -v chromedriver >/dev/null && [[ -d /usr/share/fonts/truetype/dejavu && -d /usr/share/fonts/truetype/noto ]]; }

if ! have; then
  [[ $EUID -eq 0 ]] || die "chromium and chromium-driver are missing; install them (apt-get install chromium chromium-driver)"
  mkdir -p "$CHATFLEET_LOCAL"
  exec 9>"$CHATFLEET_LOCAL/install-browser.lock"
  if command -v flock >/dev/null; then
    flock -w 900 9 || die "another install-browser.sh holds the lock"
  fi
  if ! have; then
    export DEBIAN_FRONTEND=noninteractive
    log "apt-get install chromium chromium-driver"
    apt-get update -q
    apt-get install -y -q --no-install-recommends chromium chromium-driver fonts-dejavu-core fonts-noto-color-emoji
  fi
fi
have || die "chromium or chromedriver still missing after the install"
log "chromium: $(command -v chromium) ($(chromium --version 2>/dev/null | head -n 1))"
log "chromedriver: $(command -v chromedriver) ($(chromedriver --version 2>/dev/null | head -n 1))"
