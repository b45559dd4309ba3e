#!/usr/bin/env bash
# Runs every test: formatting and lints, unit tests, and the end-to-end
# suites against real containerd 1.6 and 2.1, ctr and runc. Each e2e test
# starts its own containerd and sandboxer in a private directory and stops
# everything it started, even when it fails.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "hack/test.sh: run as root (containers need it)" >&2; exit 1; }
command -v cargo >/dev/null || { echo "hack/test.sh: cargo is missing: install the Rust toolchain first" >&2; exit 1; }

bash hack/install-deps.sh
python3 hack/build-busybox-image.py target/kuasar-images/busybox.tar

cargo build --release --workspace --all-targets
cargo fmt --all -- --check
cargo clippy --release --workspace --all-targets -- -D warnings

export KUASAR_BIN_DIR=$PWD/target/release
export KUASAR_BUSYBOX_IMAGE=$PWD/target/kuasar-images/busybox.tar
cargo test --release --workspace -- --test-threads=2
