#!/usr/bin/env bash
# Builds the twinsite container image from Containerfile with buildah (daemonless: vfs storage,
# chroot isolation), from an already built binary:
#
#   scripts/image-build.sh [BINARY] [OUT]
#   scripts/image-build.sh --tools      (only install buildah and umoci)
#
# BINARY defaults to target/release/twinsite; the tests pass the binary their build produced.
# The image is written as an OCI layout to OUT (default target/image/oci), tagged with the
# chart's appVersion; its name is the chart's default image (image.repository:appVersion). The
# last line of stdout is `<OCI layout dir>:<tag> <image name>`. Installs buildah and umoci
# (Debian packages) when missing and run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

bin="${1:-target/release/twinsite}"
out="${2:-target/image/oci}"
log() { echo "[image-build $(date +%H:%M:%S)] $*" >&2; }

scripts/debian-packages.sh buildah umoci
[[ "$bin" == --tools ]] && exit 0
[[ -x "$bin" ]] || { echo "no binary at $bin (cargo build --release first)" >&2; exit 1; }

version="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/twinsite/Chart.yaml)"
repository="$(sed -n '/^image:/,/^[^ ]/s/^  repository: *//p' charts/twinsite/values.yaml)"
[[ -n "$version" && -n "$repository" ]] || { echo "cannot read the chart's image" >&2; exit 1; }
name="$repository:$version"

work="$(mktemp -d "${TMPDIR:-/tmp}/twinsite-image.XXXXXX")"
storage="$work/storage"
cleanup() {
  buildah --root "$storage/root" --runroot "$storage/run" --storage-driver vfs \
    rmi --all --force >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# The context: rootfs/ with the binary (without debug info), each shared library it loads at
# the path the loader finds it, CA certificates, and the user the chart runs as.
root="$work/context/rootfs"
mkdir -p "$root/usr/bin" "$root/etc/ssl/certs" "$root/tmp"
chmod 1777 "$root/tmp"
objcopy --strip-debug "$bin" "$root/usr/bin/twinsite"
chmod 0755 "$root/usr/bin/twinsite"
libs="$(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}')"
for lib in $libs; do
  real="$(readlink -f "$lib")"
  mkdir -p "$root$(dirname "$lib")"
  cp "$real" "$root$lib"
done
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/tmp:/sbin/nologin\n' \
  >"$root/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$root/etc/group"
cp Containerfile "$work/context/"
log "context: $(du -sh "$root" | cut -f1) ($(wc -w <<<"$libs") shared libraries)"

b=(buildah --root "$storage/root" --runroot "$storage/run" --storage-driver vfs)
"${b[@]}" build --quiet --isolation chroot --layers=false \
  --label "org.opencontainers.image.title=twinsite" \
  --label "org.opencontainers.image.version=$version" \
  -f "$work/context/Containerfile" -t "$name" "$work/context" >&2
rm -rf "$out"
mkdir -p "$(dirname "$out")"
"${b[@]}" push --quiet "$name" "oci:$out:$version" >&2
log "built $name into $out"
echo "$out:$version $name"
