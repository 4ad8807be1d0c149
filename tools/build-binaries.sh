#!/usr/bin/env bash
# Builds the real Kubernetes parts our tests run against, from Go modules, into a cache outside the
# repo. Each binary is skipped when already cached. Usage: tools/build-binaries.sh [component...]
set -euo pipefail

KUBE_VERSION="${KEYLESS_KUBE_VERSION:-v1.37.2}"
ETCD_VERSION="${KEYLESS_ETCD_VERSION:-v3.6.16}"
HELM_VERSION="${KEYLESS_HELM_VERSION:-v3.22.0}"
OIDC_PROXY_VERSION="${KEYLESS_KUBE_OIDC_PROXY_VERSION:-v1.0.11}"
CACHE="${KEYLESS_BIN_CACHE:-$HOME/.cache/keyless/bin}"
WORK="${KEYLESS_BUILD_DIR:-$HOME/.cache/keyless/build}"
LOGS="$WORK/logs"
mkdir -p "$CACHE" "$WORK" "$LOGS"

command -v go >/dev/null 2>&1 || {
  echo "build-binaries: 'go' is not on PATH. Install Go >= 1.26 (the binaries are built from Go modules)." >&2
  exit 2
}
export CGO_ENABLED=0 GOFLAGS="${GOFLAGS:--buildvcs=false}"

say() { printf 'build-binaries: %s\n' "$*" >&2; }

# run_logged NAME CMD...: runs CMD with its output in a log file; on failure prints where the log is.
run_logged() {
  local name=$1; shift
  local log="$LOGS/$name.log"
  if ! "$@" >"$log" 2>&1; then
    say "building $name FAILED; last lines of $log:"
    tail -n 25 "$log" >&2
    exit 1
  fi
}

kube_wrapper() {
  local dir="$WORK/kubernetes-$KUBE_VERSION"
  [ -f "$dir/.ready" ] && { echo "$dir"; return; }
  mkdir -p "$dir"
  (
    cd "$dir"
    cat >go.mod <<MOD
module keyless.dev/build/kubernetes

go 1.26

require k8s.io/kubernetes $KUBE_VERSION
MOD
    echo 'package tools' >tools.go
    run_logged kubernetes-download go mod download k8s.io/kubernetes@"$KUBE_VERSION"
    # Staging modules are replaced by ./staging/... in k8s.io/kubernetes' own go.mod, which a dependent
    # module cannot inherit: point each of them at the published v0.Y.Z that matches this release.
    local gomod staging_version
    gomod=$(go list -m -f '{{.GoMod}}' k8s.io/kubernetes@"$KUBE_VERSION")
    staging_version="v0.${KUBE_VERSION#v1.}"
    grep -E '^\s*k8s\.io/[^ ]+ => \./staging/' "$gomod" | awk '{print $1}' | sort -u | while read -r m; do
      go mod edit -replace "$m=$m@$staging_version"
    done
    run_logged kubernetes-tidy go get k8s.io/kubernetes@"$KUBE_VERSION" \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubectl/pkg/cmd
  )
  touch "$dir/.ready"
  echo "$dir"
}

build_kube() {
  local cmd=$1 pkg=$2
  local out="$CACHE/$cmd-$KUBE_VERSION"
  [ -x "$out" ] && return
  local dir; dir=$(kube_wrapper)
  say "building $cmd $KUBE_VERSION (first time only; several minutes)"
  local ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$(echo "$KUBE_VERSION" | cut -d. -f2)"
  ldflags="$ldflags -X k8s.io/client-go/pkg/version.gitVersion=$KUBE_VERSION"
  (cd "$dir" && run_logged "$cmd" go build -trimpath -ldflags "$ldflags" -o "$out.tmp" "$pkg")
  mv "$out.tmp" "$out"
}

build_etcd() {
  local out="$CACHE/etcd-$ETCD_VERSION"
  [ -x "$out" ] && return
  local dir="$WORK/etcd-$ETCD_VERSION"
  mkdir -p "$dir"
  say "building etcd $ETCD_VERSION"
  (
    cd "$dir"
    # etcd's own replace directives block `go install`, so it is built as a dependency of this module.
    cat >go.mod <<MOD
module keyless.dev/build/etcd

go 1.26

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
MOD
    cat >main.go <<'SRC'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
SRC
    run_logged etcd-tidy go mod tidy
    run_logged etcd go build -trimpath -ldflags "-s -w" -o "$out.tmp" .
  )
  mv "$out.tmp" "$out"
}

build_helm() {
  local out="$CACHE/helm-$HELM_VERSION"
  [ -x "$out" ] && return
  local dir="$WORK/helm-$HELM_VERSION"
  mkdir -p "$dir"
  say "building helm $HELM_VERSION"
  (
    cd "$dir"
    cat >go.mod <<MOD
module keyless.dev/build/helm

go 1.26

require helm.sh/helm/v3 $HELM_VERSION
MOD
    echo 'package tools' >tools.go
    run_logged helm-get go get helm.sh/helm/v3/cmd/helm@"$HELM_VERSION"
    run_logged helm go build -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" -o "$out.tmp" helm.sh/helm/v3/cmd/helm
  )
  mv "$out.tmp" "$out"
}

# kube-oidc-proxy: the maintained fork (TremoloSecurity) keeps `module github.com/jetstack/kube-oidc-proxy`,
# so it is required under that path and replaced by the fork; a dependency's replaces are not
# inherited, so the fork's own are repeated. Opt-in: the module proxy of this workplace refuses the
# module (403), so it is not part of the default set (see README).
build_kube_oidc_proxy() {
  local out="$CACHE/kube-oidc-proxy-$OIDC_PROXY_VERSION"
  [ -x "$out" ] && return
  local dir="$WORK/kube-oidc-proxy-$OIDC_PROXY_VERSION"
  mkdir -p "$dir"
  say "building kube-oidc-proxy $OIDC_PROXY_VERSION (TremoloSecurity fork)"
  (
    cd "$dir"
    cat >go.mod <<MOD
module keyless.dev/build/kube-oidc-proxy

go 1.26

require github.com/jetstack/kube-oidc-proxy v1.0.11

replace (
	github.com/jetstack/kube-oidc-proxy => github.com/TremoloSecurity/kube-oidc-proxy $OIDC_PROXY_VERSION
	github.com/emicklei/go-restful => github.com/emicklei/go-restful/v3 v3.8.0
	golang.org/x/crypto => golang.org/x/crypto v0.48.0
	gopkg.in/yaml.v3 => gopkg.in/yaml.v3 v3.0.1
)
MOD
    echo 'package tools' >tools.go
    echo 'import _ "github.com/jetstack/kube-oidc-proxy/cmd"' >>tools.go
    run_logged kube-oidc-proxy-tidy go mod tidy
    run_logged kube-oidc-proxy go build -trimpath -ldflags "-s -w" -o "$out.tmp" github.com/jetstack/kube-oidc-proxy/cmd
  )
  mv "$out.tmp" "$out"
}

components=("$@")
[ ${#components[@]} -gt 0 ] || components=(etcd kube-apiserver kube-controller-manager kubectl helm)
for c in "${components[@]}"; do
  case "$c" in
    etcd) build_etcd ;;
    kube-apiserver) build_kube kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver ;;
    kube-controller-manager) build_kube kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager ;;
    kubectl) build_kube kubectl k8s.io/kubernetes/cmd/kubectl ;;
    helm) build_helm ;;
    kube-oidc-proxy) build_kube_oidc_proxy ;;
    *) say "unknown component '$c'"; exit 2 ;;
  esac
done
say "binaries ready in $CACHE"
