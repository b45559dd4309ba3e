#!/usr/bin/env bash
# The first command for a new user: installs what is needed, builds, and runs
# a container through the kuasar shim on a private, stock containerd 1.6,
# then shows that no shim process stayed resident. Cleans up on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "hack/setup.sh: run as root" >&2; exit 1; }
command -v cargo >/dev/null || { echo "hack/setup.sh: cargo is missing: install the Rust toolchain first" >&2; exit 1; }

bash hack/install-deps.sh
cargo build --release --workspace --bins
python3 hack/build-busybox-image.py target/kuasar-images/busybox.tar
source hack/lib/env.sh

DIR=$(mktemp -d /tmp/kuasar-setup.XXXXXX)
trap 'kuasar_env_down "$DIR"' EXIT
kuasar_env_up 1.6 "$DIR"
"${KUASAR_CTR[@]}" image import target/kuasar-images/busybox.tar >/dev/null
IMG=docker.io/library/busybox:latest
RT=io.containerd.kuasarrunc.v1

echo "== ctr run --rm --runtime $RT $IMG demo echo hello from kuasar"
"${KUASAR_CTR[@]}" run --rm --runtime "$RT" "$IMG" demo echo hello from kuasar

echo "== three detached containers"
for i in 1 2 3; do "${KUASAR_CTR[@]}" run -d --runtime "$RT" "$IMG" "demo$i" sleep 600; done
"${KUASAR_CTR[@]}" task ls
echo "== processes: containerd, kuasar-sandboxer and the containers; no shim"
ps -o pid,ppid,rss,args -p "$(cat "$DIR/containerd.pid")","$(cat "$DIR/sandboxer.pid")" \
  --ppid "$(cat "$DIR/sandboxer.pid")"
shims=$(pgrep -fa "containerd-shim-kuasar.*$DIR" || true)
if [ -n "$shims" ]; then
  echo "FAIL: shim processes stayed resident:" >&2; echo "$shims" >&2; exit 1
fi
echo "OK: no containerd-shim-kuasar process is running"
for i in 1 2 3; do
  "${KUASAR_CTR[@]}" task kill -s KILL "demo$i"
done
sleep 0.5
for i in 1 2 3; do
  "${KUASAR_CTR[@]}" task rm "demo$i" >/dev/null
  "${KUASAR_CTR[@]}" container rm "demo$i"
done
echo "== done; tearing the private containerd and sandboxer down"
