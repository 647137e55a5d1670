#!/usr/bin/env bash
# Builds the local control plane that twinsite's tests and demo run against:
# etcd, kube-apiserver and kubectl (same Kubernetes release) and helm, all from Go
# modules at pinned versions. Binaries are cached; a rebuild happens only when a
# pinned version changes. Prints the bin directory on the last line of stdout.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.35.4}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.5}"
HELM_VERSION="${HELM_VERSION:-v3.19.0}"

CACHE="${TWINSITE_ENVTEST_CACHE:-$HOME/.cache/twinsite-envtest}"
BIN="$CACHE/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-helm-$HELM_VERSION/bin"
export GOMODCACHE="${GOMODCACHE:-$CACHE/gomod}"
export GOCACHE="${GOCACHE:-$CACHE/gocache}"
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod

log() { echo "[envtest-build $(date +%H:%M:%S)] $*" >&2; }
mkdir -p "$BIN" "$CACHE"

have() { [[ -x "$BIN/$1" ]]; }

# Progress while a long Go build runs in silence.
with_heartbeat() {
  local what="$1"; shift
  local start=$SECONDS
  ( while sleep 30; do log "still building $what ($((SECONDS - start))s)"; done ) &
  local hb=$!
  local rc=0
  "$@" || rc=$?
  kill "$hb" 2>/dev/null || true
  wait "$hb" 2>/dev/null || true
  log "$what done in $((SECONDS - start))s (exit $rc)"
  return "$rc"
}

build_kubernetes() {
  local work="$CACHE/work-k8s-$K8S_VERSION"
  mkdir -p "$work"
  cd "$work"
  # Start from a fresh module each time: a half-finished earlier try must not leak in.
  rm -f go.mod go.sum
  go mod init twinsite.local/envtest-k8s >/dev/null 2>&1
  log "downloading k8s.io/kubernetes@$K8S_VERSION metadata"
  local gomod
  gomod="$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')"
  local staging="v0.${K8S_VERSION#v1.}"
  # The kubernetes go.mod replaces its staging modules with local paths; as a
  # dependency those replaces are ignored, so pin each to its published version.
  local args=()
  while read -r mod; do
    args+=("-replace=$mod=$mod@$staging")
  done < <(grep -oE '^\s*k8s.io/[a-z0-9-]+ => \./staging' "$gomod" | awk '{print $1}')
  log "pinning ${#args[@]} staging modules to $staging"
  go mod edit "${args[@]}"
  with_heartbeat "module download for kubernetes $K8S_VERSION" \
    go get "k8s.io/kubernetes@$K8S_VERSION" >&2
  go get -tool "k8s.io/kubernetes/cmd/kube-apiserver@$K8S_VERSION" "k8s.io/kubernetes/cmd/kubectl@$K8S_VERSION" >&2
  local minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  local ld=""
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  done
  with_heartbeat "kube-apiserver $K8S_VERSION" \
    go build -ldflags "-s -w$ld" -o "$BIN/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
  with_heartbeat "kubectl $K8S_VERSION" \
    go build -ldflags "-s -w$ld" -o "$BIN/kubectl" k8s.io/kubernetes/cmd/kubectl
}

build_etcd() {
  local work="$CACHE/work-etcd-$ETCD_VERSION"
  mkdir -p "$work"
  cd "$work"
  rm -f go.mod go.sum
  go mod init twinsite.local/envtest-etcd >/dev/null 2>&1
  with_heartbeat "module download for etcd $ETCD_VERSION" \
    go get -tool "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >&2
  with_heartbeat "etcd $ETCD_VERSION" \
    go build -ldflags "-s -w" -o "$BIN/etcd" go.etcd.io/etcd/server/v3
}

build_helm() {
  local work="$CACHE/work-helm-$HELM_VERSION"
  mkdir -p "$work"
  cd "$work"
  rm -f go.mod go.sum
  go mod init twinsite.local/envtest-helm >/dev/null 2>&1
  with_heartbeat "module download for helm $HELM_VERSION" \
    go get -tool "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2
  with_heartbeat "helm $HELM_VERSION" \
    go build -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" -o "$BIN/helm" helm.sh/helm/v3/cmd/helm
}

# One build at a time: parallel test binaries may all ask for the binaries.
exec 9>"$CACHE/.build.lock"
flock 9

start=$SECONDS
have etcd || build_etcd
have kube-apiserver && have kubectl || build_kubernetes
if [[ "${TWINSITE_SKIP_HELM:-}" != 1 ]]; then have helm || build_helm; fi
log "control plane binaries ready in $BIN ($((SECONDS - start))s)"
echo "$BIN"
