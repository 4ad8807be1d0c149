#!/usr/bin/env bash
# Builds the real Kubernetes parts our tests run against, from Go modules, into a cache outside the
# repo. Each binary is skipped when already cached. Usage: tools/build-binaries.sh [component...]
set -euo pipefail

KUBE_VERSION="${KEYLESS_KUBE_VERSION:-v1.37.2}"
ETCD_VERSION="${KEYLESS_ETCD_VERSION:-v3.6.16}"
HELM_VERSION="${KEYLESS_HELM_VERSION:-v3.22.0}"
ARGOCD_VERSION="${KEYLESS_ARGOCD_VERSION:-v3.5.3}"
# kube-oidc-proxy is built from upstream source at a pinned revision (the module proxy refuses the module).
OIDC_PROXY_REVISION="${KEYLESS_KUBE_OIDC_PROXY_REVISION:-d534f69bad96d651701f16808c0c5ad105f11aa6}"
OIDC_PROXY_REPO="https://github.com/TremoloSecurity/kube-oidc-proxy"
HERE="$(cd "$(dirname "$0")/.." && pwd)"
# A local copy of the upstream source at that revision, used when present (machines where github.com is
# unreachable); otherwise the script clones the upstream repository.
OIDC_PROXY_SOURCE="${KEYLESS_KUBE_OIDC_PROXY_SOURCE:-$HERE/../shared/third_party/kube-oidc-proxy}"
CACHE="${KEYLESS_BIN_CACHE:-$HOME/.cache/keyless/bin}"
WORK="${KEYLESS_BUILD_DIR:-$HOME/.cache/keyless/build}"
LOGS="$WORK/logs"
mkdir -p "$CACHE" "$WORK" "$LOGS"

command -v go >/dev/null 2>&1 || {
  echo "build-binaries: 'go' is not on PATH. Install Go >= 1.26 (the binaries are built from Go modules)." >&2
  exit 2
}
export CGO_ENABLED=0 GOFLAGS="${GOFLAGS:--buildvcs=false}"

STEP=""  # "[i/n] " of the component being built, set by the loop at the end
say() { printf 'build-binaries: %s%s\n' "$STEP" "$*" >&2; }

# A step that takes longer than this says how far it got, every this many seconds (0: never).
PROGRESS_SECONDS="${KEYLESS_PROGRESS_SECONDS:-15}"
# Set by go_build for the step it runs: how many packages the binary needs, so progress can say "n/N".
PACKAGES_TOTAL=""

elapsed() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

# progress LOG: how far the running step got. A `go build -v` prints each package it compiles, one per
# line (cached ones are not printed, so a warm build ends early); other steps show their last log line.
progress() {
  local log=$1
  if [ -n "$PACKAGES_TOTAL" ]; then
    local done; done=$(grep -c -v -e ' ' -e '^$' "$log" 2>/dev/null || true)
    printf '%s/%s packages compiled (%d%%)' "${done:-0}" "$PACKAGES_TOTAL" $(( ${done:-0} * 100 / PACKAGES_TOTAL ))
  else
    local last; last=$(tail -n 1 "$log" 2>/dev/null | cut -c 1-100)
    printf '%s' "${last:-working}"
  fi
}

# run_logged NAME CMD...: runs CMD with its output in a log file; on failure prints where the log is.
# While it runs it reports its progress every PROGRESS_SECONDS, so a build of minutes is never silent.
run_logged() {
  local name=$1; shift
  local log="$LOGS/$name.log" started=$SECONDS
  "$@" >"$log" 2>&1 &
  local pid=$! next=$((SECONDS + PROGRESS_SECONDS))
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$PROGRESS_SECONDS" -gt 0 ] && [ "$SECONDS" -ge "$next" ]; then
      say "  $name: $(progress "$log"), $(elapsed $((SECONDS - started)))"
      next=$((SECONDS + PROGRESS_SECONDS))
    fi
    sleep 1
  done
  if ! wait "$pid"; then
    PACKAGES_TOTAL=""
    say "building $name FAILED; last lines of $log:"
    tail -n 25 "$log" >&2
    exit 1
  fi
  if [ "$PROGRESS_SECONDS" -gt 0 ] && [ $((SECONDS - started)) -ge "$PROGRESS_SECONDS" ]; then
    say "  $name: done in $(elapsed $((SECONDS - started)))"
  fi
  PACKAGES_TOTAL=""
}

