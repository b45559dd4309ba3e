#!/usr/bin/env bash
# Installs a release build on this node: binaries, systemd unit, config.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins -p kuasar-sandboxer -p containerd-shim-kuasarrunc-v1 \
  -p containerd-shim-kuasarwasm-v1 -p containerd-shim-kuasarvmm-v1
install -m 0755 target/release/kuasar-sandboxer target/release/containerd-shim-kuasar{runc,wasm,vmm}-v1 /usr/local/bin/
install -D -m 0644 hack/systemd/kuasar-sandboxer.service /etc/systemd/system/kuasar-sandboxer.service
[ -e /etc/kuasar/sandboxer.toml ] || install -D -m 0644 hack/config/sandboxer.toml /etc/kuasar/sandboxer.toml
echo "installed; next: systemctl daemon-reload && systemctl enable --now kuasar-sandboxer"
echo "then add the runtime to containerd: hack/config/containerd-1.6.toml or containerd-2.x.toml"
