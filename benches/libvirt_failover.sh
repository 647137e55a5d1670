#!/usr/bin/env bash
# A planned failover of a real QEMU guest, step by step, as the controller runs it: from the
# ACPI shutdown request to the guest running at the secondary and finding its data there.
#
# The test guest runs on a fully allocated 4 GiB qcow2 disk, rewriting RECORDS records (one per
# 64 KiB block, 1% of the disk by default) every generation, replicated to site b. One
# generation after a cycle (1% of the disk to sync), the steps of a PlannedFailover job are called on the agents in the
# controller's order (ShutdownSource, SyncRemaining, VerifyDigests, StopReplication,
# StartAtTarget), each timed; then the time until the guest at site b prints that it verified
# every record it wrote. The controller adds its own reconcile latency (a second or two) between
# steps; this isolates what the sites do.
#
# Usage: benches/libvirt_failover.sh BINARY [RECORDS]   (BINARY built with --features libvirt)
records="${2:-655}"
# shellcheck source=benches/libvirt_sites.sh
source "$(dirname "$0")/libvirt_sites.sh"

define_guest 4G "twinsite.verify=1 twinsite.records=$records twinsite.pause=20"
wait_wrote 1
enable_replication
n=$(($(wrote) + 1))
wait_wrote "$n"
sync_now base
wait_wrote $((n + 1))

post() { # port route body
  local out
  out=$(curl "${h[@]}" -w '\n%{http_code}' -XPOST -d "$3" "127.0.0.1:$1/v1/vms/bench/$2")
  [[ "${out##*$'\n'}" == 2* ]] || { echo "POST $2 at $1: ${out}" >&2; exit 1; }
}
digest() { curl "${h[@]}" "127.0.0.1:$1/v1/vms/bench/disks/vda/digest"; }
step() { # name command...
  local t
  t=$(now)
  "${@:2}"
  printf '%-16s %6.2f s\n' "$1" "$(since "$t")"
}
verify_digests() { # both sites hash at once, as the controller asks them
  digest 7391 >"$work/digest-a" &
  local a=$!
  digest 7392 >"$work/digest-b"
  wait "$a"
  cmp -s "$work/digest-a" "$work/digest-b" || { echo "digests differ" >&2; exit 1; }
}
stop_replication() {
  post 7391 replication/stop '{"operationId":"fo-stop-source"}'
  post 7392 replication/stop '{"operationId":"fo-stop-target"}'
}
at_b="$work/agent-b/vms/bench/console.log"
t0=$(now)
step ShutdownSource post 7391 power '{"action":"Shutdown","operationId":"fo-shutdown"}'
before=$(sent)
step SyncRemaining post 7391 replication/sync '{"operationId":"fo-sync"}'
echo "                 ($(($(sent) - before)) bytes sent)"
step VerifyDigests verify_digests
step StopReplication stop_replication
step StartAtTarget post 7392 failover '{"operationId":"fo-start","recoveryPoint":"Latest"}'
t=$(now)
until grep -q "TWINSITE VERIFY" "$at_b" 2>/dev/null; do sleep 0.2; done
printf '%-16s %6.2f s  (%s)\n' "guest verified" "$(since "$t")" "$(grep -m1 "TWINSITE VERIFY" "$at_b")"
printf '%-16s %6.2f s\n' "total" "$(since "$t0")"