# go_build NAME PACKAGE OUT [go build flags...]: `go build -v` of PACKAGE (in the current module) into
# OUT, reporting packages compiled out of the binary's dependencies while it runs.
go_build() {
  local name=$1 pkg=$2 out=$3; shift 3
  PACKAGES_TOTAL=$(go list -deps "$pkg" 2>/dev/null | wc -l)
  [ "${PACKAGES_TOTAL:-0}" -gt 0 ] || PACKAGES_TOTAL=""
  run_logged "$name" go build -v -trimpath "$@" -o "$out" "$pkg"
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
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubectl/pkg/cmd \
      k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kube-proxy
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
  (cd "$dir" && go_build "$cmd" "$pkg" "$out.tmp" -ldflags "$ldflags")
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
    go_build etcd . "$out.tmp" -ldflags "-s -w"
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
    go_build helm helm.sh/helm/v3/cmd/helm "$out.tmp" -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  )
  mv "$out.tmp" "$out"
}

# kube-oidc-proxy: the maintained fork (TremoloSecurity; its go.mod still says github.com/jetstack/...).
# Built from source at OIDC_PROXY_REVISION: a local copy when present, else a clone of upstream.
build_kube_oidc_proxy() {
  local short=${OIDC_PROXY_REVISION:0:12}
  local out="$CACHE/kube-oidc-proxy-$short"
  [ -x "$out" ] && return
  local src="$OIDC_PROXY_SOURCE"
  if [ ! -f "$src/go.mod" ]; then
    src="$WORK/kube-oidc-proxy-$short"
    if [ ! -f "$src/go.mod" ]; then
      say "cloning kube-oidc-proxy $OIDC_PROXY_REVISION from $OIDC_PROXY_REPO"
      rm -rf "$src.tmp"
      if ! { git init -q "$src.tmp" && git -C "$src.tmp" fetch -q --depth 1 "$OIDC_PROXY_REPO" "$OIDC_PROXY_REVISION" \
             && git -C "$src.tmp" checkout -q FETCH_HEAD; } 2>"$LOGS/kube-oidc-proxy-clone.log"; then
        say "kube-oidc-proxy revision $OIDC_PROXY_REVISION is not available: no local copy at $OIDC_PROXY_SOURCE"
        say "and $OIDC_PROXY_REPO could not be fetched (log: $LOGS/kube-oidc-proxy-clone.log)."
        say "Put the upstream source at that revision there, or set KEYLESS_KUBE_OIDC_PROXY_SOURCE to a checkout."
        exit 1
      fi
      mv "$src.tmp" "$src"
    fi
  fi
  say "building kube-oidc-proxy ${short} from $src (first time only; ~4.5 min cold)"
  (cd "$src" && go_build kube-oidc-proxy ./cmd "$out.tmp" -ldflags "-s -w")
  mv "$out.tmp" "$out"
}

