#!/usr/bin/env bash
# Builds the tiny Linux guest that twinsite's real-VM tests and demo boot under QEMU: a Debian
# kernel, busybox-static and an /init that writes a verifiable pattern to /dev/vda (the record
# format is documented in src/envtest/guest.rs, which also verifies it). Output, cached per
# kernel, busybox and version of this script:
#   vmlinuz             the kernel (direct kernel boot)
#   initrd.gz           the guest; honours the ACPI power button (busybox acpid, poweroff -f)
#   initrd-noacpi.gz    the same guest without acpid: it ignores a shutdown request
#   initrd-ga.gz        initrd.gz plus the QEMU guest agent (Debian's qemu-guest-agent, with the
#                       libraries ldd lists) on the virtio-serial port org.qemu.guest_agent.0,
#                       and an ext2 file system on /dev/vdb (made at first boot, mounted by the
#                       ext4 driver on /mnt) that a writer appends to: what a freeze freezes
# Prints the output directory on the last line of stdout.
#
# The kernel is pinned (TWINSITE_GUEST_KERNEL, an ABI such as 6.1.0-57) so results are
# reproducible; when the archive no longer carries it, the newest linux-image-6.1.0-*-amd64 it
# does carry is used instead, with a warning.
set -euo pipefail

KERNEL_ABI="${TWINSITE_GUEST_KERNEL:-6.1.0-57}"
CACHE="${TWINSITE_GUEST_DIR:-$HOME/.cache/twinsite-guest}"
SCRIPT_HASH="$(sha256sum "$0" | cut -c1-12)"

log() { echo "[guest-build $(date +%H:%M:%S)] $*" >&2; }
die() { log "error: $*"; exit 1; }

command -v busybox >/dev/null || die "busybox not found: apt-get install -y --no-install-recommends busybox-static"
BUSYBOX="$(command -v busybox)"
# A dynamic busybox would need its libraries in the initramfs.
if ldd "$BUSYBOX" >/dev/null 2>&1; then
  die "$BUSYBOX is dynamically linked: apt-get install -y --no-install-recommends busybox-static"
fi
BB_VERSION="$(dpkg-query -W -f '${Version}' busybox-static 2>/dev/null || echo unknown)"

mkdir -p "$CACHE"
# One build at a time: parallel test binaries may all ask for the guest.
exec 9>"$CACHE/.build.lock"
flock 9

tag_for() { echo "linux-$1-busybox-${BB_VERSION//[:~]/_}-$SCRIPT_HASH"; }

out="$CACHE/$(tag_for "$KERNEL_ABI")"
if [[ -s "$out/vmlinuz" && -s "$out/initrd.gz" && -s "$out/initrd-noacpi.gz" && -s "$out/initrd-ga.gz" ]]; then
  log "guest ready in $out (cached)"
  echo "$out"
  exit 0
fi

start=$SECONDS
work="$(mktemp -d "$CACHE/work.XXXXXX")"
trap 'rm -rf "$work"' EXIT
# apt-get download drops privileges to _apt and warns when _apt cannot write the directory.
chmod 755 "$work"
mkdir "$work/deb" && chmod 777 "$work/deb"

fetch_kernel() {
  local abi="$1" pkg
  for pkg in "linux-image-$abi-amd64-unsigned" "linux-image-$abi-amd64"; do
    if (cd "$work/deb" && apt-get download "$pkg" >&2 2>"$work/apt.err"); then
      log "downloaded $pkg"
      return 0
    fi
  done
  return 1
}

if ! fetch_kernel "$KERNEL_ABI"; then
  # The security archive drops old ABIs; take the newest one it still has.
  newest="$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64(-unsigned)?$' \
    | grep -oE '6\.1\.0-[0-9]+' | sort -V | tail -n1 || true)"
  [[ -n "$newest" ]] || die "no linux-image-6.1.0-*-amd64 package in the apt lists (run apt-get update): $(cat "$work/apt.err")"
  log "warning: pinned kernel $KERNEL_ABI is not downloadable; falling back to $newest (set TWINSITE_GUEST_KERNEL=$newest to pin it)"
  KERNEL_ABI="$newest"
  out="$CACHE/$(tag_for "$KERNEL_ABI")"
  if [[ -s "$out/vmlinuz" && -s "$out/initrd.gz" && -s "$out/initrd-noacpi.gz" && -s "$out/initrd-ga.gz" ]]; then
    log "guest ready in $out (cached)"
    echo "$out"
    exit 0
  fi
  fetch_kernel "$KERNEL_ABI" || die "cannot download linux-image-$KERNEL_ABI-amd64: $(cat "$work/apt.err")"
