#!/usr/bin/env bash
# Guest write throughput of a real QEMU guest with replication off, then on (a libvirt
# checkpoint, so QEMU records every write in a persistent dirty bitmap), then off again.
#
# The test guest writes MIB MiB of zeros to its disk with `dd ... conv=fsync` (its own
# throughput line), every 5 s. The disk is a fully allocated 1 GiB qcow2. Replication is on
# between two phases with one cycle an hour, so no cycle runs while the guest writes: the
# figure is the dirty bitmap's cost, not the cost of reading changes. After the on phase the
# replication is stopped and its checkpoints deleted. Each phase prints RUNS throughputs and
# their median; the first run after a change is dropped.
#
# Usage: benches/libvirt_write.sh BINARY [MIB] [RUNS]   (BINARY built with --features libvirt)
mib="${2:-256}"
runs="${3:-7}"
# shellcheck source=benches/libvirt_sites.sh
source "$(dirname "$0")/libvirt_sites.sh"

define_guest 1G "twinsite.write=0 twinsite.bench=$mib twinsite.pause=5"
mark="TWINSITE BENCH"
# The throughput of the dd runs n+1 .. n+RUNS, in MB/s, with their median.
phase() { # name
  local n m
  n=$(($(wrote "$mark") + 1))
  m=$((n + runs))
  wait_wrote "$m" "$mark"
  grep "$mark" "$console" | sed -n "$((n + 1)),${m}p" | python3 -c '
import re, statistics, sys
v = []
for line in sys.stdin:
    x, unit = re.search(r"([0-9.]+)([MG]B)/s", line).groups()
    v.append(float(x) * (1000 if unit == "GB" else 1))
print(f"{sys.argv[1]:<26} MB/s: {v}  median {statistics.median(v):.1f}")' "$1"
}
wait_wrote 1 "$mark"
phase "replication off"
enable_replication
echo "checkpoints while on: $(virsh -c "$ua" checkpoint-list bench --name | grep -c .)"
phase "replication on (bitmap)"
curl "${h[@]}" -XPOST -d '{"operationId":"stop"}' 127.0.0.1:7391/v1/vms/bench/replication/stop >/dev/null
for cp in $(virsh -c "$ua" checkpoint-list bench --name); do
  virsh -c "$ua" checkpoint-delete bench "$cp" >/dev/null
done
phase "replication off again"
