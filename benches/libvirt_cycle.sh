#!/usr/bin/env bash
# A steady-state replication cycle of a real QEMU guest, against rsync of the same qcow2 pair.
#
# Two libvirtd sites (as the tests start them), two agents with --runtime libvirt, and the test
# guest on a 4 GiB qcow2 disk, allocated in full, rewriting RECORDS records (one per 64 KiB
# block, 1% of the disk by default) every generation. After a baseline cycle, the next cycle
# holds exactly one generation of the guest's writes: the script prints the bytes it sent
# against the bytes the guest changed (at the 64 KiB granularity of QEMU's dirty bitmaps) and
# its duration, then times `rsync --inplace --no-whole-file` bringing a copy of the qcow2 taken
# at the baseline up to date, in the same run.
#
# Usage: benches/libvirt_cycle.sh BINARY [RECORDS]   (BINARY built with --features libvirt)
set -euo pipefail
bin="$(realpath "$1")"
records="${2:-655}"
cd "$(dirname "$0")/.."
for port in 7391 7392; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is in use; the benchmark's agents listen there" >&2
    exit 1
  fi
done
guest="$(scripts/guest-build.sh | tail -n1)"
work="$(mktemp -d /tmp/twinsite-bench.XXXXXX)"
cleanup() {
  pkill -f "$work/agent-" 2>/dev/null || true
  for f in "$work"/site-*/run/qemu/*.pid "$work"/site-*/run/libvirtd.pid "$work"/site-*/run/virtlogd.pid; do
    [[ -f "$f" ]] && kill "$(cat "$f")" 2>/dev/null || true
  done
  sleep 1
  rm -rf "$work"
}
trap cleanup EXIT

start_site() { # name
  local s="$work/site-$1"
  mkdir -p "$s"/{run,etc,lib,log,cache}
  cp /etc/libvirt/*.conf "$s/etc/" 2>/dev/null || true
  printf 'user = "root"\ngroup = "root"\ndynamic_ownership = 0\nsecurity_driver = "none"\n' >"$s/etc/qemu.conf"
  unshare -m -n --propagation private sh -c "ip link set lo up
    mount --bind $s/run /var/run/libvirt; mount --bind $s/etc /etc/libvirt
    mount --bind $s/lib /var/lib/libvirt; mount --bind $s/log /var/log/libvirt
    mkdir -p /var/cache/libvirt; mount --bind $s/cache /var/cache/libvirt
    virtlogd -d -p $s/run/virtlogd.pid; libvirtd -d -p $s/run/libvirtd.pid"
  for _ in $(seq 100); do virsh -c "qemu+unix:///system?socket=$s/run/libvirt-sock" version >/dev/null 2>&1 && return; sleep 0.2; done
  echo "libvirtd of $1 did not start" >&2; exit 1
}
start_site a
start_site b
ua="qemu+unix:///system?socket=$work/site-a/run/libvirt-sock"
ub="qemu+unix:///system?socket=$work/site-b/run/libvirt-sock"
echo tok >"$work/token"
"$bin" agent --site a --listen 127.0.0.1:7391 --data-dir "$work/agent-a" --token-file "$work/token" \
  --runtime libvirt --libvirt-uri "$ua" >"$work/a.log" 2>&1 &
"$bin" agent --site b --listen 127.0.0.1:7392 --data-dir "$work/agent-b" --token-file "$work/token" \
  --runtime libvirt --libvirt-uri "$ub" >"$work/b.log" 2>&1 &
sleep 1

# The guest's disk: 4 GiB, every cluster allocated (a full disk, as rsync would meet it).
disk="$work/bench.qcow2"
qemu-img create -q -f qcow2 -o preallocation=full "$disk" 4G
console="$work/console.log"
cat >"$work/bench.xml" <<XML
<domain type='qemu'><name>bench</name><memory unit='MiB'>192</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type><kernel>$guest/vmlinuz</kernel><initrd>$guest/initrd.gz</initrd>
<cmdline>console=ttyS0 twinsite.records=$records twinsite.pause=40</cmdline></os>
<features><acpi/></features><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='$disk'/><target dev='vda' bus='virtio'/></disk>
<serial type='file'><source path='$console'/><target port='0'/></serial><memballoon model='none'/></devices></domain>
XML
virsh -c "$ua" define "$work/bench.xml" >/dev/null
virsh -c "$ua" start bench >/dev/null

h=(-s -H "Authorization: Bearer tok" -H "content-type: application/json")
wrote() { grep -c "TWINSITE WROTE" "$console" 2>/dev/null || true; }
wait_wrote() { # count
  while [[ "$(wrote)" -lt "$1" ]]; do sleep 0.5; done
}
sent() { curl "${h[@]}" 127.0.0.1:7391/v1/vms/bench | python3 -c 'import json,sys; print(json.load(sys.stdin)["replication"]["bytesSent"])'; }
sync_now() { curl "${h[@]}" -XPOST -d "{\"operationId\":\"$1\"}" 127.0.0.1:7391/v1/vms/bench/replication/sync >/dev/null; }

wait_wrote 1
curl "${h[@]}" -XPOST -d '{"operationId":"acc","sourceSite":"a"}' 127.0.0.1:7392/v1/vms/bench/replication/accept >/dev/null
curl "${h[@]}" -XPOST -d '{"operationId":"en","peerSite":"b","peerUrl":"http://127.0.0.1:7392","peerToken":"tok","intervalSeconds":3600,"recoveryPointRetentionHours":0,"appConsistentFrequencyHours":0}' \
  127.0.0.1:7391/v1/vms/bench/replication/enable >/dev/null
t0=$(date +%s.%N)
until curl "${h[@]}" 127.0.0.1:7391/v1/vms/bench | grep -q '"state":"Replicating"'; do sleep 0.2; done
t1=$(date +%s.%N)
echo "initial replication of a full 4 GiB disk: $(sent) bytes in $(echo "$t1 - $t0" | bc) s"

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