fi

dpkg -x "$work"/deb/linux-image-*.deb "$work/kernel"
moddir="$work/kernel/lib/modules/$KERNEL_ABI-amd64/kernel"
[[ -d "$moddir" ]] || die "no modules for $KERNEL_ABI-amd64 in the kernel package"

# Load order matters: each module needs the ones before it (no modprobe, no depmod in the guest).
MODULES="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk
failover net_failover virtio_net virtio_console evdev button"
# The guest agent variant's file system (loaded by its /init only).
FS_MODULES="crc16 mbcache jbd2 crc32c_generic ext4"

root="$work/root"
mkdir -p "$root"/{bin,dev,proc,sys,tmp,modules}
cp "$BUSYBOX" "$root/bin/busybox"
for m in $MODULES $FS_MODULES; do
  f="$(find "$moddir" -name "$m.ko" -o -name "$m.ko.xz" | head -n1)"
  [[ -n "$f" ]] || die "module $m not found in the kernel package"
  case "$f" in
    *.xz) xz -dc "$f" >"$root/modules/$m.ko" ;;
    *) cp "$f" "$root/modules/$m.ko" ;;
  esac
done
echo "$MODULES" | tr -s ' \n' '\n\n' >"$root/modules/order"

cat >"$root/init" <<'INIT'
#!/bin/busybox sh
# twinsite test guest. Kernel command line options:
#   twinsite.verify=1    check the pattern records on /dev/vda first and print
#                        "TWINSITE VERIFY ok gen=G records=N" or "TWINSITE VERIFY bad ..."
#   twinsite.write=0     do not write (default: write generation after generation forever)
#   twinsite.records=N   records per generation (default 32), record i at i MiB
#   twinsite.pause=S     seconds between generations (default 1)
#   twinsite.bench=M     instead of writing records: write M MiB from 64 MiB on, flushed, again and
#                        again (pause between runs), each run printed as
#                        "TWINSITE BENCH <MB/s>MB/s <M> MiB in <seconds> s"
#   twinsite.log=1       instead of generations: an append-only log. Record K (0, 1, ...) is written
#                        once, at byte offset K * 64 KiB, fsynced, then "TWINSITE LOGGED seq=K" is
#                        printed (the guest acknowledged it). At every boot the records from 0 are
#                        checked up to the first blank slot, and the 64 slots after it must be
#                        blank: "TWINSITE LOG ok count=C" (then it appends from C, one record per
#                        pause) or "TWINSITE LOG bad ..." (then it writes nothing).
#                        Log record layout (4096 bytes): the line "TWINSITE-LOG v1 seq=K" + "\n"
#                        repeated and cut at 4032 bytes, then the hex sha256 of those bytes.
# Record layout (4096 bytes): 4032 bytes of body, the line
#   "TWINSITE-RECORD v1 gen=G idx=I n=N" + "\n" repeated and cut at 4032 bytes,
# then the 64 lowercase hex digits of the body's sha256. A blank (all-zero) block is generation 0.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
console=/dev/console
say() { echo "$*" >"$console"; }

for m in $(cat /modules/order); do
  insmod "/modules/$m.ko" 2>/dev/null || say "TWINSITE init: insmod $m failed"
done

# The guest agent variant: a file system on /dev/vdb with a writer, and qemu-ga on its port.
if [ -x /bin/qemu-ga ]; then
  for m in crc16 mbcache jbd2 crc32c_generic ext4; do
    insmod "/modules/$m.ko" 2>/dev/null || say "TWINSITE init: insmod $m failed"
  done
  i=0
  while [ ! -b /dev/vdb ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
  mkdir -p /mnt /var/run /run
  if mount -t ext4 /dev/vdb /mnt 2>/dev/null || { mke2fs -F /dev/vdb >/dev/null 2>&1 && mount -t ext4 /dev/vdb /mnt; }; then
    say "TWINSITE FS mounted /dev/vdb"
    (n=0; while :; do echo "line $n" >>/mnt/log; sync; n=$((n + 1)); sleep 1; done) &
  else
    say "TWINSITE init: no file system on /dev/vdb"
  fi
  port=""
  for p in /sys/class/virtio-ports/*; do
    [ "$(cat "$p/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] && port="/dev/${p##*/}"
  done
  if [ -n "$port" ]; then
    qemu-ga -m virtio-serial -p "$port" -t /run >"$console" 2>&1 &
    say "TWINSITE GA started on $port"
  else
    say "TWINSITE init: no guest agent port"
  fi
fi