# Argo CD: one multi-call binary (application controller, repo-server, applicationset controller,
# server), built from a wrapper module. The module's own replace lines are not inherited by a wrapper,
# so they are read from argo-cd's go.mod and repeated; its nested gitops-engine module (replaced by a
# folder that the module zip lacks) is pinned to the pseudo-version the proxy serves for the same tag.
ARGOCD_GITOPS_ENGINE="${KEYLESS_ARGOCD_GITOPS_ENGINE:-v0.0.0-20260914071520-c9c369efcc5b}"
argocd_module_dir() {
  go mod download -json github.com/argoproj/argo-cd/v3@"$ARGOCD_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",*$/\1/p'
}
build_argocd() {
  local out="$CACHE/argocd-$ARGOCD_VERSION"
  [ -x "$out" ] && return
  local dir="$WORK/argocd-$ARGOCD_VERSION"
  mkdir -p "$dir"
  say "building argocd $ARGOCD_VERSION (first time only; 5-8 min cold)"
  (
    cd "$dir"
    if [ ! -f .ready ]; then
      cat >go.mod <<MOD
module keyless.dev/build/argocd

go 1.26

require github.com/argoproj/argo-cd/v3 $ARGOCD_VERSION
MOD
      echo 'package tools' >tools.go
      run_logged argocd-download go mod download github.com/argoproj/argo-cd/v3@"$ARGOCD_VERSION"
      local gomod; gomod=$(go list -m -f '{{.GoMod}}' github.com/argoproj/argo-cd/v3@"$ARGOCD_VERSION")
      # every `old => new version` replace of argo-cd's go.mod, in block or single-line form
      sed -n 's/^\(replace \)\{0,1\}[[:space:]]*\([^ /][^ ]*\) => \([^ .][^ ]*\) \(v[^ ]*\)$/\2=\3@\4/p' "$gomod" |
        while read -r r; do go mod edit -replace "$r"; done
      go mod edit -replace "github.com/argoproj/argo-cd/gitops-engine=github.com/argoproj/argo-cd/gitops-engine@$ARGOCD_GITOPS_ENGINE"
      run_logged argocd-get go get github.com/argoproj/argo-cd/v3/cmd@"$ARGOCD_VERSION"
      touch .ready
    fi
    go_build argocd github.com/argoproj/argo-cd/v3/cmd "$out.tmp" -ldflags "-s -w -X github.com/argoproj/argo-cd/v3/common.version=${ARGOCD_VERSION#v}"
  )
  mv "$out.tmp" "$out"
}

# A tiny Go program of ours around a Go module: go.mod requires $2, main.go is $3, and an optional $4
# names the program's own revision (appended to the version, so a changed program gets a new cache name).
# Used for the small helpers the harness needs that no Debian or Go release ships as a binary.
build_go_wrapper() {
  local name=$1 module=$2 source=$3
  local version=${module##* }${4:+-$4}
  local out="$CACHE/$name-$version"
  [ -x "$out" ] && return
  local dir="$WORK/$name-$version"
  mkdir -p "$dir"
  say "building $name ($module)"
  (
    cd "$dir"
    printf 'module keyless.dev/build/%s\n\ngo 1.26\n' "$name" >go.mod
    [ -z "${module%% *}" ] || printf '\nrequire %s\n' "$module" >>go.mod
    printf '%s\n' "$source" >main.go
    run_logged "$name-tidy" go mod tidy
    go_build "$name" . "$out.tmp" -ldflags "-s -w"
  )
  mv "$out.tmp" "$out"
}

# Argo CD needs a Redis. miniredis (the in-memory Redis Argo CD's own tests use) comes from the Go
# module proxy, which every machine that builds the rest already reaches: no system package, no root.
# miniredis never expires keys by itself (tests call FastForward), so the wrapper moves its clock with
# real time: Argo CD's caches (e.g. the repo-server's git refs) must expire, or new commits go unseen.
MINIREDIS_VERSION="${KEYLESS_MINIREDIS_VERSION:-v2.38.0}"
MINIREDIS_WRAPPER_REVISION="realtime-auth-allif"
read -r -d '' MINIREDIS_MAIN <<'SRC' || true
// keyless-redis: miniredis served on a TCP address until SIGTERM, its TTLs running in real time.
// Besides -addr it takes redis-server's own options (--port, --bind, --requirepass, the rest ignored),
// also in the one-argument form "--requirepass secret", so it can stand in for Argo CD's Redis Pod.
package main

import (
	"log"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/alicebob/miniredis/v2"
)

func options(args []string) map[string]string {
	// As redis-server: port 6379 on every interface unless told otherwise (Argo CD's Redis Pod passes
	// neither --port nor --bind, and the other Pods reach it through its Service).
	found := map[string]string{"addr": ":6379"}
	for i := 0; i < len(args); i++ {
		name := strings.TrimLeft(args[i], "-")
		value := ""
		if k, v, ok := strings.Cut(name, " "); ok {
			name, value = k, v
		} else if k, v, ok := strings.Cut(name, "="); ok {
			name, value = k, v
		} else if i+1 < len(args) {
			i++
			value = args[i]
		}
		found[name] = value
	}
	if port, ok := found["port"]; ok {
		found["addr"] = net.JoinHostPort(found["bind"], port)
	} else if host, ok := found["bind"]; ok {
		found["addr"] = net.JoinHostPort(host, "6379")
	}
	return found
}

func main() {
	opts := options(os.Args[1:])
	server := miniredis.NewMiniRedis()
	if password := opts["requirepass"]; password != "" {
		server.RequireAuth(password)
	}
	if err := server.StartAddr(opts["addr"]); err != nil {
		log.Fatalf("listen on %s: %v", opts["addr"], err)
	}
	log.Printf("redis (miniredis) listening on %s", server.Addr())
	go func() {
		last := time.Now()
		for now := range time.Tick(250 * time.Millisecond) {
			server.FastForward(now.Sub(last))
			last = now
		}
	}()
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	<-stop
	server.Close()
}
SRC

# The Pod sandbox ("pause") process of the test nodes: sleeps until told to stop. Static, no libc.
PAUSE_VERSION="v1"
read -r -d '' PAUSE_MAIN <<'SRC' || true
// pause: the Pod sandbox process; holds the Pod's namespaces until SIGTERM/SIGINT.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	<-stop
}
SRC

