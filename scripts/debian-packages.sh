#!/usr/bin/env bash
# Installs the Debian packages named as arguments that are missing (apt-get, as root); says
# which are missing and exits 1 when not root. Everything it prints goes to stderr, so callers
# keep their stdout for their own answer.
#
#   scripts/debian-packages.sh PACKAGE...
set -euo pipefail
exec 1>&2
missing=()
for p in "$@"; do
  dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
((${#missing[@]})) || exit 0
if [[ $EUID -ne 0 ]]; then
  echo "missing Debian packages: ${missing[*]}; run this as root to install them" >&2
  exit 1
fi
echo "[debian-packages $(date +%H:%M:%S)] installing: ${missing[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
