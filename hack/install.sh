#!/usr/bin/env bash
# Installs a release build on this node (as root): the binaries to
# /usr/local/bin, the microVM guest image to /usr/local/share/kuasar/guest,
# the systemd unit to /etc/systemd/system and, unless one
# exists, the example config to /etc/kuasar/sandboxer.toml. It does not start
# anything and does not change containerd's config: see the printed steps.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "$0: run as root" >&2; exit 1; }
BINS=(kuasar-sandboxer kuasar-ctl containerd-shim-kuasarrunc-v1 containerd-shim-kuasarwasm-v1 containerd-shim-kuasarvmm-v1)
missing=0
for b in "${BINS[@]}"; do [ -x "target/release/$b" ] || missing=1; done
if [ $missing = 1 ]; then
  command -v cargo >/dev/null || { echo "$0: no release build and no cargo: build first" >&2; exit 1; }
  cargo build --release --workspace
fi
for b in "${BINS[@]}"; do
  install -m 0755 "target/release/$b" "/usr/local/bin/$b"
done
# The microVM guest image, where [vmm] kernel/initrd point by default.
bash hack/build-guest-image.sh target/kuasar-guest >/dev/null
install -D -m 0644 target/kuasar-guest/vmlinux /usr/local/share/kuasar/guest/vmlinux
install -D -m 0644 target/kuasar-guest/initramfs.cpio /usr/local/share/kuasar/guest/initramfs.cpio
install -D -m 0644 target/kuasar-guest/cmdline /usr/local/share/kuasar/guest/cmdline
install -D -m 0644 hack/systemd/kuasar-sandboxer.service /etc/systemd/system/kuasar-sandboxer.service
if [ -e /etc/kuasar/sandboxer.toml ]; then
  echo "kept the existing /etc/kuasar/sandboxer.toml (example: hack/config/sandboxer.toml)"
else
  install -D -m 0644 hack/config/sandboxer.toml /etc/kuasar/sandboxer.toml
fi
cat <<EOT
installed ${BINS[*]} to /usr/local/bin
and the microVM guest image to /usr/local/share/kuasar/guest.
next:
  systemctl daemon-reload && systemctl enable --now kuasar-sandboxer
  kuasar-ctl health      # and: kuasar-ctl list, kuasar-ctl upgrade
  add the runtime to /etc/containerd/config.toml (hack/config/containerd-1.6.toml
  or hack/config/containerd-2.x.toml), make sure /usr/local/bin is in
  containerd's PATH, and restart containerd.
EOT
