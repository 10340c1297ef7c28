# shellcheck shell=bash
# Why this file exists: stack.sh, up.sh and down.sh start and stop processes
# the same way (pid file + identity check, so that nothing they did not start
# is ever signalled; bounded waits; the log's tail on failure). The helpers
# live here once. Sourced by those scripts after env.sh; not for interactive
# use.

# Name printed in front of every message; the sourcing script may change it.
: "${CHATFLEET_LOG_TAG:=local}"

log() { printf '[%s] %s\n' "$CHATFLEET_LOG_TAG" "$*"; }
warn() { printf '[%s] WARNING: %s\n' "$CHATFLEET_LOG_TAG" "$*" >&2; }
die() {
  printf '[%s] ERROR: %s\n' "$CHATFLEET_LOG_TAG" "$*" >&2
  exit 1
}

# Strip ANSI colour codes (tansu colours its output even into files).
strip_ansi() { sed -e 's/\x1b\[[0-9;]*m//g'; }

# tail_log FILE...: print the last lines of each existing log file to stderr.
tail_log() {
  local f
  for f in "$@"; do
    [[ -f "$f" ]] || continue
    printf -- '----- last 40 lines of %s -----\n' "$f" >&2
    tail -n 40 "$f" | strip_ansi >&2
    printf -- '----- end of %s -----\n' "$f" >&2
  done
}

# tcp_open PORT: true when something accepts TCP connections on 127.0.0.1:PORT.
tcp_open() {
  # shellcheck disable=SC2016 # $1 is expanded by the inner bash
  timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null
}

# now_s: seconds since the epoch.
now_s() { date +%s; }

# pid_alive PID: true while PID exists and is not a zombie. (A zombie still
# answers kill -0 until its parent reaps it; our servers are re-parented to
# init when the script that started them exits, and some inits reap late.)
pid_alive() {
  local stat
  [[ "$1" =~ ^[0-9]+$ ]] || return 1
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  stat="${stat##*) }"
  [[ "${stat%% *}" != Z ]]
}

# proc_matches PID MARKER...: true when PID is alive and its command line
# contains every MARKER. This is how a recorded pid is known to still be the
# process we started (and not a recycled pid of something else).
proc_matches() {
  local pid=$1 cmdline marker
  shift
  pid_alive "$pid" || return 1
  cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" || return 1
  [[ -n "$cmdline" ]] || return 1
  for marker in "$@"; do
    [[ "$cmdline" == *"$marker"* ]] || return 1
  done
}

# read_pid FILE: print the pid recorded in FILE (empty if none).
read_pid() {
  [[ -f "$1" ]] || return 0
  head -n 1 "$1" | tr -dc '0-9'
}

# running_pid PIDFILE MARKER...: print the recorded pid if that process is
# still ours and alive; otherwise print nothing and return 1.
running_pid() {
  local pidfile=$1 pid
  shift
  pid="$(read_pid "$pidfile")"
  if [[ -z "$pid" ]] || ! proc_matches "$pid" "$@"; then
    return 1
  fi
  printf '%s\n' "$pid"
}

# spawn PIDFILE LOGFILE CMD...: start CMD in the background in its own session
# (so a Ctrl-C in the calling terminal does not reach it), stdin from
# /dev/null, stdout+stderr to LOGFILE (the previous log is kept as
# LOGFILE.prev), and record its pid in PIDFILE.
spawn() {
  local pidfile=$1 logfile=$2 pid
  shift 2
  mkdir -p "$(dirname "$pidfile")" "$(dirname "$logfile")"
  [[ -f "$logfile" ]] && mv -f "$logfile" "$logfile.prev"
  printf '=== %s starting: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >"$logfile"
  # In a non-interactive script a background job is not a process-group
  # leader, so setsid does not fork again and $! is the server's own pid.
  # Fds 8 and 9 hold the scripts' flock locks: the server must not keep them.
  # Every socket is a file: give the server the whole hard open-files limit
  # (the services raise their own soft limit too; Redis and the broker do not).
  setsid bash -c 'ulimit -n "$(ulimit -Hn)" 2>/dev/null; exec "$@"' _ "$@" </dev/null >>"$logfile" 2>&1 8>&- 9>&- &
  pid=$!
  printf '%s\n' "$pid" >"$pidfile"
}

# stop_recorded NAME PIDFILE MARKER...: stop the process recorded in PIDFILE,
# but only if it is still the one we started (its command line contains every
# MARKER): SIGTERM, wait up to 10 s, then SIGKILL. Removes PIDFILE.
stop_recorded() {
  local name=$1 pidfile=$2 pid i
  shift 2
  if [[ ! -f "$pidfile" ]]; then
    log "$name: not running (no pid file)"
    return 0
  fi
  pid="$(read_pid "$pidfile")"
  if [[ -z "$pid" ]] || ! pid_alive "$pid"; then
    log "$name: not running (removing stale pid file)"
    rm -f "$pidfile"
    return 0
  fi
  if ! proc_matches "$pid" "$@"; then
    warn "$name: pid $pid is no longer the process this script started; leaving it alone"
    rm -f "$pidfile"
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    pid_alive "$pid" || break
    sleep 0.1
  done
  if pid_alive "$pid"; then
    warn "$name: pid $pid still alive 10 s after SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
      pid_alive "$pid" || break
      sleep 0.1
    done
  fi
  rm -f "$pidfile"
  log "$name: stopped (pid $pid)"
}

# ensure_port_free NAME PORT VAR: fail when something we did not start already
# listens on PORT.
ensure_port_free() {
  local name=$1 port=$2 var=$3
  if tcp_open "$port"; then
    die "$name: port $port on 127.0.0.1 is already in use by a process this script did not start (STACK_DIR=$STACK_DIR). Stop it, or pick another port: $var=<port>."
  fi
}
