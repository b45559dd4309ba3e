#!/usr/bin/env bash
# Benchmark of pods through CRI: containerd's runc-v2 handler against the
# kuasar handlers (kuasar-runc in every sandbox mode the containerd offers,
# kuasar-wasm) on one throw-away containerd with CRI, a private CNI bridge
# and a private registry: pod start serial and in parallel, management PSS
# at 1, 10 and 50 running pods, shim execs per pod. Prints markdown tables
# with the ratios to runc-v2.
# Usage: hack/bench-pods.sh [1.6|2.1] [extra kuasar-bench-pods flags]
set -euo pipefail
cd "$(dirname "$0")/.."
VER=${1:-1.6}
shift || true
cargo build --release --workspace --bins
IMG=target/kuasar-images
mkdir -p "$IMG"
bash hack/build-busybox-image.sh "$IMG/busybox.tar" >/dev/null
bash hack/build-pause-image.sh "$IMG/pause.tar" >/dev/null
KUASAR_BIN_DIR=$PWD/target/release bash hack/build-wasm-image.sh "$IMG/wasm-test.tar" >/dev/null
KUASAR_BIN_DIR=$PWD/target/release KUASAR_BUSYBOX_IMAGE=$PWD/$IMG/busybox.tar \
  KUASAR_PAUSE_IMAGE=$PWD/$IMG/pause.tar KUASAR_WASM_IMAGE=$PWD/$IMG/wasm-test.tar \
  exec target/release/kuasar-bench-pods --containerd "$VER" "$@"
