#!/usr/bin/env bash
# Why this script exists: production captures chat messages with Debezium, and the
# connector configuration must reach Kafka Connect the same way every time, from
# the reviewed file next to this script, never typed by hand. It renders each
# debezium/*-connector.json with the deployment's values, creates or updates the
# connector (PUT /connectors/<name>/config is idempotent), and prints its status.
#
# Usage:
#   MONGODB_CONNECTION_STRING='mongodb://user:pass@m1:27017,m2:27017/?replicaSet=rs0&authSource=admin' \
#     debezium/register.sh [--dry-run] [connector.json ...]
#
# Environment (defaults in brackets):
#   CONNECT_URL                 Kafka Connect REST API [http://localhost:8083]
#   CONNECT_WAIT_SECONDS        how long to wait for Connect to answer [120]
#   CONNECT_STATUS_SECONDS      how long to wait for the connector to run [60]
#   MONGODB_CONNECTION_STRING   replica set connection string (required). To keep
#                               credentials out of Connect's config topic, pass a
#                               config-provider reference instead, for example
#                               '${env:MONGODB_CONNECTION_STRING}' (needs the
#                               worker's EnvVarConfigProvider); ${provider:...}
#                               references are passed through untouched.
#   MONGODB_DATABASE            [chat]
#   MONGODB_MESSAGES_COLLECTION [messages]
#   CHAT_CHANGES_TOPIC          [chat.changes]
#   KAFKA_TOPIC_PARTITIONS      partitions if Connect has to create the topic [6]
#   DEBEZIUM_TOPIC_PREFIX       Debezium's logical name (topic.prefix) [chatfleet]
#
# --dry-run prints the rendered configuration instead of sending it.
# Exit status: 0 when every connector is RUNNING, 1 otherwise.
#
# Needs only bash and curl (no jq, nothing installed at run time), so it runs
# as-is in the Debezium Connect image, as that image's non-root user, with a
# read-only root filesystem (temporary files go to $TMPDIR or /tmp).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

CONNECT_URL="${CONNECT_URL:-http://localhost:8083}"
CONNECT_URL="${CONNECT_URL%/}"
CONNECT_WAIT_SECONDS="${CONNECT_WAIT_SECONDS:-120}"
CONNECT_STATUS_SECONDS="${CONNECT_STATUS_SECONDS:-60}"
MONGODB_DATABASE="${MONGODB_DATABASE:-chat}"
MONGODB_MESSAGES_COLLECTION="${MONGODB_MESSAGES_COLLECTION:-messages}"
CHAT_CHANGES_TOPIC="${CHAT_CHANGES_TOPIC:-chat.changes}"
KAFKA_TOPIC_PARTITIONS="${KAFKA_TOPIC_PARTITIONS:-6}"
DEBEZIUM_TOPIC_PREFIX="${DEBEZIUM_TOPIC_PREFIX:-chatfleet}"

say() { printf '[debezium/register.sh] %s\n' "$*" >&2; }
die() {
  say "error: $*"
  exit 1
}

dry_run=false
files=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=true ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    -*) die "unknown option $arg (try --help)" ;;
    *) files+=("$arg") ;;
  esac
