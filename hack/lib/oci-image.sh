# Writes a single-layer OCI image archive, reproducibly: fixed mtimes,
# owners and order, gzip without name or time. Sourced by the image builders.
#
#   oci_image ROOTFS OUT REF OS ARCH CONFIG_JSON CREATED_BY
#
# ROOTFS becomes the layer (every top-level entry, sorted). CONFIG_JSON is
# the image config's "config" object (Env, Cmd, Entrypoint...). The index
# entry carries io.containerd.image.name=REF and
# org.opencontainers.image.ref.name=TAG, so `ctr image import` of containerd
# 1.6 and 2.x both name the image REF. Needs bash, coreutils, GNU tar, gzip.

OCI_MTIME=1700000000 # 2023-11-14, any fixed instant will do

# Deterministic tar: sorted names, fixed mtime, root owner, plain ustar
# headers (GNU tar's pax headers would carry atime/ctime and the pid).
oci_det_tar() { # oci_det_tar DIR OUT NAMES...
  local dir=$1 out=$2; shift 2
  tar --create --file="$out" --directory="$dir" --format=ustar --sort=name \
      --mtime="@$OCI_MTIME" --owner=root:0 --group=root:0 --no-acls --no-xattrs --no-selinux "$@"
}

_oci_sha() { sha256sum "$1" | cut -d' ' -f1; }
_oci_size() { stat -c %s "$1"; }
# _oci_put_blob BLOBS FILE: a copy of FILE under its digest; prints the digest.
_oci_put_blob() { local h; h=$(_oci_sha "$2"); cp "$2" "$1/$h"; echo "$h"; }

# The index naming REF, the layout marker, and the archive, written under a
# private name and renamed (readers never see half a file).
_oci_finish() { # _oci_finish WORK OUT REF TAG MANIFEST MANIFEST_SIZE OS ARCH
  local work=$1 out=$2 ref=$3 tag=$4 manifest=$5 manifest_size=$6 os=$7 arch=$8
  printf '%s' '{"imageLayoutVersion":"1.0.0"}' > "$work/layout/oci-layout"
  printf '%s' \
    '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json",' \
    '"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json",' \
    '"digest":"sha256:'"$manifest"'","size":'"$manifest_size"',' \
    '"platform":{"architecture":"'"$arch"'","os":"'"$os"'"},' \
    '"annotations":{"io.containerd.image.name":"'"$ref"'","org.opencontainers.image.ref.name":"'"$tag"'"}}]}' \
    > "$work/layout/index.json"
  chmod 0644 "$work/layout/oci-layout" "$work/layout/index.json" "$work"/layout/blobs/sha256/*
  mkdir -p "$(dirname -- "$out")"
  local tmp=$out.partial.$$
  oci_det_tar "$work/layout" "$tmp" oci-layout index.json blobs
  mv -f "$tmp" "$out"
  echo "$out: $ref (manifest sha256:$manifest)"
}

oci_image() {
  local root=$1 out=$2 ref=$3 os=$4 arch=$5 config=$6 created_by=$7
  # The reference ends up in JSON unescaped: allow only what a reference may hold.
  [[ $ref =~ ^[A-Za-z0-9][A-Za-z0-9._/:@-]*$ ]] || { echo "bad image reference: $ref" >&2; return 2; }
  local last=${ref##*/} tag
  if [[ $last == *@* ]]; then
    echo "give a tagged reference, not a digest: $ref" >&2; return 2
  elif [[ $last == *:* ]]; then
    tag=${last##*:}
  else
    tag=latest ref=$ref:latest
  fi
  local work; work=$(mktemp -d "${TMPDIR:-/tmp}/oci-image.XXXXXX")
  # shellcheck disable=SC2064
  trap "rm -rf '$work'" RETURN
  local blobs=$work/layout/blobs/sha256
  mkdir -p "$blobs"

  local names; mapfile -t names < <(cd "$root" && ls -A | LC_ALL=C sort)
  oci_det_tar "$root" "$work/layer.tar" "${names[@]}"
  local diff_id; diff_id=$(_oci_sha "$work/layer.tar")
  gzip -n -9 < "$work/layer.tar" > "$work/layer.tar.gz"
  local layer_size; layer_size=$(_oci_size "$work/layer.tar.gz")
  local layer; layer=$(_oci_put_blob "$blobs" "$work/layer.tar.gz")

  printf '%s' \
    '{"architecture":"'"$arch"'","os":"'"$os"'",' \
    '"config":'"$config"',' \
    '"rootfs":{"type":"layers","diff_ids":["sha256:'"$diff_id"'"]},' \
    '"history":[{"created":"2023-11-14T22:13:20Z","created_by":"'"$created_by"'"}]}' \
    > "$work/config.json"
  local config_size; config_size=$(_oci_size "$work/config.json")
  local config_digest; config_digest=$(_oci_put_blob "$blobs" "$work/config.json")

  printf '%s' \
    '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",' \
    '"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:'"$config_digest"'","size":'"$config_size"'},' \
    '"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:'"$layer"'","size":'"$layer_size"'}]}' \
    > "$work/manifest.json"
  local manifest_size; manifest_size=$(_oci_size "$work/manifest.json")
  local manifest; manifest=$(_oci_put_blob "$blobs" "$work/manifest.json")

  _oci_finish "$work" "$out" "$ref" "$tag" "$manifest" "$manifest_size" "$os" "$arch"
}

# A wasm artifact image: FILE is the image's only layer, as is (media type
# MEDIA_TYPE, titled with its file name), not a tar; platform wasip1/wasm.
#
#   oci_wasm_artifact FILE OUT REF MEDIA_TYPE
oci_wasm_artifact() {
  local file=$1 out=$2 ref=$3 media_type=$4
  [[ $ref =~ ^[A-Za-z0-9][A-Za-z0-9._/:-]*:[A-Za-z0-9._-]+$ ]] || { echo "give a tagged reference: $ref" >&2; return 2; }
  local tag=${ref##*:} title; title=$(basename -- "$file")
  local work; work=$(mktemp -d "${TMPDIR:-/tmp}/oci-artifact.XXXXXX")
  # shellcheck disable=SC2064
  trap "rm -rf '$work'" RETURN
  local blobs=$work/layout/blobs/sha256
  mkdir -p "$blobs"
  local layer layer_size; layer=$(_oci_put_blob "$blobs" "$file"); layer_size=$(_oci_size "$file")
  printf '%s' '{"architecture":"wasm","os":"wasip1","config":{},"rootfs":{"type":"layers","diff_ids":[]}}' \
    > "$work/config.json"
  local config config_size; config_size=$(_oci_size "$work/config.json"); config=$(_oci_put_blob "$blobs" "$work/config.json")
  printf '%s' \
    '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",' \
    '"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:'"$config"'","size":'"$config_size"'},' \
    '"layers":[{"mediaType":"'"$media_type"'","digest":"sha256:'"$layer"'","size":'"$layer_size"',' \
    '"annotations":{"org.opencontainers.image.title":"'"$title"'"}}]}' > "$work/manifest.json"
  local manifest manifest_size; manifest_size=$(_oci_size "$work/manifest.json"); manifest=$(_oci_put_blob "$blobs" "$work/manifest.json")
  _oci_finish "$work" "$out" "$ref" "$tag" "$manifest" "$manifest_size" wasip1 wasm
}
