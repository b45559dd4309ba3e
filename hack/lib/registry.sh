#!/usr/bin/env bash
# A private image registry for tests that pull: Debian's docker-registry on
# 127.0.0.1 with its own config and storage under DIR, never the system's
# service (/etc/docker/registry, port 5000), which is left alone.
#
#   hack/lib/registry.sh start DIR        prints the port it listens on
#   hack/lib/registry.sh push DIR OCI.tar REPOSITORY:TAG
#   hack/lib/registry.sh stop DIR
#
# start writes DIR/config.yml, DIR/port, DIR/pid and logs to DIR/registry.log;
# stop ends only the process whose pid is in DIR/pid, if it still runs with
# DIR's config. Point containerd at it with a hosts.toml under its registry
# config_path: DIR/127.0.0.1:PORT/hosts.toml holding
#   server = "http://127.0.0.1:PORT"
#   [host."http://127.0.0.1:PORT"]
#     capabilities = ["pull", "resolve"]
set -euo pipefail
LIB=$(cd "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)

die() { echo "registry.sh: $*" >&2; exit 1; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

registry_start() {
  local dir=$1 port pid
  command -v docker-registry >/dev/null || die "docker-registry missing: apt-get install docker-registry"
  mkdir -p "$dir/storage"
  dir=$(cd "$dir" && pwd)
  port=$(free_port)
  cat > "$dir/config.yml" <<YAML
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $dir/storage
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
  secret: kuasar-private-test-registry
YAML
  # setsid: a stray SIGINT to the caller's process group does not reach it.
  setsid docker-registry serve "$dir/config.yml" </dev/null >>"$dir/registry.log" 2>&1 &
  pid=$!
  echo "$pid" > "$dir/pid"
  echo "$port" > "$dir/port"
  for _ in $(seq 100); do
    if python3 - "$port" <<'PY' 2>/dev/null; then echo "$port"; return 0; fi
import sys, urllib.request
urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/v2/", timeout=1)
PY
    kill -0 "$pid" 2>/dev/null || die "docker-registry exited: $(tail -5 "$dir/registry.log")"
    sleep 0.05
  done
  registry_stop "$dir"
  die "docker-registry did not answer on 127.0.0.1:$port"
}

registry_push() {
  local dir=$1 tar=$2 ref=$3
  [ -f "$dir/port" ] || die "no registry started in $dir"
  python3 "$LIB/registry-push.py" "$tar" "127.0.0.1:$(cat "$dir/port")" "$ref"
}

registry_stop() {
  local dir=$1 pid
  [ -f "$dir/pid" ] || return 0
  pid=$(cat "$dir/pid")
  # Only our own registry: a recycled pid runs something else.
  if tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF "$dir/config.yml"; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$dir/pid"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  cmd=${1:-}; shift || true
  case $cmd in
    start) [ $# = 1 ] || die "usage: registry.sh start DIR"; registry_start "$1" ;;
    push) [ $# = 3 ] || die "usage: registry.sh push DIR OCI.tar REPOSITORY:TAG"; registry_push "$@" ;;
    stop) [ $# = 1 ] || die "usage: registry.sh stop DIR"; registry_stop "$1" ;;
    *) die "usage: registry.sh start DIR | push DIR OCI.tar REPOSITORY:TAG | stop DIR" ;;
  esac
fi
