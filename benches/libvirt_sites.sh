# Sourced by the libvirt benchmarks: two libvirtd sites (each in its own mount and network
# namespace, as the tests start them) and an agent with --runtime libvirt at each, on ports
# 7391 (site a) and 7392 (site b), token "tok". Sets bin, guest, work, ua, ub, h; defines
# define_guest, wrote, wait_wrote, vm_field, sent, sync_now, enable_replication.
# Needs: BINARY (built with --features libvirt) as $1; root (unshare, mounts).
set -euo pipefail
bin="$(realpath "$1")"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
for port in 7391 7392; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is in use; the benchmark's agents listen there" >&2
    exit 1
  fi
done
# What the benchmarks run and compare against (rsync is the cycle's reference; bc does the
# arithmetic): installed when missing, or named in a clear message when not root.
scripts/vm-packages.sh
scripts/debian-packages.sh rsync bc curl
guest="$(scripts/guest-build.sh | tail -n1)"
work="$(mktemp -d /tmp/twinsite-bench.XXXXXX)"
cleanup() {
  pkill -f "$work/agent-" 2>/dev/null || true
  for f in "$work"/site-*/run/qemu/*.pid "$work"/site-*/run/libvirtd.pid "$work"/site-*/run/virtlogd.pid; do
    [[ -f "$f" ]] && kill "$(cat "$f" 2>/dev/null)" 2>/dev/null || true
  done
  sleep 1
  [[ -n "${KEEP:-}" ]] || rm -rf "$work"
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
# The guest boots its kernel directly: a replica may only name boot files under --boot-file-dir.
"$bin" agent --site a --listen 127.0.0.1:7391 --data-dir "$work/agent-a" --token-file "$work/token" \
  --insecure-http --runtime libvirt --libvirt-uri "$ua" --boot-file-dir "$guest" >"$work/a.log" 2>&1 &
"$bin" agent --site b --listen 127.0.0.1:7392 --data-dir "$work/agent-b" --token-file "$work/token" \
  --insecure-http --runtime libvirt --libvirt-uri "$ub" --boot-file-dir "$guest" >"$work/b.log" 2>&1 &
sleep 1

h=(-s -H "Authorization: Bearer tok" -H "content-type: application/json")
console="$work/console.log"

define_guest() { # size cmdline: the test guest "bench" at site a on a fully allocated qcow2 disk
  disk="$work/bench.qcow2"
  qemu-img create -q -f qcow2 -o preallocation=full "$disk" "$1"
  cat >"$work/bench.xml" <<XML
<domain type='qemu'><name>bench</name><memory unit='MiB'>192</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type><kernel>$guest/vmlinuz</kernel><initrd>$guest/initrd.gz</initrd>
<cmdline>console=ttyS0 $2</cmdline></os>
<features><acpi/></features><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='$disk'/><target dev='vda' bus='virtio'/></disk>
<serial type='file'><source path='$console'/><target port='0'/></serial><memballoon model='none'/></devices></domain>
XML
  virsh -c "$ua" define "$work/bench.xml" >/dev/null
  virsh -c "$ua" start bench >/dev/null
}
wrote() { grep -c "${1:-TWINSITE WROTE}" "$console" 2>/dev/null || true; }
wait_wrote() { # count [mark]
  while [[ "$(wrote "${2:-TWINSITE WROTE}")" -lt "$1" ]]; do sleep 0.5; done
}
vm_field() { # port python-expression-on-vm
  curl "${h[@]}" "127.0.0.1:$1/v1/vms/bench" | python3 -c "import json,sys; vm=json.load(sys.stdin); print($2)"
}
sent() { vm_field 7391 'vm["replication"]["bytesSent"]'; }
sync_now() { curl "${h[@]}" -XPOST -d "{\"operationId\":\"$1\"}" 127.0.0.1:7391/v1/vms/bench/replication/sync >/dev/null; }
enable_replication() { # a -> b, one cycle an hour (the benchmark asks for cycles itself)
  curl "${h[@]}" -XPOST -d '{"operationId":"acc","sourceSite":"a"}' 127.0.0.1:7392/v1/vms/bench/replication/accept >/dev/null
  curl "${h[@]}" -XPOST -d '{"operationId":"en","peerSite":"b","peerUrl":"http://127.0.0.1:7392","peerToken":"tok","intervalSeconds":3600,"recoveryPointRetentionHours":0,"appConsistentFrequencyHours":0}' \
    127.0.0.1:7391/v1/vms/bench/replication/enable >/dev/null
  until curl "${h[@]}" 127.0.0.1:7391/v1/vms/bench | grep -q '"state":"Replicating"'; do sleep 0.2; done
}
now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc; }
