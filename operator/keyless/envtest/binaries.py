"""Finds the Go-built binaries (kube-apiserver, etcd, ...) in the cache that tools/build-binaries.sh fills."""
from __future__ import annotations

import os
from pathlib import Path

# Keep in step with tools/build-binaries.sh.
VERSIONS = {
    "kube-apiserver": os.environ.get("KEYLESS_KUBE_VERSION", "v1.37.2"),
    "kube-controller-manager": os.environ.get("KEYLESS_KUBE_VERSION", "v1.37.2"),
    "kubectl": os.environ.get("KEYLESS_KUBE_VERSION", "v1.37.2"),
    "etcd": os.environ.get("KEYLESS_ETCD_VERSION", "v3.6.16"),
    "helm": os.environ.get("KEYLESS_HELM_VERSION", "v3.22.0"),
    "kube-oidc-proxy": os.environ.get("KEYLESS_KUBE_OIDC_PROXY_VERSION", "v1.0.11"),
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
