#!/usr/bin/env bash
# The whole test suite: builds the local control plane binaries (cached), checks formatting and
# lints, then runs every test against a real etcd + kube-apiserver and real agent processes, and
# the real-VM tests against one libvirtd per site and QEMU guests.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== packages for real VMs (libvirt, QEMU, the test guest's busybox)"
scripts/vm-packages.sh

echo "== tools for the chart's operations tests (lua5.4 for the Argo CD health check, promtool; cached)"
ops_bin="$(scripts/ops-packages.sh | tail -n1)"
export TWINSITE_PROMTOOL="$ops_bin/promtool"

echo "== test guest (Debian kernel + busybox; cached after the first build)"
guest="$(scripts/guest-build.sh | tail -n1)"
export TWINSITE_GUEST_DIR="$guest"

echo "== control plane binaries (etcd, kube-apiserver, kubectl, helm; cached after the first build)"
bin="$(scripts/envtest-build.sh | tail -n1)"
export TWINSITE_ENVTEST_BIN="$bin"

echo "== image tools (buildah, umoci: tests/image.rs builds the image from the test build's binary)"
scripts/image-build.sh --tools

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
    --skip agents_keep_their_promises_across_crashes_at_every_failpoint --skip ::fuzz::fuzz_

echo "== fuzz (property tests of the block-stream decoder and the agent's JSON bodies)"
# Its own run, so each target's line `fuzz <target>: inputs: N, crashes: 0` is printed.
cargo test --locked --features failpoints,libvirt --lib ::fuzz::fuzz_ -- --nocapture

echo "== crash injection (SIGKILL and power cut at every failpoint of the data path)"
# Its own run, so its closing line `injected crashes: N, power cuts: P, invariant violations: M`
# is printed. The power cuts run the agents on a FUSE mount (as root: /dev/fuse only).
cargo test --locked --features failpoints,libvirt --test crash_injection -- --nocapture
