#!/usr/bin/env bash
# Starts a throw-away containerd (1.6 or 2.1) with the kuasar runtimes next to
# a private kuasar-sandboxer, imports busybox and leaves it running, so you
# can try things with ctr. hack/down.sh stops it and removes everything.
#   hack/up.sh [1.6|2.1]      (directory: $KUASAR_UP_DIR or /tmp/kuasar-up-VER)
set -euo pipefail
cd "$(dirname "$0")/.."
VER=${1:-1.6}
case "$VER" in 1.6 | 2.1) ;; *) echo "usage: $0 [1.6|2.1]" >&2; exit 2 ;; esac
[ "$(id -u)" = 0 ] || { echo "$0: run as root (containers need it)" >&2; exit 1; }
DIR=${KUASAR_UP_DIR:-/tmp/kuasar-up-$VER}
IMAGE_TAR=target/kuasar-images/busybox.tar
# shellcheck source=hack/lib/containerd-env.sh
source hack/lib/containerd-env.sh

if kuasar_env_is_up "$DIR"; then
  echo "$0: already up in $DIR; stop it with hack/down.sh $VER" >&2; exit 1
fi
[ -x "$KUASAR_BIN/kuasar-sandboxer" ] || cargo build --release --workspace
[ -f "$IMAGE_TAR" ] || bash hack/build-busybox-image.sh "$IMAGE_TAR" >/dev/null

# Never leave a half-started env behind.
up=0
trap '[ $up = 1 ] || kuasar_env_down "$DIR"' EXIT
kuasar_env_up "$VER" "$DIR"
kuasar_ctr image import "$IMAGE_TAR" >/dev/null
up=1

cat <<EOT
containerd $VER with the kuasar runtimes is up in $DIR
  containerd: pid $(cat "$DIR/containerd.pid"), log $DIR/containerd.log, socket $KUASAR_ENV_ADDRESS
  sandboxer:  pid $(cat "$DIR/sandboxer.pid"), log $DIR/sandboxer.log, socket $KUASAR_ENV_SANDBOXER_SOCKET

Use it with:
  alias ctr='$DIR/ctr'     # = ${KUASAR_CTR[*]}
  ctr run --rm --runtime io.containerd.kuasarrunc.v1 docker.io/library/busybox:latest c1 echo hello
  ctr run -d --runtime io.containerd.kuasarrunc.v1 docker.io/library/busybox:latest c2 sleep 600
  ctr task ls
ctr's default namespace here is $KUASAR_ENV_NAMESPACE (containers get the cgroup
/$KUASAR_ENV_NAMESPACE/ID); add --fifo-dir $DIR/fifo to ctr run to keep its FIFOs
out of /run/containerd/fifo.

Stop it with: hack/down.sh $VER
EOT
