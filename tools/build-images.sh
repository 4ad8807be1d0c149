#!/usr/bin/env bash
# Builds container images without a daemon and without a registry, as OCI archives that a node's
# containerd imports (`ctr images import`). Usage: tools/build-images.sh [keyless|argocd|base ...]
#
#   keyless  the project's own Dockerfile, unchanged, built by buildah -> localhost/keyless/keyless:<version>
#   argocd   our argocd binary + git on a Debian base (images/argocd/Dockerfile) -> localhost/keyless/argocd:<version>
#   base     the Dockerfile's base image. Where docker.io is reachable buildah pulls it; where it is not
#            (as here), a stand-in of the same name is made from Debian bookworm (Python 3.11) with
#            mmdebstrap: same PATH, `python` at /usr/local/bin like the official image.
#
# Needs root and Debian's buildah, podman, mmdebstrap and runc (installed when missing, like the node
# packages). Archives are cached in ~/.cache/keyless/images and rebuilt when their inputs change.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${KEYLESS_IMAGE_CACHE:-$HOME/.cache/keyless/images}"
BIN_CACHE="${KEYLESS_BIN_CACHE:-$HOME/.cache/keyless/bin}"
ARGOCD_VERSION="${KEYLESS_ARGOCD_VERSION:-v3.5.3}"
BASE_IMAGE="$(sed -n 's/^FROM \([^ ]*\).*/\1/p' "$ROOT/Dockerfile" | head -n 1)"
case "$BASE_IMAGE" in */*/*) ;; */*) BASE_IMAGE="docker.io/$BASE_IMAGE" ;; *) BASE_IMAGE="docker.io/library/$BASE_IMAGE" ;; esac
VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/pyproject.toml" | head -n 1)"
LOGS="$CACHE/logs"
mkdir -p "$CACHE" "$LOGS"

say() { printf 'build-images: %s\n' "$*" >&2; }
run_logged() {
  local name=$1; shift
  local log="$LOGS/$name.log" started=$SECONDS
  if ! "$@" >"$log" 2>&1; then
    say "$name FAILED after $((SECONDS - started)) s; last lines of $log:"
    tail -n 25 "$log" >&2
    exit 1
  fi
  say "$name done in $((SECONDS - started)) s"
}

[ "$(id -u)" = 0 ] || { say "needs root (buildah without a daemon, rootful storage)"; exit 3; }
missing=()
for tool in buildah podman mmdebstrap runc; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]} from Debian (first time only)"
  export DEBIAN_FRONTEND=noninteractive
  run_logged apt-get apt-get install -y -q --no-install-recommends buildah podman mmdebstrap runc
fi

# crun (buildah's default here) fails on this host's hybrid cgroups; podman cannot raise hard rlimits.
export CONTAINERS_CONF="$CACHE/containers.conf"
cat >"$CONTAINERS_CONF" <<'CONF'
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
# The machine's CA bundle and pip settings are bind-mounted into RUN steps (never committed), so
# `pip install` inside the build reaches the package index the way the host does.
BUILD_MOUNTS=(-v /etc/ssl/certs:/etc/ssl/certs:ro)
[ -f /etc/pip.conf ] && BUILD_MOUNTS+=(-v /etc/pip.conf:/etc/pip.conf:ro)

stamp() { sha256sum "$@" | sha256sum | cut -c1-12; }

ensure_base() {
  if podman image exists "$BASE_IMAGE"; then return; fi
  if buildah pull --quiet "$BASE_IMAGE" >"$LOGS/base-pull.log" 2>&1; then say "pulled $BASE_IMAGE"; return; fi
  say "$BASE_IMAGE is not reachable: making a stand-in of the same name from Debian bookworm (~1 min)"
  local tmp; tmp=$(mktemp -d)
  run_logged base-mmdebstrap mmdebstrap --variant=minbase \
    --include=python3,python3-venv,python-is-python3,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook='for p in python python3 python3.11; do ln -sf /usr/bin/python3 "$1/usr/local/bin/$p"; done' \
    bookworm "$tmp/rootfs.tar"
  run_logged base-import podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' "$tmp/rootfs.tar" "$BASE_IMAGE"
  rm -rf "$tmp"
}

export_archive() {  # image archive-path
  rm -f "$2.tmp"
  run_logged "export-$(basename "$2" .tar)" buildah push --quiet "$1" "oci-archive:$2.tmp:$1"
  mv "$2.tmp" "$2"
}

build_keyless() {
  local image="localhost/keyless/keyless:$VERSION"
  local inputs; inputs=$(cd "$ROOT" && stamp Dockerfile pyproject.toml constraints.txt $(git ls-files operator 2>/dev/null || find operator -type f -name '*.py'))
  local archive="$CACHE/keyless-$VERSION-$inputs.tar"
  if [ -f "$archive" ]; then echo "$archive"; return; fi
  ensure_base
  say "building $image from the project's Dockerfile (buildah, ~1-2 min)"
  run_logged keyless-build buildah bud --runtime runc --pull=never --layers "${BUILD_MOUNTS[@]}" \
    -t "$image" -f "$ROOT/Dockerfile" "$ROOT"
  export_archive "$image" "$archive"
  echo "$archive"
}

build_argocd() {
  local image="localhost/keyless/argocd:$ARGOCD_VERSION"
  local binary="$BIN_CACHE/argocd-$ARGOCD_VERSION"
  [ -x "$binary" ] || { say "argocd $ARGOCD_VERSION is not built: run tools/build-binaries.sh argocd"; exit 1; }
  local module; module=$(cd "$HOME" && go mod download -json "github.com/argoproj/argo-cd/v3@$ARGOCD_VERSION" 2>/dev/null \
    | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",*$/\1/p')
  [ -n "$module" ] || { say "cannot find the argo-cd $ARGOCD_VERSION module (run tools/build-binaries.sh argocd)"; exit 1; }
  local inputs; inputs=$(stamp "$ROOT/images/argocd/Dockerfile" "$binary")
  local archive="$CACHE/argocd-$ARGOCD_VERSION-$inputs.tar"
  if [ -f "$archive" ]; then echo "$archive"; return; fi
  ensure_base
  local context; context=$(mktemp -d)
  cp "$binary" "$context/argocd"
  cp "$module/hack/git-verify-wrapper.sh" "$module/hack/gpg-wrapper.sh" "$context/"
  chmod 0755 "$context"/*
  say "building $image (our argocd binary + git, ~1 min)"
  run_logged argocd-build buildah bud --runtime runc --pull=never --layers "${BUILD_MOUNTS[@]}" \
    --build-arg "BASE=$BASE_IMAGE" -t "$image" -f "$ROOT/images/argocd/Dockerfile" "$context"
  rm -rf "$context"
  export_archive "$image" "$archive"
  echo "$archive"
}

components=("$@")
[ ${#components[@]} -gt 0 ] || components=(keyless argocd)
for c in "${components[@]}"; do
  case "$c" in
    base) ensure_base ;;
    keyless) build_keyless ;;
    argocd) build_argocd ;;
    *) say "unknown image '$c' (keyless, argocd, base)"; exit 2 ;;
  esac
done
