#!/usr/bin/env bash
# pisnoop: install everything on a fresh Debian 12 machine, then run the demo.
#   ./setup.sh            (as root) install, then show the appliance at work
#   ./setup.sh --no-demo  install only (CI)
# Not root? sudo ./setup.sh (a fresh minimal Debian has no sudo: log in as root).
# Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")"

demo=1
for arg in "$@"; do
  case "$arg" in
    --no-demo) demo=0 ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $arg (try --help)" >&2; exit 2 ;;
  esac
done

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh: run as root (./setup.sh as root, or sudo ./setup.sh): it installs packages and creates network namespaces" >&2
  exit 2
fi

APT_PACKAGES=(
  procps iproute2 iputils-ping ethtool tcpdump tcpreplay
  openvswitch-switch openvswitch-common
  prosody
  python3 python3-venv python3-dev gcc pkg-config libsystemd-dev libxxhash-dev
  systemd systemd-container debootstrap qemu-user-static binfmt-support util-linux
  chromium chromium-driver prometheus
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup.sh: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # never start the distribution's own OVS or Prosody: pisnoop runs its own instances
  made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; made_policy=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [ "$made_policy" -eq 1 ]; then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test,provision]' -e ./lab
echo "setup.sh: installed; pisnoop is .venv/bin/pisnoop"

if [ "$demo" -eq 1 ]; then
  exec .venv/bin/pisnoop demo
fi
