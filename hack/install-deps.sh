#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian 12 machine:
# containerd 1.6 + runc (Debian stable), containerd 2.1 (Debian unstable's
# package, unpacked into a private folder), and the tools the tests use.
set -euo pipefail
PREFIX=${KUASAR_DEPS:-/opt/kuasar-deps}

export DEBIAN_FRONTEND=noninteractive
need=()
# protobuf-compiler: protoc, for the CRI client tonic generates at build time.
# containernetworking-plugins (/usr/lib/cni) and iptables: the CRI tests'
# bridge, host-local and portmap networks. docker-registry: the private
# registry the CRI tests pull from. binutils: readelf checks the pause binary
# (and objcopy/strip shrink the guest kernel). qemu-system-x86 (7.2) and cpio:
# the microVM backend's qemu (TCG) and hack/build-guest-image.sh's initramfs;
# its postinst starts no service. xz-utils: .ko.xz guest modules. g++: the
# libFuzzer runtime the fuzz targets (tests/fuzz) link.
for p in containerd runc busybox-static python3 bsdutils procps util-linux iproute2 \
         protobuf-compiler containernetworking-plugins docker-registry iptables binutils \
         qemu-system-x86 cpio xz-utils crun g++; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Debian's postinsts may start a system containerd and a system
# docker-registry (port 5000). Both are left alone: never stopped, disabled
# or reconfigured. The tests start their own of each, on private sockets and
# a free port.

# containerd 2.1 from Debian unstable, unpacked privately (never installed),
# at the version the tests and figures were made with. Unstable moves on:
# another version is never taken silently (set KUASAR_CONTAINERD2_VERSION to
# try one, or put the pinned .deb into $PREFIX/cache/).
CONTAINERD2_PINNED=2.1.9+ds1-5
CONTAINERD2_VERSION=${KUASAR_CONTAINERD2_VERSION:-$CONTAINERD2_PINNED}
c2="$PREFIX/containerd-2"
stamp="$c2/.kuasar-package-version"
upstream=${CONTAINERD2_VERSION%%[+~-]*}
installed() {
  [ -x "$c2/usr/bin/containerd" ] || return 1
  if [ -f "$stamp" ]; then
    [ "$(cat "$stamp")" = "$CONTAINERD2_VERSION" ]
  else
    # Unpacked before the version was recorded: its binary says which.
    "$c2/usr/bin/containerd" --version | grep -q " $upstream[+ ]"
  fi
}
if ! installed; then
  deb="$PREFIX/cache/containerd_${CONTAINERD2_VERSION}_amd64.deb"
  if [ ! -f "$deb" ]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    mkdir -p "$tmp/lists/partial" "$tmp/archives" "$PREFIX/cache"
    awk 'BEGIN{RS="";ORS="\n\n"} NR==1' /etc/apt/sources.list.d/debian.sources \
      | sed -e 's/^Suites:.*/Suites: sid/' > "$tmp/sid.sources"
    opts=(-o Dir::Etc::sourcelist="$tmp/sid.sources" -o Dir::Etc::sourceparts=- \
          -o Dir::State::Lists="$tmp/lists" -o Dir::Cache::Archives="$tmp/archives" \
          -o APT::Sandbox::User=root)
    apt-get "${opts[@]}" update -qq
    # What unstable has now (the local dpkg status is not a source).
    available=$(apt-cache "${opts[@]}" madison containerd | awk -F'|' '$3 ~ /sid/ {gsub(/ /,"",$2); print $2}' | sort -u | paste -sd' ')
    if ! grep -qxF -- "$CONTAINERD2_VERSION" <(tr ' ' '\n' <<<"$available"); then
      cat >&2 <<EOT
$0: wanted containerd $CONTAINERD2_VERSION, which Debian unstable no longer has (it has: ${available:-nothing}).
The e2e suites and the README's figures were made with containerd $CONTAINERD2_PINNED.
Either put containerd_${CONTAINERD2_VERSION}_amd64.deb into $PREFIX/cache/ and run this again,
or try the available one knowingly: KUASAR_CONTAINERD2_VERSION=<version> $0
EOT
      exit 1
    fi
    (cd "$tmp" && apt-get "${opts[@]}" download "containerd=$CONTAINERD2_VERSION" >/dev/null)
    mv "$tmp/containerd_"*.deb "$deb"
  fi
  got=$(dpkg-deb -f "$deb" Version)
  if [ "$got" != "$CONTAINERD2_VERSION" ]; then
    echo "$0: $deb holds containerd $got, not $CONTAINERD2_VERSION" >&2
    exit 1
  fi
  rm -rf "$c2"
  mkdir -p "$c2"
  dpkg-deb -x "$deb" "$c2"
  echo "$CONTAINERD2_VERSION" > "$stamp"
fi
"$PREFIX/containerd-2/usr/bin/containerd" --version
containerd --version
runc --version | head -1
qemu-system-x86_64 --version | head -1
# cargo fuzz (hack/fuzz.sh) runs on the nightly toolchain.
if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
cargo fuzz --version
# Third-party WASI programs for the wasm tests.
bash "$(dirname -- "${BASH_SOURCE[0]}")/fetch-wasi-programs.sh" >/dev/null
echo "WASI programs: $(ls "$PREFIX/wasi" | tr '\n' ' ')"
