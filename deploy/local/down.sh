#!/usr/bin/env bash
# Why this script exists: it undoes up.sh. It stops the edge, the five services, then
# the servers (stack.sh down), and in both cases only the processes whose
# pids up.sh/stack.sh recorded under $STACK_DIR/pids and that are still those
# processes; nothing else on the machine is signalled.
#
# Usage: deploy/local/down.sh
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
source "$here/env.sh"
CHATFLEET_LOG_TAG=down
# shellcheck source=lib.sh
source "$here/lib.sh"

# Reverse start order: consumers first, the persistence API last.
services=(emailhandler generalnotificationshandler chatwebsocketshandler
  chatpersistencechangehandler chatpersistence)

"$here/edge.sh" down

for name in "${services[@]}"; do
  pidfile="$STACK_DIR/pids/$name.pid"
  [[ -f "$pidfile" ]] || continue
  stop_recorded "$name" "$pidfile" "/$name "
done

"$here/stack.sh" down
