"""Finds the Go-built binaries (kube-apiserver, etcd, ...) in the cache that tools/build-binaries.sh fills."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def source_revision(directory: Path) -> str:
    """The cache revision of a Go program of ours: a hash of its go.mod, main.go and go.sum (as the
    build script's source_revision computes it), so an edited program gets a new binary."""
    files = [directory / "go.mod", directory / "main.go"] + ([directory / "go.sum"] if (directory / "go.sum").exists() else [])
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]


# Keep in step with tools/build-binaries.sh.
VERSIONS = {
    "kube-apiserver": os.environ.get("KEYLESS_KUBE_VERSION", "v1.37.2"),
    "kube-controller-manager": os.environ.get("KEYLESS_KUBE_VERSION", "v1.37.2"),
    "kubectl": os.environ.get("KEYLESS_KUBE_VERSION", "v1.37.2"),
    "etcd": os.environ.get("KEYLESS_ETCD_VERSION", "v3.6.16"),
    "helm": os.environ.get("KEYLESS_HELM_VERSION", "v3.22.0"),
    # built from source at a pinned revision; the cache name carries its first 12 hex digits
    "kube-oidc-proxy": os.environ.get("KEYLESS_KUBE_OIDC_PROXY_REVISION",
                                      "d534f69bad96d651701f16808c0c5ad105f11aa6")[:12],
    "kubelet": os.environ.get("KEYLESS_KUBE_VERSION", "v1.37.2"),
    "kube-scheduler": os.environ.get("KEYLESS_KUBE_VERSION", "v1.37.2"),
    "kube-proxy": os.environ.get("KEYLESS_KUBE_VERSION", "v1.37.2"),
    "pause": "v1",
    "coredns": os.environ.get("KEYLESS_COREDNS_VERSION", "v1.14.7"),
    "argocd": os.environ.get("KEYLESS_ARGOCD_VERSION", "v3.5.3"),
    # miniredis in a wrapper of ours whose TTLs run in real time (the suffix is the wrapper's revision)
    "redis": os.environ.get("KEYLESS_MINIREDIS_VERSION", "v2.38.0") + "-realtime-auth-allif",
    "promtool": os.environ.get("KEYLESS_PROMETHEUS_VERSION", "v3.16.0"),
    "prometheus": os.environ.get("KEYLESS_PROMETHEUS_VERSION", "v3.16.0"),
    # tests/clusterprofile-consumer, versioned by a hash of its source
    "clusterprofile-consumer": "src-" + source_revision(ROOT / "tests" / "clusterprofile-consumer"),
}


class BinaryMissing(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("KEYLESS_BIN_CACHE", Path.home() / ".cache" / "keyless" / "bin"))


def find(component: str) -> Path:
    """Path of a cached binary, or a BinaryMissing that says how to build it."""
    path = cache_dir() / f"{component}-{VERSIONS[component]}"
    if not os.access(path, os.X_OK):
        raise BinaryMissing(
            f"{component} {VERSIONS[component]} is not built: expected {path}. "
            f"Run `tools/build-binaries.sh {component}` (or `make bins`)."
        )
    return path


def available(component: str) -> bool:
    try:
        find(component)
    except BinaryMissing:
        return False
    return True
