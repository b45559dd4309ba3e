#!/usr/bin/env bash
# Benchmark of microVM sandboxes (io.containerd.kuasarvmm.v1) beside
# containerd-shim-runc-v2 on one throw-away containerd: boot-to-running-
# container latency serially (median of 10) and 5 at once, the PSS of the
# sandboxer and of each qemu at 1, 5 and 10 idle VMs, on whatever
# accelerator the machine has (the output says which).
# Usage: hack/bench-vmm.sh [1.6|2.1] [extra kuasar-bench-vmm flags]
set -euo pipefail
cd "$(dirname "$0")/.."
VER=${1:-1.6}
shift || true
cargo build --release --workspace --bins
IMG=target/kuasar-images
mkdir -p "$IMG"
bash hack/build-busybox-image.sh "$IMG/busybox.tar" >/dev/null
bash hack/build-guest-image.sh target/kuasar-guest >/dev/null
KUASAR_BIN_DIR=$PWD/target/release KUASAR_BUSYBOX_IMAGE=$PWD/$IMG/busybox.tar \
  KUASAR_GUEST_DIR=$PWD/target/kuasar-guest KUASAR_SANDBOXER_LOG=info \
  KUASAR_VMM_ACCEL=${KUASAR_VMM_ACCEL:-auto} \
  exec target/release/kuasar-bench-vmm --containerd "$VER" "$@"
