#!/usr/bin/env bash
# Why this script exists: the chatfleet services need Redis, a Kafka-protocol
# broker (tansu), a MongoDB wire-protocol server (nx-27017) and an SMTP sink
# running on loopback. This starts them as plain processes of our own (no
# system services, no containers), waits until each really answers, and stops
# exactly what it started. Ports and STACK_DIR come from the environment
# (see env.sh), so a second, isolated copy can run beside the first:
#
#   deploy/local/stack.sh up       # install.sh, then start what is not running
#   deploy/local/stack.sh status   # exit 0 if all four run, 3 otherwise
#   deploy/local/stack.sh down     # stop what up started (pid files only)
#
#   STACK_DIR=/tmp/stack2 REDIS_PORT=16379 KAFKA_PORT=19092 MONGO_PORT=37017 \
#     SMTP_PORT=12525 deploy/local/stack.sh up
#
# Layout: $STACK_DIR/pids/NAME.pid, $STACK_DIR/logs/NAME.log,
# $STACK_DIR/data/{redis,mongo,mail,kafka}. NAME is redis, kafka, mongo, smtp.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
source "$here/env.sh"
CHATFLEET_LOG_TAG=stack
# shellcheck source=lib.sh
source "$here/lib.sh"

components=(redis kafka mongo smtp)
pid_dir="$STACK_DIR/pids"
log_dir="$STACK_DIR/logs"

pidfile_of() { printf '%s/%s.pid\n' "$pid_dir" "$1"; }
logfile_of() { printf '%s/%s.log\n' "$log_dir" "$1"; }

port_of() {
  case $1 in
    redis) printf '%s\n' "$REDIS_PORT" ;;
    kafka) printf '%s\n' "$KAFKA_PORT" ;;
    mongo) printf '%s\n' "$MONGO_PORT" ;;
    smtp) printf '%s\n' "$SMTP_PORT" ;;
  esac
}

port_var_of() {
  case $1 in
    redis) echo REDIS_PORT ;;
    kafka) echo KAFKA_PORT ;;
    mongo) echo MONGO_PORT ;;
    smtp) echo SMTP_PORT ;;
  esac
}

url_of() {
  case $1 in
    redis) printf '%s\n' "$REDIS_URL" ;;
    kafka) printf '%s\n' "$KAFKA_BROKERS" ;;
    mongo) printf '%s\n' "$MONGODB_URI" ;;
    smtp) printf 'smtp://%s:%s (mail in %s)\n' "$SMTP_HOST" "$SMTP_PORT" "$SMTP_MAIL_DIR" ;;
  esac
}

# markers_of NAME: sets the global array `markers`: strings the command line
# of our process contains (binary and port), to recognise it by its pid.
# /proc/PID/cmdline is read with a space after every argument, hence the
# trailing spaces, which keep port 2525 from matching 25250.
markers=()
markers_of() {
  case $1 in
    redis) markers=("redis-server" "127.0.0.1:$REDIS_PORT ") ;;
    kafka) markers=("$(basename "$TANSU_BIN")" "tcp://127.0.0.1:$KAFKA_PORT ") ;;
    mongo) markers=("nx-27017" "--port $MONGO_PORT ") ;;
    smtp) markers=("smtp_sink.py" "--port $SMTP_PORT ") ;;
  esac
}

# command_of NAME: sets the global array `cmd` to the server's command line.
cmd=()
command_of() {
  case $1 in
    redis)
      cmd=("$REDIS_SERVER_BIN" --port "$REDIS_PORT" --bind 127.0.0.1
        --dir "$STACK_DATA_DIR/redis" --save "" --appendonly no --daemonize no)
      ;;
    kafka)
      # tansu resolves a sqlite:// path against its working directory.
      cmd=(env -C "$STACK_DATA_DIR/kafka" "$TANSU_BIN" broker
        --listener-url "tcp://127.0.0.1:$KAFKA_PORT"
        --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT"
        --storage-engine "$TANSU_STORAGE")
      ;;
    mongo)
      cmd=("$NX27017_BIN" --host 127.0.0.1 --port "$MONGO_PORT"
        --data-dir "$STACK_DATA_DIR/mongo"
        --log-file "$STACK_DATA_DIR/mongo.log"
        --pid-file "$STACK_DATA_DIR/mongo.pid")
      ;;
    smtp)
      cmd=("$PYTHON_BIN" -u "$SMTP_SINK" --host 127.0.0.1 --port "$SMTP_PORT"
        --mail-dir "$SMTP_MAIL_DIR")
      ;;
  esac
}

# running NAME: print our pid of NAME if it is running.
running() {
  markers_of "$1"
  running_pid "$(pidfile_of "$1")" "${markers[@]}"
}

# --- readiness probes ------------------------------------------------------------
probe_redis() {
  if [[ -x "$REDIS_CLI_BIN" ]]; then
    [[ "$(timeout 3 "$REDIS_CLI_BIN" -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" == PONG ]]
  else
    # shellcheck disable=SC2016 # expanded by the inner bash
    timeout 3 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"; printf "PING\r\n" >&3;
      IFS= read -r -t 2 line <&3; [[ $line == "+PONG"* ]]' _ "$REDIS_PORT" 2>/dev/null
  fi
}

probe_mongo() {
  tcp_open "$MONGO_PORT" || return 1
  # A real round trip: pymongo is in the venv (nx-27017 depends on it).
  timeout 10 "$PYTHON_BIN" -c '
import sys, pymongo
client = pymongo.MongoClient(sys.argv[1], serverSelectionTimeoutMS=2000, connectTimeoutMS=2000)
client.admin.command("ping")
' "$MONGODB_URI" >/dev/null 2>&1
}