# The power button: poweroff on the ACPI event. Only the acpid variant has /etc/acpi; acpid must
# stay in the foreground (-d), as a daemon it exits at once in an initramfs.
if [ -x /etc/acpi/PWRF/00000080 ]; then
  acpid -d -c /etc/acpi >"$console" 2>&1 &
fi

verify=0 write=1 records=32 pause=1 bench=0 log=0
for opt in $(cat /proc/cmdline); do
  case "$opt" in
    twinsite.verify=*) verify="${opt#*=}" ;;
    twinsite.write=*) write="${opt#*=}" ;;
    twinsite.records=*) records="${opt#*=}" ;;
    twinsite.pause=*) pause="${opt#*=}" ;;
    twinsite.bench=*) bench="${opt#*=}" ;;
    twinsite.log=*) log="${opt#*=}" ;;
  esac
done

i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
[ -b /dev/vda ] || say "TWINSITE init: no /dev/vda"

head -c 4096 /dev/zero >/tmp/zero
line() { echo "TWINSITE-RECORD v1 gen=$1 idx=$2 n=$3"; }
# make_record G I N > file
make_record() {
  yes "$(line "$1" "$2" "$3")" | head -c 4032 >/tmp/body
  sum="$(sha256sum /tmp/body | cut -c1-64)"
  cat /tmp/body
  printf '%s' "$sum"
}

# The append-only log (twinsite.log=1): checked, then appended to forever.
if [ "$log" = 1 ]; then
  logline() { echo "TWINSITE-LOG v1 seq=$1"; }
  slots=$(( $(cat /sys/block/vda/size) / 128 ))
  count=0 bad=""
  while [ $count -lt $slots ]; do
    dd if=/dev/vda of=/tmp/rec bs=4096 skip=$((count * 16)) count=1 2>/dev/null
    cmp -s /tmp/rec /tmp/zero && break
    head -c 4032 /tmp/rec >/tmp/body
    if [ "$(head -n1 /tmp/body)" != "$(logline $count)" ]; then
      bad="record=$count is not log record $count"; break
    fi
    if [ "$(tail -c 64 /tmp/rec)" != "$(sha256sum /tmp/body | cut -c1-64)" ]; then
      bad="record=$count checksum mismatch"; break
    fi
    count=$((count + 1))
  done
  # Each record is durable before the next is written: nothing follows the first blank slot.
  i=$((count + 1))
  while [ -z "$bad" ] && [ $i -lt $((count + 65)) ] && [ $i -lt $slots ]; do
    dd if=/dev/vda of=/tmp/rec bs=4096 skip=$((i * 16)) count=1 2>/dev/null
    cmp -s /tmp/rec /tmp/zero || bad="record=$i written after blank record=$count"
    i=$((i + 1))
  done
  if [ -n "$bad" ]; then
    say "TWINSITE LOG bad $bad"
  else
    say "TWINSITE LOG ok count=$count"
    seq=$count
    while [ "$write" != 0 ] && [ $seq -lt $slots ]; do
      yes "$(logline $seq)" | head -c 4032 >/tmp/body
      { cat /tmp/body; printf '%s' "$(sha256sum /tmp/body | cut -c1-64)"; } >/tmp/rec
      if dd if=/tmp/rec of=/dev/vda bs=4096 seek=$((seq * 16)) count=1 conv=notrunc,fsync 2>/dev/null; then
        say "TWINSITE LOGGED seq=$seq"
      else
        say "TWINSITE init: write of log record $seq failed"; break
      fi
      seq=$((seq + 1))
      sleep "$pause"
    done
  fi
  while :; do sleep 3600; done
fi

# Reads every record. Sets max (the highest generation seen), complete (the newest complete
# generation), partial (how many records already hold the generation after it) and bad (why the
# records are not a consistent pattern; empty when they are).
scan() {
  max=0 first="" prev="" bad="" partial=0
  i=0
  while [ $i -lt "$records" ]; do
    dd if=/dev/vda of=/tmp/rec bs=4096 skip=$((i * 256)) count=1 2>/dev/null
    g=0
    if ! cmp -s /tmp/rec /tmp/zero; then
      head -c 4032 /tmp/rec >/tmp/body
      fields="$(head -n1 /tmp/body | sed -n 's/^TWINSITE-RECORD v1 gen=\([0-9]*\) idx=\([0-9]*\) n=\([0-9]*\)$/\1 \2 \3/p')"
      set -- $fields
      if [ -z "$fields" ]; then
        [ -n "$bad" ] || bad="record=$i is not a pattern record"
      elif [ "$(tail -c 64 /tmp/rec)" != "$(sha256sum /tmp/body | cut -c1-64)" ]; then
        [ -n "$bad" ] || bad="record=$i checksum mismatch"
      elif [ "$2" != "$i" ] || [ "$3" != "$records" ]; then
        [ -n "$bad" ] || bad="record=$i holds idx=$2 n=$3"
      else
        g="$1"
        make_record "$1" "$2" "$3" >/tmp/want
        cmp -s /tmp/rec /tmp/want || { [ -n "$bad" ] || bad="record=$i content mismatch"; }
      fi
    fi
    [ "$g" -gt "$max" ] && max="$g"
    # Records are written in index order, one generation after the other, so the disk holds
    # G+1 ... G+1 G ... G: never an older record before a newer one, never two generations apart.
    if [ -z "$first" ]; then
      first="$g"
    elif [ -z "$bad" ] && { [ "$g" -gt "$prev" ] || [ "$g" -lt $((first - 1)) ]; }; then
      bad="record=$i gen=$g after gen=$prev"
    fi
    [ "$g" = "$first" ] && partial=$((partial + 1))
    prev="$g"
    i=$((i + 1))
  done
  complete="$prev"
  [ "$first" = "$complete" ] && partial=0
}