# promtool, from the Prometheus Go module (3.x releases are tagged v0.3XX.Y there): `check rules` and
# `test rules` (a real PromQL engine) for the chart's PrometheusRule. remove_all_sd leaves out the service
# discovery plugins promtool does not need for rules (the cloud SDKs), which halves the build.
PROMETHEUS_MODULE_VERSION="${KEYLESS_PROMETHEUS_MODULE_VERSION:-v0.316.0}"
PROMETHEUS_VERSION="${KEYLESS_PROMETHEUS_VERSION:-v3.16.0}"
build_promtool() {
  local out="$CACHE/promtool-$PROMETHEUS_VERSION"
  [ -x "$out" ] && return
  local dir="$WORK/promtool-$PROMETHEUS_VERSION"
  mkdir -p "$dir"
  say "building promtool $PROMETHEUS_VERSION (first time only; a few minutes cold)"
  (
    cd "$dir"
    if [ ! -f .ready ]; then
      printf 'module keyless.dev/build/promtool\n\ngo 1.26\n\nrequire github.com/prometheus/prometheus %s\n' \
        "$PROMETHEUS_MODULE_VERSION" >go.mod
      echo 'package tools' >tools.go
      run_logged promtool-get go get github.com/prometheus/prometheus/cmd/promtool@"$PROMETHEUS_MODULE_VERSION"
      touch .ready
    fi
    go_build promtool github.com/prometheus/prometheus/cmd/promtool "$out.tmp" -tags remove_all_sd \
      -ldflags "-s -w -X github.com/prometheus/common/version.Version=${PROMETHEUS_VERSION#v}"
  )
  mv "$out.tmp" "$out"
}

# The Prometheus server from the same module and wrapper: a real PromQL engine that scrapes a demo run, from
# which tools/render-dashboard.py draws the Grafana dashboard's panels (docs/dashboard.png).
build_prometheus() {
  local out="$CACHE/prometheus-$PROMETHEUS_VERSION"
  [ -x "$out" ] && return
  build_promtool
  local dir="$WORK/promtool-$PROMETHEUS_VERSION"
  say "building prometheus $PROMETHEUS_VERSION (first time only; a minute or two after promtool)"
  (
    cd "$dir"
    run_logged prometheus-get go get github.com/prometheus/prometheus/cmd/prometheus@"$PROMETHEUS_MODULE_VERSION"
    go_build prometheus github.com/prometheus/prometheus/cmd/prometheus "$out.tmp" -tags remove_all_sd \
      -ldflags "-s -w -X github.com/prometheus/common/version.Version=${PROMETHEUS_VERSION#v}"
  )
  mv "$out.tmp" "$out"
}