probe_smtp() {
  # shellcheck disable=SC2016 # expanded by the inner bash
  timeout 3 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"; IFS= read -r -t 2 line <&3;
    printf "QUIT\r\n" >&3; [[ $line == 220* ]]' _ "$SMTP_PORT" 2>/dev/null
}

probe_kafka() { tcp_open "$KAFKA_PORT"; }

# fail_component NAME WHY: report with the log tail and exit.
fail_component() {
  local name=$1 why=$2 extra=()
  [[ $name == mongo ]] && extra=("$STACK_DATA_DIR/mongo.log")
  tail_log "$(logfile_of "$name")" "${extra[@]}"
  die "$name: $why (log: $(logfile_of "$name"))"
}

# wait_ready NAME DEADLINE: until NAME answers its probe; fail if it exits or
# the deadline (epoch seconds) passes.
wait_ready() {
  local name=$1 deadline=$2
  while :; do
    if ! running "$name" >/dev/null; then
      fail_component "$name" "exited during start-up"
    fi
    if "probe_$name"; then
      return 0
    fi
    if (($(now_s) >= deadline)); then
      fail_component "$name" "did not answer on 127.0.0.1:$(port_of "$name") within ${STACK_START_TIMEOUT}s"
    fi
    sleep 0.2
  done
}

# create_topics DEADLINE: tansu creates no topic by itself.
create_topics() {
  local deadline=$1 topic out
  for topic in $CHATFLEET_TOPICS; do
    while :; do
      if out="$(timeout 10 "$TANSU_BIN" topic create "$topic" \
        --broker "tcp://127.0.0.1:$KAFKA_PORT" --partitions "$KAFKA_PARTITIONS" 2>&1)"; then
        log "kafka: topic $topic created ($KAFKA_PARTITIONS partitions)"
        break
      fi
      if [[ "$out" == *"already exists"* ]]; then
        log "kafka: topic $topic already exists"
        break
      fi
      if (($(now_s) >= deadline)); then
        printf '%s\n' "$out" | strip_ansi >&2
        fail_component kafka "could not create topic $topic within ${STACK_START_TIMEOUT}s"
      fi
      sleep 0.5
    done
  done
}

# --- commands ------------------------------------------------------------------
up_ok=0
started=()
# If up fails half-way, stop what this invocation started (and only that).
cleanup_failed_up() {
  local name
  if ((up_ok == 0 && ${#started[@]} > 0)); then
    warn "start-up failed; stopping what this run started: ${started[*]}"
    for name in "${started[@]}"; do
      markers_of "$name"
      stop_recorded "$name" "$(pidfile_of "$name")" "${markers[@]}"
    done
  fi
}

cmd_up() {
  "$here/install.sh"
  # install.sh may just have created the binaries: resolve their paths again.
  # shellcheck source=env.sh
  source "$here/env.sh"

  mkdir -p "$pid_dir" "$log_dir" "$STACK_DATA_DIR"/{redis,mongo,mail,kafka}
  exec 8>"$STACK_DIR/stack.lock"
  flock -w 120 8 || die "another stack.sh holds $STACK_DIR/stack.lock"
  trap cleanup_failed_up EXIT

  local name pid
  for name in "${components[@]}"; do
    if pid="$(running "$name")"; then
      log "$name: already running (pid $pid)"
      continue
    fi
    rm -f "$(pidfile_of "$name")"
    ensure_port_free "$name" "$(port_of "$name")" "$(port_var_of "$name")"
    # nx-27017 refuses to start while its own pid file names a live pid.
    [[ $name == mongo ]] && rm -f "$STACK_DATA_DIR/mongo.pid"
    command_of "$name"
    spawn "$(pidfile_of "$name")" "$(logfile_of "$name")" "${cmd[@]}"
    started+=("$name")
    log "$name: started (pid $(read_pid "$(pidfile_of "$name")"), log $(logfile_of "$name"))"
  done

  local deadline=$(($(now_s) + STACK_START_TIMEOUT))
  for name in "${components[@]}"; do
    wait_ready "$name" "$deadline"
    log "$name: answering on 127.0.0.1:$(port_of "$name")"
  done
  create_topics "$deadline"
  up_ok=1

  log "stack is up (STACK_DIR=$STACK_DIR):"
  for name in "${components[@]}"; do
    printf '  %-6s pid %-8s %s\n' "$name" "$(running "$name")" "$(url_of "$name")"
  done
  log "stop it with: STACK_DIR=$STACK_DIR $here/stack.sh down"
}

cmd_down() {
  [[ -d "$STACK_DIR" ]] || {
    log "nothing to stop: $STACK_DIR does not exist"
    return 0
  }
  exec 8>"$STACK_DIR/stack.lock"
  flock -w 120 8 || die "another stack.sh holds $STACK_DIR/stack.lock"
  local i name
  for ((i = ${#components[@]} - 1; i >= 0; i--)); do
    name=${components[i]}
    markers_of "$name"
    stop_recorded "$name" "$(pidfile_of "$name")" "${markers[@]}"
  done
}

cmd_status() {
  local name pid all=0 state
  printf '%-6s %-8s %-9s %-24s %s\n' NAME PID STATE ADDRESS LOG
  for name in "${components[@]}"; do
    if pid="$(running "$name")"; then
      if tcp_open "$(port_of "$name")"; then state=running; else state=starting; fi
    else
      pid="-"
      state=stopped
      [[ -f "$(pidfile_of "$name")" ]] && state="stale-pid"
      all=3
    fi
    printf '%-6s %-8s %-9s %-24s %s\n' "$name" "$pid" "$state" \
      "127.0.0.1:$(port_of "$name")" "$(logfile_of "$name")"
  done
  return "$all"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *)
    echo "usage: $0 up|down|status" >&2
    exit 2
    ;;
esac
