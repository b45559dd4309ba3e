#!/usr/bin/env bash
# Stops what hack/up.sh started (containerd, sandboxer, containers, shims),
# unmounts everything below its directory and removes it.
#   hack/down.sh [1.6|2.1]    (directory: $KUASAR_UP_DIR or /tmp/kuasar-up-VER)
set -euo pipefail
cd "$(dirname "$0")/.."
VER=${1:-1.6}
case "$VER" in 1.6 | 2.1) ;; *) echo "usage: $0 [1.6|2.1]" >&2; exit 2 ;; esac
DIR=${KUASAR_UP_DIR:-/tmp/kuasar-up-$VER}
# shellcheck source=hack/lib/containerd-env.sh
source hack/lib/containerd-env.sh
if [ ! -e "$DIR" ]; then
  echo "nothing is up in $DIR"
  exit 0
fi
kuasar_env_down "$DIR"
echo "stopped and removed $DIR"
