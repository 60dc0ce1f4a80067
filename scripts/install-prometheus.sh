#!/usr/bin/env bash
# Installs Debian's `prometheus` package (prometheus + promtool) when either is missing.
# Needs root (CI runs as root). The package's init script is kept from starting a system
# Prometheus: the tests run their own on loopback.
set -euo pipefail

if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "install-prometheus.sh: prometheus/promtool missing; run as root or: sudo apt-get install prometheus" >&2
  exit 1
fi
echo "install-prometheus.sh: installing Debian's prometheus package"
export DEBIAN_FRONTEND=noninteractive
policy=/usr/sbin/policy-rc.d
placed_policy=""
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod +x "$policy"
  placed_policy=1
fi
cleanup() { if [ -n "$placed_policy" ]; then rm -f "$policy"; fi; }
trap cleanup EXIT
apt-get update -qq
apt-get install -y -qq --no-install-recommends prometheus >/dev/null
prometheus --version 2>&1 | head -1
