#!/usr/bin/env bash
# Installs the Debian packages a local test node needs (containerd, runc, CNI plugins, iptables,
# conntrack), when they are missing. Needs root and apt; without them it says what is missing and
# exits 3, so callers can skip node tests with that reason (KEYLESS_REQUIRE_NODE=1 turns it into a
# failure). Usage: tools/install-node-packages.sh [--check]
set -euo pipefail

PACKAGES=(containerd runc containernetworking-plugins iptables conntrack iproute2 util-linux git)
need() {
  local missing=()
  command -v containerd >/dev/null || missing+=(containerd)
  command -v runc >/dev/null || missing+=(runc)
  [ -x /usr/lib/cni/bridge ] && [ -x /usr/lib/cni/host-local ] && [ -x /usr/lib/cni/loopback ] || missing+=(containernetworking-plugins)
  command -v iptables >/dev/null || missing+=(iptables)
  command -v conntrack >/dev/null || missing+=(conntrack)
  command -v ip >/dev/null || missing+=(iproute2)
  command -v unshare >/dev/null && command -v nsenter >/dev/null || missing+=(util-linux)
  command -v git >/dev/null || missing+=(git)
  printf '%s\n' "${missing[@]}"
}

missing=$(need)
[ -z "$missing" ] && exit 0
if [ "${1:-}" = "--check" ]; then
  echo "node packages missing: $(echo $missing)" >&2
  exit 3
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "install-node-packages: missing $(echo $missing); installing them needs root and apt-get" \
       "(run as root: apt-get install -y ${PACKAGES[*]})" >&2
  exit 3
fi
echo "install-node-packages: installing $(echo $missing) from Debian (first time only)" >&2
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
if ! { apt-get update -q && apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"; } >"$log" 2>&1; then
  echo "install-node-packages: apt-get failed; last lines of $log:" >&2
  tail -n 20 "$log" >&2
  exit 1
fi
rm -f "$log"
# containerd's package enables a system service; the test nodes run their own containerd instances.
missing=$(need)
[ -z "$missing" ] || { echo "install-node-packages: still missing after install: $(echo $missing)" >&2; exit 1; }
