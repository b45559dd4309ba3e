#!/usr/bin/env bash
# The first command for a new user on a fresh Debian 12 machine (as root):
# installs what is needed, builds the workspace, and runs containers (runc, a
# WASI program, a microVM) through the kuasar shims on a private, stock
# containerd 1.6 next to a private
# kuasar-sandboxer, showing that no shim process stays resident. Everything
# it starts is stopped and removed on exit, also on failure or ^C; it exits
# non-zero if anything fails. It never touches a system containerd.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf '\n== %s\n' "$*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || fail "run hack/setup.sh as root (it installs packages and runs containers)"
command -v cargo >/dev/null ||
  fail "cargo is missing: install the Rust toolchain first (https://rustup.rs), then rerun hack/setup.sh"

say "installing dependencies (Debian packages; containerd 2.1 unpacked privately)"
bash hack/install-deps.sh
say "building the workspace (release)"
cargo build --release --workspace
IMAGE_TAR=target/kuasar-images/busybox.tar
bash hack/build-busybox-image.sh "$IMAGE_TAR"
WASM_TAR=target/kuasar-images/wasm-test.tar
bash hack/build-wasm-image.sh "$WASM_TAR"
say "building the microVM guest image (Debian's kernel, a static kuasar-agent, crun)"
bash hack/build-guest-image.sh target/kuasar-guest

# shellcheck source=hack/lib/containerd-env.sh
source hack/lib/containerd-env.sh
DIR=$(mktemp -d /tmp/kuasar-setup.XXXXXX)
teardown() {
  local rc=$?
  trap - EXIT INT TERM
  say "tearing the private containerd and sandboxer down"
  kuasar_env_down "$DIR" || rc=1
  [ "$rc" = 0 ] && echo "done: everything under $DIR is stopped, unmounted and removed"
  exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT TERM

say "starting containerd 1.6 (/usr/bin/containerd) and kuasar-sandboxer in $DIR"
kuasar_env_up 1.6 "$DIR"
kuasar_ctr image import "$IMAGE_TAR"
kuasar_ctr image import --all-platforms "$WASM_TAR"
IMG=docker.io/library/busybox:latest
RT=io.containerd.kuasarrunc.v1

# --fifo-dir keeps ctr's FIFOs in this throw-away env, not /run/containerd/fifo.
kuasar_env_run_flags "$RT"
say "ctr run --rm --runtime $RT $IMG demo echo hello from kuasar"
out=$(kuasar_ctr run --rm "${KUASAR_RUN_FLAGS[@]}" --runtime "$RT" "$IMG" demo echo hello from kuasar)
echo "$out"
[ "$out" = "hello from kuasar" ] || fail "unexpected output from the demo container"

WRT=io.containerd.kuasarwasm.v1
WIMG=docker.io/kuasar/wasm-test:latest
say "a WASI program: ctr run --rm --platform wasip1/wasm --runtime $WRT $WIMG wdemo /hello.wasm"
out=$(kuasar_ctr run --rm --fifo-dir "$DIR/fifo" --platform wasip1/wasm --runtime "$WRT" "$WIMG" wdemo /hello.wasm 2>/dev/null)
echo "$out"
[ "$out" = "hello from wasm" ] || fail "unexpected output from the wasm container"
echo "  (a wasmtime instance inside kuasar-sandboxer: no process was started for it)"

VRT=io.containerd.kuasarvmm.v1
say "a container in a microVM of its own: ctr run --rm --runtime $VRT $IMG vdemo uname -r"
out=$(kuasar_ctr run --rm "${KUASAR_RUN_FLAGS[@]}" --runtime "$VRT" "$IMG" vdemo uname -r)
echo "$out"
[ "$out" = "$(cat target/kuasar-guest/kernel.release)" ] || fail "the microVM container did not run on the guest kernel"
echo "  (the guest's kernel, not the host's $(uname -r): qemu, driven by kuasar-sandboxer, no shim)"

say "three detached containers: ctr run -d --runtime $RT $IMG demoN sleep 600"
for i in 1 2 3; do
  kuasar_ctr run -d "${KUASAR_RUN_FLAGS[@]}" --runtime "$RT" "$IMG" "demo$i" sleep 600
done
kuasar_ctr task ls
containerd_pid=$(cat "$DIR/containerd.pid")
sandboxer_pid=$(cat "$DIR/sandboxer.pid")
mapfile -t task_pids < <(kuasar_ctr task ls | awk 'NR > 1 && $3 == "RUNNING" { print $2 }')
[ ${#task_pids[@]} = 3 ] || fail "expected 3 running tasks, found ${#task_pids[@]}"

say "processes: containerd, kuasar-sandboxer and the containers (children of the sandboxer)"
pids=$(IFS=,; echo "$containerd_pid,$sandboxer_pid,${task_pids[*]}")
ps -o pid,ppid,rss,args -p "$pids"
for p in "${task_pids[@]}"; do
  ppid=$(ps -o ppid= -p "$p" | tr -d ' ')
  [ "$ppid" = "$sandboxer_pid" ] || fail "container process $p has parent $ppid, not the sandboxer"
done
echo "containerd-shim processes of this containerd (expected: none):"
shims=$(kuasar_env_shim_pids "$DIR")
if [ -n "$shims" ]; then
  # shellcheck disable=SC2086 # one pid a word
  ps -o pid,ppid,rss,args -p "$(echo $shims | tr ' ' ,)"
  fail "shim processes stayed resident"
fi
echo "  none: containerd ran containerd-shim-kuasarrunc-v1 once per container; it exited"

say "stopping the detached containers"
for i in 1 2 3; do kuasar_ctr task kill -s KILL "demo$i"; done
for i in 1 2 3; do
  for _ in $(seq 100); do
    [ "$(kuasar_ctr task ls | awk -v id="demo$i" '$1 == id { print $3 }')" = STOPPED ] && break
    sleep 0.1
  done
  kuasar_ctr task rm "demo$i" >/dev/null 2>&1 || fail "ctr task rm demo$i"
  kuasar_ctr container rm "demo$i"
done
kuasar_ctr task ls
[ -z "$(kuasar_env_shim_pids "$DIR")" ] || fail "shim processes remain after the containers were removed"
echo "OK: no containerd-shim process of this env is left"
