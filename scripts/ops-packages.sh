#!/usr/bin/env bash
# What the chart's operations tests need, from Debian: lua5.4 (runs the Argo CD health check
# against real status objects), installed when missing (as root); and promtool (checks and
# unit-tests the PrometheusRule), taken out of Debian's prometheus package into a cache rather
# than installing the package, which would also set up a Prometheus server service. Prints the
# directory holding promtool on the last line of stdout.
set -euo pipefail
CACHE="${TWINSITE_OPS_CACHE:-$HOME/.cache/twinsite-ops}"
log() { echo "[ops-packages] $*" >&2; }

"$(dirname "$0")/debian-packages.sh" lua5.4

version="$(apt-cache policy prometheus 2>/dev/null | awk '/Candidate:/ {print $2}')"
if [[ -z "$version" || "$version" == "(none)" ]]; then
  if [[ $EUID -ne 0 ]]; then
    log "the package lists know no prometheus package; run this script as root (apt-get update)"
    exit 1
  fi
  apt-get update >&2
  version="$(apt-cache policy prometheus | awk '/Candidate:/ {print $2}')"
fi
bin="$CACHE/prometheus-${version//[^A-Za-z0-9.+~-]/_}/bin"
if [[ ! -x "$bin/promtool" ]]; then
  log "extracting promtool from prometheus $version"
  work="$(mktemp -d)"
  chmod 755 "$work"  # apt downloads as its own user
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && apt-get download "prometheus=$version" >&2)
  dpkg-deb -x "$work"/prometheus_*.deb "$work/root"
  mkdir -p "$bin"
  install -m 0755 "$work/root/usr/bin/promtool" "$bin/promtool.tmp"
  mv "$bin/promtool.tmp" "$bin/promtool"
fi
"$bin/promtool" --version >/dev/null
echo "$bin"