# A ClusterProfile consumer of ours (tests/clusterprofile-consumer), built with SIG Multicluster's
# cluster-inventory-api, which the module proxy does not serve: its go.mod gets a replace to a local copy
# (resolved here, at build time). Cached under a hash of its source, so an edited program is rebuilt.
CLUSTER_INVENTORY_API_SOURCE="${KEYLESS_CLUSTER_INVENTORY_API_SOURCE:-$HERE/../shared/third_party/cluster-inventory-api}"
CONSUMER_SOURCE="$HERE/tests/clusterprofile-consumer"
source_revision() { (cd "$1" && cat go.mod main.go $( [ -f go.sum ] && echo go.sum ) | sha256sum | cut -c 1-12); }
build_clusterprofile_consumer() {
  local version; version="src-$(source_revision "$CONSUMER_SOURCE")"
  local out="$CACHE/clusterprofile-consumer-$version"
  [ -x "$out" ] && return
  if [ ! -f "$CLUSTER_INVENTORY_API_SOURCE/go.mod" ]; then
    say "sigs.k8s.io/cluster-inventory-api not found at $CLUSTER_INVENTORY_API_SOURCE (the module proxy does not"
    say "serve it): put its source there, or set KEYLESS_CLUSTER_INVENTORY_API_SOURCE to a checkout."
    exit 1
  fi
  local inventory; inventory=$(cd "$CLUSTER_INVENTORY_API_SOURCE" && pwd)
  local dir="$WORK/clusterprofile-consumer-$version"
  rm -rf "$dir" && mkdir -p "$dir"
  say "building clusterprofile-consumer $version (cluster-inventory-api from $inventory)"
  (
    cd "$dir"
    cp "$CONSUMER_SOURCE"/go.mod "$CONSUMER_SOURCE"/main.go .
    [ ! -f "$CONSUMER_SOURCE/go.sum" ] || cp "$CONSUMER_SOURCE/go.sum" .
    go mod edit -replace "sigs.k8s.io/cluster-inventory-api=$inventory"
    run_logged clusterprofile-consumer-tidy go mod tidy
    go_build clusterprofile-consumer . "$out.tmp" -ldflags "-s -w"
  )
  mv "$out.tmp" "$out"
}

# CoreDNS: the cluster DNS of test nodes that run Pods addressing Services by name (Argo CD, the chart).
COREDNS_VERSION="${KEYLESS_COREDNS_VERSION:-v1.14.7}"
build_coredns() {
  local out="$CACHE/coredns-$COREDNS_VERSION"
  [ -x "$out" ] && return
  local dir="$WORK/coredns-$COREDNS_VERSION"
  mkdir -p "$dir"
  say "building coredns $COREDNS_VERSION (first time only; ~2 min)"
  (
    cd "$dir"
    printf 'module keyless.dev/build/coredns\n\ngo 1.26\n' >go.mod
    echo 'package tools' >tools.go
    run_logged coredns-get go get github.com/coredns/coredns@"$COREDNS_VERSION"
    run_logged coredns go build -trimpath -ldflags "-s -w" -o "$out.tmp" github.com/coredns/coredns
  )
  mv "$out.tmp" "$out"
}

components=("$@")
[ ${#components[@]} -gt 0 ] || components=(etcd kube-apiserver kube-controller-manager kubectl kubelet kube-scheduler kube-proxy helm kube-oidc-proxy argocd redis pause coredns promtool clusterprofile-consumer)
index=0
for c in "${components[@]}"; do
  index=$((index + 1))
  STEP="[$index/${#components[@]}] "
  case "$c" in
    etcd) build_etcd ;;
    kube-apiserver) build_kube kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver ;;
    kube-controller-manager) build_kube kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager ;;
    kubectl) build_kube kubectl k8s.io/kubernetes/cmd/kubectl ;;
    kubelet) build_kube kubelet k8s.io/kubernetes/cmd/kubelet ;;
    kube-scheduler) build_kube kube-scheduler k8s.io/kubernetes/cmd/kube-scheduler ;;
    kube-proxy) build_kube kube-proxy k8s.io/kubernetes/cmd/kube-proxy ;;
    helm) build_helm ;;
    argocd) build_argocd ;;
    redis) build_go_wrapper redis "github.com/alicebob/miniredis/v2 $MINIREDIS_VERSION" "$MINIREDIS_MAIN" "$MINIREDIS_WRAPPER_REVISION" ;;
    pause) build_go_wrapper pause " $PAUSE_VERSION" "$PAUSE_MAIN" ;;
    coredns) build_coredns ;;
    kube-oidc-proxy) build_kube_oidc_proxy ;;
    promtool) build_promtool ;;
    prometheus) build_prometheus ;;
    clusterprofile-consumer) build_clusterprofile_consumer ;;
    *) say "unknown component '$c'"; exit 2 ;;
  esac
done
STEP=""
say "binaries ready in $CACHE"
