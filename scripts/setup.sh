#!/usr/bin/env bash
# Installs everything Corral needs on a fresh Debian 12 machine (run as root):
# the Debian packages the daemons drive or are measured against, then a venv in .venv
# with Corral and its development tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  python3 python3-venv python3-dev gcc
  iproute2 iptables conntrack ethtool
  haproxy dnsmasq-base dnsutils nginx-light
  strongswan strongswan-swanctl strongswan-charon
  libstrongswan-standard-plugins libstrongswan-extra-plugins libcharon-extra-plugins  # openssl/gcm, kdf, kernel-libipsec
  containernetworking-plugins podman runc busybox-static
  curl procps psmisc util-linux
  iputils-ping iperf3 tcpdump  # overlay: acceptance probes and bench/overlay
  wrk dnsperf  # benchmarks only (bench/), never run in CI
  prometheus debootstrap  # containers/: promtool checks the scrape config and rules; build.sh makes the image's base
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's nginx/haproxy/dnsmasq/prometheus packages may start system services; Corral runs its own
# (and needs only promtool). Each is stopped and disabled, so it does not take port 80, 53 or 9090
# back after a reboot.
for svc in nginx haproxy dnsmasq prometheus; do
  (systemctl stop "$svc" || service "$svc" stop) >/dev/null 2>&1 || true
  systemctl disable "$svc" >/dev/null 2>&1 || true
  [ ! -e "/etc/init.d/$svc" ] || update-rc.d "$svc" disable >/dev/null 2>&1 || true
done

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[dev]'
echo "corral: set-up done (.venv)"
