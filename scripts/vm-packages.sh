#!/usr/bin/env bash
# Installs the Debian packages real VMs need (libvirt, QEMU, the test guest's busybox) when any is
# missing, and the user libvirt 9 expects. Needs root for what is missing; says so otherwise.
set -euo pipefail
# Keep in sync with DEBIAN_PACKAGES in src/envtest/libvirt.rs.
packages=(qemu-system-x86 qemu-utils libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
  libvirt-dev busybox-static iptables)
"$(dirname "$0")/debian-packages.sh" "${packages[@]}"
# libvirt 9 resolves its default QEMU user at start even when qemu.conf says root.
if ! getent passwd libvirt-qemu >/dev/null; then
  if [[ $EUID -ne 0 ]]; then
    echo "the user libvirt-qemu is missing; run this script as root to create it" >&2
    exit 1
  fi
  echo "creating the system user libvirt-qemu"
  useradd -r -M -s /usr/sbin/nologin libvirt-qemu
fi

