#!/usr/bin/env bash
# Benchmark: the same workloads through containerd-shim-runc-v2 and through
# kuasarrunc on one throw-away containerd, in one run, with ratios.
# Usage: hack/bench.sh [1.6|2.1] [extra kuasar-bench flags]
set -euo pipefail
cd "$(dirname "$0")/.."
VER=${1:-1.6}
shift || true
cargo build --release --workspace --bins
bash hack/build-busybox-image.sh target/kuasar-images/busybox.tar >/dev/null
KUASAR_BIN_DIR=$PWD/target/release KUASAR_BUSYBOX_IMAGE=$PWD/target/kuasar-images/busybox.tar \
  exec target/release/kuasar-bench --containerd "$VER" "$@"
