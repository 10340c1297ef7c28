#!/usr/bin/env bash
# Why this script exists: the nginx alternative to Envoy needs one ring member
# (and one relay) per socket pod, so its configuration depends on the pods you
# run. This renders deploy/nginx/chatfleet.conf.template for a given set of
# pods: deploy/nginx/chatfleet.conf is its output for docker-compose.yml, and
# tests/tests/fleet/multipod_nginx.rs renders it for processes on loopback ports.
#
# Usage:
#   deploy/nginx/render.sh \
#     [--public-listen 8080] [--internal-listen 9080] [--run-dir /run/chatfleet] \
#     [--access-log /var/log/nginx/access.log] [--web-root DIR] \
#     --persistence HOST:PUBLIC_PORT:INTERNAL_PORT \
#     --chat NAME=HOST:PUBLIC_PORT:INTERNAL_PORT [--chat ...] \
#     --notifications NAME=HOST:PUBLIC_PORT:INTERNAL_PORT [--notifications ...] \
#     [--template FILE] > chatfleet.conf
#
# NAME is the pod's stable name (letters, digits, '-'): it names the relay and
# so its place on the ring. Keep names stable when adding pods, and only the
# streams that hash to the new pod move.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
template="$here/chatfleet.conf.template"
public_listen=8080
internal_listen=9080
run_dir=/run/chatfleet
# The nginx image links this to the container's stdout.
access_log=/var/log/nginx/access.log
persistence=""
chat=()
notifications=()
# A directory of static files served at / by the public server (the web app);
# without it / answers 404 like any unknown path.
web_root=""

usage() {
  sed -n '/^# Usage:/,/^# NAME/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
die() {
  printf 'render.sh: %s\n' "$*" >&2
  exit 2
}

while (($#)); do
  case "$1" in
    --public-listen) public_listen=${2:?}; shift 2 ;;
    --internal-listen) internal_listen=${2:?}; shift 2 ;;
    --run-dir) run_dir=${2:?}; shift 2 ;;
    --access-log) access_log=${2:?}; shift 2 ;;
    --persistence) persistence=${2:?}; shift 2 ;;
    --chat) chat+=("${2:?}"); shift 2 ;;
    --notifications) notifications+=("${2:?}"); shift 2 ;;
    --web-root) web_root=${2:?}; shift 2 ;;
    --template) template=${2:?}; shift 2 ;;
    -h | --help) usage ;;
    *) die "unknown argument: $1" ;;
  esac
done

[[ -n "$persistence" ]] || die "--persistence HOST:PUBLIC_PORT:INTERNAL_PORT is required"
((${#chat[@]})) || die "at least one --chat pod is required"
((${#notifications[@]})) || die "at least one --notifications pod is required"
[[ -f "$template" ]] || die "template $template not found"
[[ -z "$web_root" || "$web_root" =~ ^/[A-Za-z0-9._/-]+$ ]] || die "bad --web-root '$web_root' (an absolute path of letters, digits, '.', '_', '-', '/')"

# split_endpoint VALUE -> sets host public_port internal_port
split_endpoint() {
  local value=$1
  [[ "$value" =~ ^([A-Za-z0-9._-]+):([0-9]+):([0-9]+)$ ]] || die "bad endpoint '$value' (want HOST:PUBLIC_PORT:INTERNAL_PORT)"
  host=${BASH_REMATCH[1]}
  public_port=${BASH_REMATCH[2]}
  internal_port=${BASH_REMATCH[3]}
}

# global_substitute LINE -> prints LINE with the global placeholders filled in
global_substitute() {
  local line=$1
  line=${line//@PUBLIC_LISTEN@/$public_listen}
  line=${line//@INTERNAL_LISTEN@/$internal_listen}
  line=${line//@RUN_DIR@/$run_dir}
  line=${line//@ACCESS_LOG@/$access_log}
  line=${line//@WEB_ROOT@/$web_root}
  line=${line//@PERSISTENCE_HOST@/$persistence_host}
  line=${line//@PERSISTENCE_PUBLIC_PORT@/$persistence_public}
  line=${line//@PERSISTENCE_INTERNAL_PORT@/$persistence_internal}
  printf '%s\n' "$line"
}

# emit_block KIND LINE... : the block's lines once per pod of KIND
emit_block() {
  local kind=$1 pod name line
  shift
  local -a pods
  case "$kind" in
    chat) pods=("${chat[@]}") ;;
    notifications) pods=("${notifications[@]}") ;;
    *) die "template: unknown block kind '$kind'" ;;
  esac
  for pod in "${pods[@]}"; do
    [[ "$pod" == *=* ]] || die "bad pod '$pod' (want NAME=HOST:PUBLIC_PORT:INTERNAL_PORT)"
    name=${pod%%=*}
    [[ "$name" =~ ^[A-Za-z0-9-]+$ ]] || die "bad pod name '$name' (letters, digits and '-')"
    split_endpoint "${pod#*=}"
    for line in "$@"; do
      line=${line//@POD@/$name}
      line=${line//@HOST@/$host}
      line=${line//@PUBLIC_PORT@/$public_port}
      line=${line//@INTERNAL_PORT@/$internal_port}
      global_substitute "$line"
    done
  done
}

split_endpoint "$persistence"
persistence_host=$host
persistence_public=$public_port
persistence_internal=$internal_port

printf '# Rendered by deploy/nginx/render.sh from chatfleet.conf.template; do not edit.\n'
block_kind=""
block=()
# `#@if web` ... [`#@else` ...] `#@end`: lines kept only with (or without) --web-root.
in_if=0
keep=1
while IFS= read -r line || [[ -n "$line" ]]; do
  if ((in_if)) && [[ -z "$block_kind" ]]; then
    case "$line" in
      "#@else") keep=$((1 - keep)); continue ;;
      "#@end") in_if=0; keep=1; continue ;;
    esac
    ((keep)) || continue
  fi
  if [[ "$line" == "#@if web" ]]; then
    ((in_if == 0)) || die "template: nested '#@if'"
    in_if=1
    keep=0
    [[ -n "$web_root" ]] && keep=1
  elif [[ -n "$block_kind" ]]; then
    if [[ "$line" == "#@end" ]]; then
      emit_block "$block_kind" "${block[@]}"
      block_kind=""
      block=()
    else
      block+=("$line")
    fi
  elif [[ "$line" =~ ^#@each\ (.+)$ ]]; then
    block_kind=${BASH_REMATCH[1]}
  else
    global_substitute "$line"
  fi
done <"$template"
[[ -z "$block_kind" ]] || die "template: '#@each $block_kind' without '#@end'"
((in_if == 0)) || die "template: '#@if web' without '#@end'"
