# Throw-away containerd (1.6 or 2.1) next to a private kuasar-sandboxer, all
# under one directory. Sourced by setup.sh, up.sh and down.sh. Never touches
# a system containerd.
#   kuasar_env_up VERSION DIR    start; afterwards "${KUASAR_CTR[@]}" is ctr for it
#   kuasar_env_down DIR          stop everything, unmount, remove DIR

KUASAR_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
KUASAR_BIN=${KUASAR_BIN_DIR:-$KUASAR_REPO/target/release}
KUASAR_CONTAINERD2_DIR=${KUASAR_CONTAINERD2_DIR:-/opt/kuasar-deps/containerd-2/usr/bin}

kuasar_containerd_dir() {
  case "$1" in
    1.6) echo /usr/bin ;;
    2.1) echo "$KUASAR_CONTAINERD2_DIR" ;;
    *) echo "unknown containerd version $1 (1.6 or 2.1)" >&2; return 1 ;;
  esac
}

kuasar_env_up() {
  local ver=$1 dir=$2 cdir
  cdir=$(kuasar_containerd_dir "$ver")
  mkdir -p "$dir/state" "$dir/k"
  # containerd's state and the sandboxer's root on tmpfs, as /run is on a node.
  mountpoint -q "$dir/state" || mount -t tmpfs -o mode=0711 tmpfs "$dir/state"
  mountpoint -q "$dir/k" || mount -t tmpfs -o mode=0711 tmpfs "$dir/k"
  local cri
  if [ "$ver" = 1.6 ]; then
    cri='"io.containerd.grpc.v1.cri"'
    echo 'version = 2' > "$dir/containerd.toml"
  else
    cri='"io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime"'
    echo 'version = 3' > "$dir/containerd.toml"
  fi
  cat >> "$dir/containerd.toml" <<EOT
root = "$dir/root"
state = "$dir/state"
disabled_plugins = [$cri]
[grpc]
  address = "$dir/c.sock"
[ttrpc]
  address = "$dir/c.sock.ttrpc"
EOT
  printf 'log_level = "info"\n[runc]\nbinary = "runc"\n' > "$dir/sandboxer.toml"
  "$KUASAR_BIN/kuasar-sandboxer" --root "$dir/k" --listen "$dir/k/sandboxer.sock" \
    --config "$dir/sandboxer.toml" </dev/null >>"$dir/sandboxer.log" 2>&1 &
  echo $! > "$dir/sandboxer.pid"
  # containerd finds the shims in its PATH and the sandboxer through the
  # environment it passes to them.
  KUASAR_SANDBOXER_SOCKET="$dir/k/sandboxer.sock" PATH="$KUASAR_BIN:$cdir:$PATH" \
    "$cdir/containerd" --config "$dir/containerd.toml" </dev/null >>"$dir/containerd.log" 2>&1 &
  echo $! > "$dir/containerd.pid"
  KUASAR_CTR=("$cdir/ctr" --address "$dir/c.sock")
  local i
  for i in $(seq 200); do
    "${KUASAR_CTR[@]}" version >/dev/null 2>&1 && [ -S "$dir/k/sandboxer.sock" ] && return 0
    sleep 0.05
  done
  echo "containerd $ver did not come up; see $dir/containerd.log and $dir/sandboxer.log" >&2
  return 1
}

kuasar_stop_pid() {
  local f=$1 pid i
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  kill "$pid" 2>/dev/null || true
  for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$f"
}

kuasar_env_down() {
  local dir=$1 ns id pid m
  [ -d "$dir" ] || return 0
  kuasar_stop_pid "$dir/containerd.pid"
  # Containers outlive both daemons: remove them with runc directly.
  for ns in "$dir"/k/runc/*/; do
    [ -d "$ns" ] || continue
    for id in $(runc --root "$ns" list -q 2>/dev/null); do
      runc --root "$ns" delete --force "$id" >/dev/null 2>&1 || true
    done
  done
  kuasar_stop_pid "$dir/sandboxer.pid"
  # Shims of this env (containerd-shim-runc-v2 runs from the comparison).
  for pid in $(pgrep -f "containerd-shim.*$dir" || true); do kill -9 "$pid" 2>/dev/null || true; done
  awk -v d="$dir" '$5 == d || index($5, d "/") == 1 {print $5}' /proc/self/mountinfo | sort -r |
    while read -r m; do umount -l "$m" 2>/dev/null || true; done
  rm -rf "$dir"
}
