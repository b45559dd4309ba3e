#!/usr/bin/env bash
# Starts a throw-away containerd (1.6 or 2.1) with the kuasar runtimes next
# to a sandboxer, imports busybox and leaves it running: hack/down.sh stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
VER=${1:-1.6}
source hack/lib/env.sh
DIR=${KUASAR_UP_DIR:-/tmp/kuasar-up-$VER}
[ -e "$DIR/containerd.pid" ] && { echo "already up in $DIR (hack/down.sh $VER)" >&2; exit 1; }
[ -f target/kuasar-images/busybox.tar ] || python3 hack/build-busybox-image.py target/kuasar-images/busybox.tar
kuasar_env_up "$VER" "$DIR"
"${KUASAR_CTR[@]}" image import target/kuasar-images/busybox.tar >/dev/null
echo "containerd $VER with kuasar is up in $DIR. Use:"
echo "  alias ctr='${KUASAR_CTR[*]}'"
echo "  ctr run --rm --runtime io.containerd.kuasarrunc.v1 docker.io/library/busybox:latest c1 echo hi"
