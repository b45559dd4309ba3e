#!/usr/bin/env bash
# Builds a busybox OCI image archive from Debian's busybox-static, because no
# image registry is reachable on these machines.
#
#   hack/build-busybox-image.sh OUT.tar [REF]
#
# REF defaults to docker.io/library/busybox:latest. The archive is an OCI
# image layout (oci-layout, index.json, blobs/sha256/...) whose index entry
# carries io.containerd.image.name=REF and org.opencontainers.image.ref.name=TAG,
# so `ctr image import` of containerd 1.6 and 2.x both name the image REF.
# The layer holds /bin/busybox with a symlink per applet (sh, echo, sleep, ...),
# /etc/passwd and /etc/group; platform linux/amd64; Cmd ["sh"].
# Reproducible: fixed mtimes, owners and order, gzip without name/time, so the
# same busybox binary always gives the same digests.
# Needs only bash, coreutils, GNU tar and gzip.
set -euo pipefail
. "$(dirname -- "${BASH_SOURCE[0]}")/lib/oci-image.sh"

usage() { echo "usage: $0 OUT.tar [REF]" >&2; exit 2; }
if [ $# -lt 1 ] || [ $# -gt 2 ]; then usage; fi
OUT=$1
REF=${2:-docker.io/library/busybox:latest}
BUSYBOX=${KUASAR_BUSYBOX_BIN:-/bin/busybox}

[ -x "$BUSYBOX" ] || { echo "$0: $BUSYBOX missing: apt-get install busybox-static" >&2; exit 1; }
# A dynamically linked busybox would not run in an image without libc.
if ldd "$BUSYBOX" >/dev/null 2>&1; then
  echo "$0: $BUSYBOX is dynamically linked; install busybox-static" >&2; exit 1
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/busybox-image.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
umask 022

# ---- the root filesystem -------------------------------------------------
ROOT=$WORK/rootfs
mkdir -p "$ROOT"/{bin,etc,tmp,proc,sys,dev,root}
chmod 1777 "$ROOT/tmp"
chmod 0700 "$ROOT/root"
install -m 0755 "$BUSYBOX" "$ROOT/bin/busybox"
# Every applet this busybox has, so `ctr run ... IMAGE id ps` and friends work.
for a in $("$BUSYBOX" --list); do
  case $a in busybox | */* | '') continue ;; esac
  ln -s busybox "$ROOT/bin/$a"
done
for a in sh echo true false sleep cat ls id ps top env kill hostname mkdir uname wc yes \
         head tail touch rm grep printf; do
  [ -L "$ROOT/bin/$a" ] || { echo "$0: $BUSYBOX has no applet $a" >&2; exit 1; }
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' > "$ROOT/etc/passwd"
printf 'root:x:0:\nnobody:x:65534:\n' > "$ROOT/etc/group"

oci_image "$ROOT" "$OUT" "$REF" linux amd64 \
  '{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["sh"]}' \
  "kuasar hack/build-busybox-image.sh"
