#!/usr/bin/env bash
# Builds the pod sandbox ("pause") OCI image archive from this workspace's
# kuasar-pause, because no image registry is reachable on these machines.
#
#   hack/build-pause-image.sh OUT.tar [REF]
#
# REF defaults to docker.io/kuasar/pause:latest. The layer holds only
# /pause, a statically linked kuasar-pause; Entrypoint ["/pause"]. The binary
# is $KUASAR_PAUSE_BIN if set, else built here with
# `cargo build --release -p kuasar-pause --target <host>` and
# RUSTFLAGS="-C target-feature=+crt-static -C strip=symbols" (only for that build: with
# --target the flags reach neither build scripts nor the rest of target/).
# Import into the k8s.io namespace and name it as the CRI plugin's
# sandbox_image.
set -euo pipefail
HACK=$(cd "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
. "$HACK/lib/oci-image.sh"

usage() { echo "usage: $0 OUT.tar [REF]" >&2; exit 2; }
if [ $# -lt 1 ] || [ $# -gt 2 ]; then usage; fi
OUT=$1
REF=${2:-docker.io/kuasar/pause:latest}

PAUSE=${KUASAR_PAUSE_BIN:-}
if [ -z "$PAUSE" ]; then
  host=$(rustc -vV | sed -n 's/^host: //p')
  (cd "$HACK/.." && RUSTFLAGS="-C target-feature=+crt-static -C strip=symbols" \
    cargo build --quiet --release -p kuasar-pause --target "$host")
  PAUSE=$HACK/../target/$host/release/kuasar-pause
fi
[ -x "$PAUSE" ] || { echo "$0: $PAUSE missing" >&2; exit 1; }
# A dynamically linked pause would not run in an image without libc (ldd
# cannot tell: it calls a static-pie binary "statically linked" and succeeds).
if readelf -l "$PAUSE" | grep -q 'program interpreter'; then
  echo "$0: $PAUSE is dynamically linked" >&2; exit 1
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/pause-image.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
umask 022
ROOT=$WORK/rootfs
mkdir -p "$ROOT"
install -m 0755 "$PAUSE" "$ROOT/pause"

oci_image "$ROOT" "$OUT" "$REF" linux amd64 \
  '{"Entrypoint":["/pause"],"WorkingDir":"/"}' \
  "kuasar hack/build-pause-image.sh"
