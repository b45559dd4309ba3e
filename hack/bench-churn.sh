#!/usr/bin/env bash
# Hygiene under churn: N `ctr run --rm` cycles (create, start, wait, delete)
# per backend — runc busybox `true`, the WASI hello, busybox `true` in a
# microVM — each on a throw-away containerd and sandboxer of its own; the
# sandboxer's open fds, threads, PSS, children and mounts at the baseline,
# every 100 cycles, at their maximum, right after the last cycle and 5 s
# later, as a markdown table. microVMs run on whatever accelerator the
# machine has; 1000 microVM cycles take about an hour under TCG: pick
# backends with --backends.
# Usage: hack/bench-churn.sh [1.6|2.1] [extra kuasar-bench-churn flags]
#   e.g. hack/bench-churn.sh 1.6 --backends runc,wasm --cycles 1000
set -euo pipefail
cd "$(dirname "$0")/.."
VER=${1:-1.6}
shift || true
cargo build --release --workspace --bins
IMG=target/kuasar-images
mkdir -p "$IMG"
bash hack/build-busybox-image.sh "$IMG/busybox.tar" >/dev/null
KUASAR_BIN_DIR=$PWD/target/release bash hack/build-wasm-image.sh "$IMG/wasm-test.tar" >/dev/null
bash hack/build-guest-image.sh target/kuasar-guest >/dev/null
KUASAR_BIN_DIR=$PWD/target/release KUASAR_BUSYBOX_IMAGE=$PWD/$IMG/busybox.tar \
  KUASAR_WASM_IMAGE=$PWD/$IMG/wasm-test.tar KUASAR_GUEST_DIR=$PWD/target/kuasar-guest \
  KUASAR_SANDBOXER_LOG=info KUASAR_VMM_ACCEL=${KUASAR_VMM_ACCEL:-auto} \
  exec target/release/kuasar-bench-churn --containerd "$VER" "$@"
