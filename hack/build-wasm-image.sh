#!/usr/bin/env bash
# Builds a WASI OCI image archive (platform wasip1/wasm) whose layer holds
# wasm programs at the root of the filesystem, because no image registry is
# reachable on these machines.
#
#   hack/build-wasm-image.sh OUT.tar [REF] [DIR]
#
# REF defaults to docker.io/kuasar/wasm-test:latest. DIR holds the programs
# (*.wasm); it defaults to the repository's WAT test programs, compiled by
# target/release/kuasar-wasm-programs (cargo build --release -p kuasar-e2e),
# and the third-party programs hack/fetch-wasi-programs.sh installed in
# ${KUASAR_DEPS:-/opt/kuasar-deps}/wasi.
# Import with `ctr image import --all-platforms` and run with
# `ctr run --platform wasip1/wasm --runtime io.containerd.kuasarwasm.v1`.
# Reproducible: the same programs always give the same digests.
set -euo pipefail
HACK=$(cd "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
. "$HACK/lib/oci-image.sh"

usage() { echo "usage: $0 OUT.tar [REF] [DIR]" >&2; exit 2; }
if [ $# -lt 1 ] || [ $# -gt 3 ]; then usage; fi
OUT=$1
REF=${2:-docker.io/kuasar/wasm-test:latest}
DIR=${3:-}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/wasm-image.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
umask 022

if [ -z "$DIR" ]; then
  COMPILER=${KUASAR_BIN_DIR:-$HACK/../target/release}/kuasar-wasm-programs
  [ -x "$COMPILER" ] || { echo "$0: $COMPILER missing: cargo build --release -p kuasar-e2e" >&2; exit 1; }
  DIR=$WORK/programs
  "$COMPILER" "$DIR"
  for f in "${KUASAR_DEPS:-/opt/kuasar-deps}"/wasi/*.wasm; do
    [ -e "$f" ] && cp "$f" "$DIR/"
  done
fi
ROOT=$WORK/rootfs
mkdir -p "$ROOT/tmp"
chmod 1777 "$ROOT/tmp"
n=0
for f in "$DIR"/*.wasm; do
  [ -e "$f" ] || continue
  install -m 0644 "$f" "$ROOT/"
  n=$((n + 1))
done
[ "$n" -gt 0 ] || { echo "$0: no .wasm programs in $DIR" >&2; exit 1; }

oci_image "$ROOT" "$OUT" "$REF" wasip1 wasm '{"Cmd":["/hello.wasm"]}' \
  "kuasar hack/build-wasm-image.sh"
