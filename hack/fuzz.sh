#!/usr/bin/env bash
# Runs the cargo-fuzz targets of tests/fuzz (nightly toolchain, cargo-fuzz:
# hack/install-deps.sh installs both), each for RUNS inputs from its seed
# corpus. New inputs go to a scratch corpus, never into the repository. Fails
# on the first panic, crash, timeout or out-of-memory; libFuzzer leaves the
# input in tests/fuzz/artifacts/<target>/ (keep it as a regression test).
#   bash hack/fuzz.sh [RUNS] [TARGET...]     (RUNS: 20000; all targets)
# Extra libFuzzer flags: FUZZ_FLAGS="-max_len=70000".
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-20000}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(wire_decode ttrpc_frame task_api agent_frame)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# No sanitizer: the code under test is safe Rust, and libFuzzer's coverage
# and comparison tracing work without one; debug assertions catch overflow.
opts=(--fuzz-dir tests/fuzz --sanitizer none --debug-assertions)
cargo +nightly fuzz build "${opts[@]}"
for t in "${targets[@]}"; do
  echo "== fuzz $t: $runs inputs"
  mkdir -p "$work/$t"
  # shellcheck disable=SC2086
  cargo +nightly fuzz run "${opts[@]}" "$t" "$work/$t" "tests/fuzz/corpus/$t" -- \
    -runs="$runs" -timeout=20 -rss_limit_mb=2048 -print_final_stats=1 ${FUZZ_FLAGS:-}
done
