#!/usr/bin/env bash
# Stops what hack/up.sh started and removes its directory.
set -euo pipefail
cd "$(dirname "$0")/.."
VER=${1:-1.6}
source hack/lib/env.sh
kuasar_env_down "${KUASAR_UP_DIR:-/tmp/kuasar-up-$VER}"
