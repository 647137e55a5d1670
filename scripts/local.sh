#!/usr/bin/env bash
# The local demo (`twinsite local`) with real VMs where this machine can run them: as root on
# Debian it installs libvirt and QEMU when missing and starts a libvirtd per site with a real
# QEMU guest. Anywhere else it says why and starts the builtin runtime (VMs inside the agents).
# Arguments go to `twinsite local`.
set -euo pipefail
cd "$(dirname "$0")/.."

why=""
if [[ $EUID -ne 0 ]]; then
  why="real VMs need root (for libvirtd and its namespaces)"
elif ! command -v apt-get >/dev/null || ! command -v dpkg-query >/dev/null; then
  why="real VMs need a Debian machine here (apt-get installs libvirt and QEMU)"
elif ! scripts/vm-packages.sh; then
  why="installing libvirt and QEMU failed (see above)"
fi

if [[ -z "$why" ]]; then
  echo "== real VMs: a libvirtd per site and a QEMU guest"
  exec cargo run --features libvirt -- local --runtime libvirt "$@"
fi
echo "== $why; starting the builtin runtime (VMs inside the agents) instead" >&2
exec cargo run -- local "$@"
