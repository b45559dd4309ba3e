#!/usr/bin/env bash
# Builds a WASI OCI image archive (platform wasip1/wasm) whose layer holds
# wasm programs at the root of the filesystem, because no image registry is
# reachable on these machines.
#
#   hack/build-wasm-image.sh OUT.tar [REF] [DIR]
#   hack/build-wasm-image.sh --artifact OUT.tar [REF] [FILE.wasm]
#
# REF defaults to docker.io/kuasar/wasm-test:latest. DIR holds the programs
# (*.wasm); it defaults to the repository's WAT test programs, compiled by
# target/release/kuasar-wasm-programs (cargo build --release -p kuasar-e2e),
# and the third-party programs hack/fetch-wasi-programs.sh installed in
# ${KUASAR_DEPS:-/opt/kuasar-deps}/wasi.
# Import with `ctr image import --all-platforms` and run with
# `ctr run --platform wasip1/wasm --runtime io.containerd.kuasarwasm.v1`.
# With --artifact, the image's one layer is FILE itself (media type
# application/vnd.w3c.wasm.module.v1+wasm, or the component layer type for a
# component), not a tar: REF defaults to docker.io/kuasar/wasm-artifact:latest
# and FILE to the compiled hello.wasm. containerd 1.6 cannot unpack such
# images; 1.7 and later run them with an empty rootfs.
# Reproducible: the same programs always give the same digests.
set -euo pipefail
HACK=$(cd "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
. "$HACK/lib/oci-image.sh"

usage() { echo "usage: $0 [--artifact] OUT.tar [REF] [DIR|FILE]" >&2; exit 2; }
ARTIFACT=0
if [ "${1:-}" = --artifact ]; then ARTIFACT=1; shift; fi
if [ $# -lt 1 ] || [ $# -gt 3 ]; then usage; fi
OUT=$1
if [ $ARTIFACT = 1 ]; then REF=${2:-docker.io/kuasar/wasm-artifact:latest}; else REF=${2:-docker.io/kuasar/wasm-test:latest}; fi
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
if [ $ARTIFACT = 1 ]; then
  FILE=${3:-$DIR/hello.wasm}
  [ -f "$FILE" ] || { echo "$0: $FILE missing" >&2; exit 1; }
  # A component's preamble has layer 1 in bytes 6-7 (a module: version 1).
  if [ "$(od -An -tx1 -j6 -N2 "$FILE" | tr -d ' \n')" = 0100 ]; then
    MT=application/vnd.bytecodealliance.wasm.component.layer.v0+wasm
  else
    MT=application/vnd.w3c.wasm.module.v1+wasm
  fi
  oci_wasm_artifact "$FILE" "$OUT" "$REF" "$MT"
  exit 0
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
