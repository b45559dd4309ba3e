#!/usr/bin/env bash
# The second command for a new user (and what CI runs): every test. Formatting
# and lints, unit tests, and the end-to-end suites against real containerd
# 1.6.20 and 2.1.9, ctr, runc and qemu (microVMs under TCG). Each e2e test
# starts its own containerd, sandboxer and VMs in a private directory and
# stops everything it started, even when it fails; nothing uses a system
# containerd.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "hack/test.sh: run as root (it installs packages and runs containers)" >&2; exit 1; }
command -v cargo >/dev/null ||
  { echo "hack/test.sh: cargo is missing: install the Rust toolchain first (https://rustup.rs)" >&2; exit 1; }

step() { printf '\n== %s\n' "$*"; }
step "dependencies"
bash hack/install-deps.sh
step "busybox image"
bash hack/build-busybox-image.sh target/kuasar-images/busybox.tar
step "cargo build --release --workspace"
cargo build --release --workspace
step "pause image (the CRI tests' sandbox image: a static kuasar-pause)"
bash hack/build-pause-image.sh target/kuasar-images/pause.tar
step "guest image (microVM kernel + initramfs with a static kuasar-agent)"
bash hack/build-guest-image.sh target/kuasar-guest
step "cargo fmt --all -- --check"
cargo fmt --all -- --check
step "cargo clippy --release --workspace --all-targets -- -D warnings"
cargo clippy --release --workspace --all-targets -- -D warnings
step "cargo test --release --workspace --no-fail-fast -- --test-threads=2"
KUASAR_BIN_DIR=$PWD/target/release \
KUASAR_BUSYBOX_IMAGE=$PWD/target/kuasar-images/busybox.tar \
KUASAR_PAUSE_IMAGE=$PWD/target/kuasar-images/pause.tar \
KUASAR_GUEST_DIR=$PWD/target/kuasar-guest \
  cargo test --release --workspace --no-fail-fast -- --test-threads=2
step "fuzz: every target of tests/fuzz briefly (hack/fuzz.sh)"
bash hack/fuzz.sh 20000
step "all tests passed"