scan
if [ "$verify" = 1 ]; then
  if [ -n "$bad" ]; then
    say "TWINSITE VERIFY bad $bad"
  else
    say "TWINSITE VERIFY ok gen=$complete records=$records partial=$partial"
  fi
fi

if [ "$bench" != 0 ]; then
  while :; do
    t0=$(cut -d' ' -f1 /proc/uptime)
    dd if=/dev/zero of=/dev/vda bs=1M seek=64 count="$bench" conv=fsync 2>/dev/null
    t1=$(cut -d' ' -f1 /proc/uptime)
    say "TWINSITE BENCH $(awk -v m="$bench" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1fMB/s %s MiB in %.2f s", m * 1.048576 / (b - a), m, b - a }')"
    sleep "$pause"
  done
fi
if [ "$write" != 0 ]; then
  # A generation cut short (a crash, a failover) is completed first: starting the next one
  # would leave three generations on the disk until it is done.
  if [ "$partial" -gt 0 ]; then gen=$max; else gen=$((max + 1)); fi
  while :; do
    i=0
    while [ $i -lt "$records" ]; do
      make_record "$gen" "$i" "$records" >/tmp/rec
      dd if=/tmp/rec of=/dev/vda bs=4096 seek=$((i * 256)) count=1 conv=notrunc,fsync 2>/dev/null \
        || say "TWINSITE init: write of record $i failed"
      i=$((i + 1))
    done
    say "TWINSITE WROTE gen=$gen"
    gen=$((gen + 1))
    sleep "$pause"
  done
fi
while :; do sleep 3600; done
INIT
chmod 755 "$root/init"

pack() { (cd "$root" && find . | "$BUSYBOX" cpio -o -H newc 2>/dev/null | gzip -9) >"$1"; }

mkdir -p "$work/out"
cp "$work/kernel/boot/vmlinuz-$KERNEL_ABI-amd64" "$work/out/vmlinuz"
pack "$work/out/initrd-noacpi.gz"
mkdir -p "$root/etc/acpi/PWRF"
printf '#!/bin/sh\nsync\npoweroff -f\n' >"$root/etc/acpi/PWRF/00000080"
chmod 755 "$root/etc/acpi/PWRF/00000080"
pack "$work/out/initrd.gz"
# The guest agent variant: qemu-ga and the libraries it links (from this host, as ldd finds them;
# Debian 12's qemu-system-x86 pulls in the same ones).
mkdir "$work/qga"
chmod 777 "$work/deb"
(cd "$work/deb" && apt-get download qemu-guest-agent >&2 2>"$work/apt.err") \
  || die "cannot download qemu-guest-agent: $(cat "$work/apt.err")"
dpkg -x "$work"/deb/qemu-guest-agent_*.deb "$work/qga"
cp "$work/qga/usr/sbin/qemu-ga" "$root/bin/qemu-ga"
ldd "$root/bin/qemu-ga" | grep -oE '/[^ ]+' | while read -r lib; do
  [[ -e "$lib" ]] || die "qemu-ga needs $lib, which this host lacks (apt-get install libglib2.0-0)"
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
if ldd "$root/bin/qemu-ga" | grep -q 'not found'; then
  die "qemu-ga needs libraries this host lacks: $(ldd "$root/bin/qemu-ga" | grep 'not found')"
fi
pack "$work/out/initrd-ga.gz"
echo "$KERNEL_ABI" >"$work/out/kernel-abi"

rm -rf "$out"
mv "$work/out" "$out"
log "guest built in $out ($((SECONDS - start))s)"
echo "$out"