done
if [[ ${#files[@]} -eq 0 ]]; then
  for file in "$here"/*-connector.json; do
    [[ -e "$file" ]] && files+=("$file")
  done
fi
[[ ${#files[@]} -gt 0 ]] || die "no connector files found in $here"

if ! $dry_run; then
  command -v curl >/dev/null || die "curl is required"
fi
[[ -n "${MONGODB_CONNECTION_STRING:-}" ]] || die "MONGODB_CONNECTION_STRING must be set (a replica set connection string)"
[[ "$KAFKA_TOPIC_PARTITIONS" =~ ^[1-9][0-9]*$ ]] || die "KAFKA_TOPIC_PARTITIONS must be a positive integer"

# regex_escape TEXT: TEXT with Java regex metacharacters escaped.
regex_escape() {
  printf '%s' "$1" | sed 's/[][\\.^$|?*+(){}]/\\&/g'
}

# json_escape TEXT: TEXT as the inside of a JSON string (backslash, quote and
# the control characters a connection string could carry; others refused).
json_escape() {
  local s=$1
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  s=${s//$'\n'/\\n}
  s=${s//$'\r'/\\r}
  s=${s//$'\t'/\\t}
  [[ "$s" != *[[:cntrl:]]* ]] || die "a value contains a control character"
  printf '%s' "$s"
}

# The placeholders a template may use, and their values.
declare -A values=(
  [MONGODB_CONNECTION_STRING]="$MONGODB_CONNECTION_STRING"
  [MONGODB_DATABASE]="$MONGODB_DATABASE"
  [MONGODB_MESSAGES_COLLECTION]="$MONGODB_MESSAGES_COLLECTION"
  [CHAT_CHANGES_TOPIC]="$CHAT_CHANGES_TOPIC"
  [KAFKA_TOPIC_PARTITIONS]="$KAFKA_TOPIC_PARTITIONS"
  [DEBEZIUM_TOPIC_PREFIX]="$DEBEZIUM_TOPIC_PREFIX"
  [MONGODB_DATABASE_RE]="$(regex_escape "$MONGODB_DATABASE")"
  [MONGODB_MESSAGES_COLLECTION_RE]="$(regex_escape "$MONGODB_MESSAGES_COLLECTION")"
  [CHAT_CHANGES_TOPIC_RE]="$(regex_escape "$CHAT_CHANGES_TOPIC")"
  [DEBEZIUM_TOPIC_PREFIX_RE]="$(regex_escape "$DEBEZIUM_TOPIC_PREFIX")"
)

# render FILE: the connector file with every ${NAME} placeholder replaced by its
# value (JSON-escaped, so any connection string is safe); checks the result has
# the form {"name": "...", "config": {...}} (config last) and that no
# placeholder is left. Kafka Connect parses the JSON itself and answers 400 to
# anything malformed.
render() {
  local text name escaped
  text="$(<"$1")"
  for name in "${!values[@]}"; do
    escaped="$(json_escape "${values[$name]}")"
    # Quoted replacement: taken literally (no & or backslash processing).
    text="${text//"\${$name}"/"$escaped"}"
  done
  if grep -Eo '\$\{[A-Z_][A-Z0-9_]*\}' <<<"$text" | sort -u | grep -q .; then
    die "$1: unknown placeholders: $(grep -Eo '\$\{[A-Z_][A-Z0-9_]*\}' <<<"$text" | sort -u | tr '\n' ' ')"
  fi
  [[ "$text" =~ ^[[:space:]]*\{[[:space:]]*\"name\"[[:space:]]*:[[:space:]]*\"[A-Za-z0-9._-]+\"[[:space:]]*,[[:space:]]*\"config\"[[:space:]]*:[[:space:]]*\{.*\}[[:space:]]*\}[[:space:]]*$ ]] ||
    die "$1: not a {\"name\": \"...\", \"config\": {...}} document (name first, config last)"
  printf '%s\n' "$text"
}

# connector_name RENDERED: the value of the top-level "name".
connector_name() {
  [[ "$1" =~ ^[[:space:]]*\{[[:space:]]*\"name\"[[:space:]]*:[[:space:]]*\"([A-Za-z0-9._-]+)\" ]] || die "no connector name"
  printf '%s' "${BASH_REMATCH[1]}"
}

# connector_config RENDERED: the top-level "config" object, as text.
connector_config() {
  local rest=${1#*\"config\"}
  rest=${rest#*:}
  rest=${rest%\}*}
  printf '%s' "$rest"
}

# states STATUS_JSON: every "state" value of a connector status, connector first.
states() {
  grep -Eo '"state"[[:space:]]*:[[:space:]]*"[A-Z_]+"' <<<"$1" | sed -E 's/.*"([A-Z_]+)"$/\1/' || true
}

wait_for_connect() {
  local deadline=$((SECONDS + CONNECT_WAIT_SECONDS))
  say "waiting for Kafka Connect at $CONNECT_URL (up to ${CONNECT_WAIT_SECONDS}s)"
  until curl -fsS --max-time 5 "$CONNECT_URL/" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "Kafka Connect did not answer at $CONNECT_URL within ${CONNECT_WAIT_SECONDS}s"
    sleep 2
  done
  say "Kafka Connect is up: $(curl -fsS --max-time 5 "$CONNECT_URL/" 2>/dev/null || echo '?')"
}

# register NAME CONFIG_JSON: create or update the connector.
register() {
  local name=$1 config=$2 response status
  response="$(mktemp)"
  status="$(curl -sS --max-time 30 -o "$response" -w '%{http_code}' -X PUT \
    -H 'Content-Type: application/json' --data "$config" "$CONNECT_URL/connectors/$name/config")" || {
    rm -f "$response"
    die "PUT /connectors/$name/config failed to connect"
  }
  case "$status" in
    200) say "$name: configuration updated" ;;
    201) say "$name: connector created" ;;
    *)
      say "$name: Kafka Connect answered $status:"
      cat "$response" >&2
      echo >&2
      rm -f "$response"
      return 1
      ;;
  esac
  rm -f "$response"
}

# await_running NAME: wait until the connector and all its tasks run; print status.
await_running() {
  local name=$1 deadline=$((SECONDS + CONNECT_STATUS_SECONDS)) status state all
  while :; do
    status="$(curl -fsS --max-time 10 "$CONNECT_URL/connectors/$name/status" 2>/dev/null || echo '{}')"
    # The connector's state, then each task's: RUNNING when there is at least
    # one task and all are RUNNING, FAILED when any failed.
    mapfile -t all < <(states "$status")
    if ((${#all[@]} > 1)) && ! printf '%s\n' "${all[@]}" | grep -qv '^RUNNING$'; then
      state=RUNNING
    elif printf '%s\n' "${all[@]}" | grep -qx FAILED; then
      state=FAILED
    else
      state=PENDING
    fi
    if [[ "$state" != "PENDING" ]] || ((SECONDS >= deadline)); then
      break
    fi
    sleep 2
  done
  printf '%s\n' "$status"
  if [[ "$state" == "RUNNING" ]]; then
    say "$name: RUNNING"
    return 0
  fi
  say "$name: not running ($state); see the trace above and Connect's log"
  return 1
}

$dry_run || wait_for_connect

failed=0
for file in "${files[@]}"; do
  rendered="$(render "$file")"
  name="$(connector_name "$rendered")"
  config="$(connector_config "$rendered")"
  if $dry_run; then
    say "$name (from $file), rendered:"
    printf '%s\n' "$rendered"
    continue
  fi
  if register "$name" "$config" && await_running "$name"; then
    :
  else
    failed=1
  fi
done
exit "$failed"
