#!/usr/bin/env bash
# Installs the Debian packages the chart's operations tests need when any is missing: lua5.4
# (runs the Argo CD health check against real status objects) and prometheus (its promtool
# checks and unit-tests the PrometheusRule). Needs root for what is missing; says so otherwise.
set -euo pipefail
# Keep in sync with the tools tests/chart.rs looks for.
packages=(lua5.4 prometheus)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $EUID -ne 0 ]]; then
    echo "missing Debian packages: ${missing[*]}; run this script as root to install them" >&2
    exit 1
  fi
  echo "installing: ${missing[*]}"
  apt-get update
  # The prometheus package only provides promtool here; its service is not started (no init
  # system in a test container, and policy-rc.d keeps a real one from starting it).
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi
