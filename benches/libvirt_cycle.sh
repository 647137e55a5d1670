#!/usr/bin/env bash
# A steady-state replication cycle of a real QEMU guest, against rsync of the same qcow2 pair.
#
# Two libvirtd sites (as the tests start them), two agents with --runtime libvirt, and the test
# guest on a 4 GiB qcow2 disk, allocated in full, rewriting RECORDS records (one per 64 KiB
# block, 1% of the disk by default) every generation. The initial replication is timed beside
# `dd bs=4M conv=fsync` of the same file, in the same run. After a baseline cycle, the next cycle
# holds exactly one generation of the guest's writes: the script prints the bytes it sent
# against the bytes the guest changed (at the 64 KiB granularity of QEMU's dirty bitmaps) and
# its duration, then times `rsync --inplace --no-whole-file` bringing a copy of the qcow2 taken
# at the baseline up to date, in the same run.
#
# Usage: benches/libvirt_cycle.sh BINARY [RECORDS]   (BINARY built with --features libvirt)
records="${2:-655}"
# shellcheck source=benches/libvirt_sites.sh
source "$(dirname "$0")/libvirt_sites.sh"

# The guest's disk: 4 GiB, every cluster allocated (a full disk, as rsync would meet it).
define_guest 4G "twinsite.records=$records twinsite.pause=40"

wait_wrote 1
t0=$(now)
enable_replication
initial=$(since "$t0")
echo "initial replication of a full 4 GiB disk: $(sent) bytes in $initial s"
# Its reference in the same run: a plain copy of the same file to the same disk, made durable
# (`cp` is none: it copies qemu's preallocated zeroes sparse).
t0=$(now)
dd if="$disk" of="$work/dd-copy.qcow2" bs=4M conv=fsync status=none
copied=$(since "$t0")
rm -f "$work/dd-copy.qcow2"
echo "dd bs=4M conv=fsync of the same qcow2: $copied s; initial replication at $(echo "scale=2; $copied / $initial" | bc)x its speed"

# Baseline right after a generation, then the cycle of exactly the next one.
n=$(($(wrote) + 1))
wait_wrote "$n"
sync_now base
cp --sparse=always "$disk" "$work/rsync-copy.qcow2"
before=$(sent)
wait_wrote $((n + 1))
t0=$(date +%s.%N)
sync_now cycle
t1=$(date +%s.%N)
after=$(sent)
changed=$((records * 65536))
echo "records rewritten by the guest: $records of $((4 * 1024 * 16)) blocks"
echo "changed (64 KiB blocks): $changed bytes; sent: $((after - before)) bytes; cycle: $(echo "$t1 - $t0" | bc) s"
# The same pair, brought up to date by rsync's delta algorithm (the source is read in full on
# both sides, as rsync must).
virsh -c "$ua" suspend bench >/dev/null
t0=$(date +%s.%N)
rsync --inplace --no-whole-file --stats "$disk" "$work/rsync-copy.qcow2" | grep -E "Literal data|Total file size"
t1=$(date +%s.%N)
virsh -c "$ua" resume bench >/dev/null
echo "rsync --inplace --no-whole-file of the qcow2 pair: $(echo "$t1 - $t0" | bc) s"
