#!/usr/bin/env bash
# Benchmark of the wasm runtime: instance start in the daemon (cold and
# warm), `ctr run --rm` of a WASI hello through kuasarwasm against busybox
# through kuasarrunc and containerd-shim-runc-v2 on one throw-away
# containerd, and the sandboxer's PSS with 1, 100 and 500 idle instances.
# Usage: hack/bench-wasm.sh [1.6|2.1] [extra kuasar-bench-wasm flags]
set -euo pipefail
cd "$(dirname "$0")/.."
VER=${1:-1.6}
shift || true
cargo build --release --workspace --bins
bash hack/build-busybox-image.sh target/kuasar-images/busybox.tar >/dev/null
KUASAR_BIN_DIR=$PWD/target/release bash hack/build-wasm-image.sh target/kuasar-images/wasm-test.tar >/dev/null
KUASAR_BIN_DIR=$PWD/target/release KUASAR_BUSYBOX_IMAGE=$PWD/target/kuasar-images/busybox.tar \
  KUASAR_WASM_IMAGE=$PWD/target/kuasar-images/wasm-test.tar \
  exec target/release/kuasar-bench-wasm --containerd "$VER" "$@"
