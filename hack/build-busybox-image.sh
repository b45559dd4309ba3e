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

usage() { echo "usage: $0 OUT.tar [REF]" >&2; exit 2; }
if [ $# -lt 1 ] || [ $# -gt 2 ]; then usage; fi
OUT=$1
REF=${2:-docker.io/library/busybox:latest}
BUSYBOX=${KUASAR_BUSYBOX_BIN:-/bin/busybox}
MTIME=1700000000 # 2023-11-14, any fixed instant will do

# The reference ends up in JSON unescaped: allow only what a reference may hold.
[[ $REF =~ ^[A-Za-z0-9][A-Za-z0-9._/:@-]*$ ]] || { echo "$0: bad image reference: $REF" >&2; exit 2; }
last=${REF##*/}
if [[ $last == *@* ]]; then
  echo "$0: give a tagged reference, not a digest: $REF" >&2; exit 2
elif [[ $last == *:* ]]; then
  TAG=${last##*:}
else
  TAG=latest REF=$REF:latest
fi
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

# Deterministic tar: sorted names, fixed mtime, root owner, plain ustar
# headers (GNU tar's pax headers would carry atime/ctime and the pid).
det_tar() { # det_tar DIR OUT NAMES...
  local dir=$1 out=$2; shift 2
  tar --create --file="$out" --directory="$dir" --format=ustar --sort=name \
      --mtime="@$MTIME" --owner=root:0 --group=root:0 --no-acls --no-xattrs --no-selinux "$@"
}
sha() { sha256sum "$1" | cut -d' ' -f1; }
size() { stat -c %s "$1"; }

BLOBS=$WORK/layout/blobs/sha256
mkdir -p "$BLOBS"
put_blob() { # put_blob FILE -> prints the digest hex; moves FILE into blobs
  local h; h=$(sha "$1"); mv "$1" "$BLOBS/$h"; echo "$h"
}

# ---- layer ----------------------------------------------------------------
det_tar "$ROOT" "$WORK/layer.tar" bin dev etc proc root sys tmp
DIFF_ID=$(sha "$WORK/layer.tar")
gzip -n -9 < "$WORK/layer.tar" > "$WORK/layer.tar.gz"
LAYER_SIZE=$(size "$WORK/layer.tar.gz")
LAYER=$(put_blob "$WORK/layer.tar.gz")

# ---- config ---------------------------------------------------------------
printf '%s' \
  '{"architecture":"amd64","os":"linux",' \
  '"config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["sh"]},' \
  '"rootfs":{"type":"layers","diff_ids":["sha256:'"$DIFF_ID"'"]},' \
  '"history":[{"created":"2023-11-14T22:13:20Z","created_by":"kuasar hack/build-busybox-image.sh"}]}' \
  > "$WORK/config.json"
CONFIG_SIZE=$(size "$WORK/config.json")
CONFIG=$(put_blob "$WORK/config.json")

# ---- manifest -------------------------------------------------------------
printf '%s' \
  '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",' \
  '"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:'"$CONFIG"'","size":'"$CONFIG_SIZE"'},' \
  '"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:'"$LAYER"'","size":'"$LAYER_SIZE"'}]}' \
  > "$WORK/manifest.json"
MANIFEST_SIZE=$(size "$WORK/manifest.json")
MANIFEST=$(put_blob "$WORK/manifest.json")

# ---- layout ---------------------------------------------------------------
printf '%s' '{"imageLayoutVersion":"1.0.0"}' > "$WORK/layout/oci-layout"
printf '%s' \
  '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json",' \
  '"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json",' \
  '"digest":"sha256:'"$MANIFEST"'","size":'"$MANIFEST_SIZE"',' \
  '"platform":{"architecture":"amd64","os":"linux"},' \
  '"annotations":{"io.containerd.image.name":"'"$REF"'","org.opencontainers.image.ref.name":"'"$TAG"'"}}]}' \
  > "$WORK/layout/index.json"
chmod 0644 "$WORK/layout/oci-layout" "$WORK/layout/index.json" "$BLOBS"/*

# Written under a private name, then renamed: readers never see half a file.
mkdir -p "$(dirname -- "$OUT")"
tmp=$OUT.partial.$$
det_tar "$WORK/layout" "$tmp" oci-layout index.json blobs
mv -f "$tmp" "$OUT"
echo "$OUT: $REF (manifest sha256:$MANIFEST)"
