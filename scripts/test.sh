#!/usr/bin/env bash
# The whole test suite: builds the local control plane binaries (cached), checks formatting and
# lints, then runs every test against a real etcd + kube-apiserver and real agent processes, and
# the real-VM tests against one libvirtd per site and QEMU guests.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== packages for real VMs (libvirt, QEMU, the test guest's busybox)"
# Keep in sync with DEBIAN_PACKAGES in src/envtest/libvirt.rs.
packages=(qemu-system-x86 qemu-utils libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
  libvirt-dev busybox-static iptables)
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
  apt-get install -y --no-install-recommends "${missing[@]}"
fi
# libvirt 9 resolves its default QEMU user at start even when qemu.conf says root.
if ! getent passwd libvirt-qemu >/dev/null; then
  if [[ $EUID -ne 0 ]]; then
    echo "the user libvirt-qemu is missing; run this script as root to create it" >&2
    exit 1
  fi
  echo "creating the system user libvirt-qemu"
  useradd -r -M -s /usr/sbin/nologin libvirt-qemu
fi

echo "== test guest (Debian kernel + busybox; cached after the first build)"
guest="$(scripts/guest-build.sh | tail -n1)"
export TWINSITE_GUEST_DIR="$guest"

echo "== control plane binaries (etcd, kube-apiserver, kubectl, helm; cached after the first build)"
bin="$(scripts/envtest-build.sh | tail -n1)"
export TWINSITE_ENVTEST_BIN="$bin"

echo "== cargo fmt --check"
cargo fmt --check

echo "== cargo clippy --all-targets -- -D warnings (without features, as any machine builds it, and with failpoints and libvirt)"
cargo clippy --locked --all-targets -- -D warnings
cargo clippy --locked --all-targets --features failpoints,libvirt -- -D warnings

echo "== cargo test"
# Library, binary and integration tests (there are no doctests). The failpoints feature compiles
# the crash points into the agent, for the crash-injection suite and the integrity tests; a
# release build never has them. The libvirt feature builds the real-VM runtime.
cargo test --locked --features failpoints,libvirt --lib --bins --tests -- \
    --skip agents_keep_their_promises_across_crashes_at_every_failpoint

echo "== crash injection (SIGKILL at every failpoint of the data path)"
# Its own run, so its closing line `injected crashes: N, invariant violations: M` is printed.
cargo test --locked --features failpoints,libvirt --test crash_injection -- --nocapture
