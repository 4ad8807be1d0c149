"""Small helpers for tests: run the real kubectl, install CRDs, poll for a condition."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

from keyless.envtest import binaries
from keyless.envtest.cluster import LocalCluster


def kubectl(cluster: LocalCluster, *args: str, check: bool = True, input: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(binaries.find("kubectl")), f"--kubeconfig={cluster.kubeconfig}", *args],
        capture_output=True, text=True, input=input, timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def install_crds(cluster: LocalCluster, *paths: Path) -> None:
    for path in paths:
        kubectl(cluster, "apply", "--server-side", "--force-conflicts", "-f", str(path))
    # Right after creation a CRD may have no status yet, which `kubectl wait` reports as an error.
    eventually(lambda: kubectl(cluster, "wait", "--for=condition=Established", "--timeout=30s", "crd", "--all",
                               check=False).returncode == 0, timeout=60, message="CRDs established")


def eventually(check, timeout: float = 30.0, interval: float = 0.2, message: str = "condition"):
    """Polls `check` until it returns a truthy value; returns it, or fails with the last error."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
            last = value
        except AssertionError as e:
            last = e
        time.sleep(interval)
    raise AssertionError(f"{message} not reached within {timeout}s; last: {last}")


def read_or_none(fn, *args):
    """A kubernetes client read; None when the object does not exist."""
    from kubernetes.client.rest import ApiException

    try:
        return fn(*args)
    except ApiException as e:
        if e.status == 404:
            return None
        raise


WRITE_VERBS = ("POST", "PUT", "PATCH", "DELETE", "DELETECOLLECTION", "APPLY")


def apiserver_requests(cluster: LocalCluster, resources: set[str], verbs=WRITE_VERBS,
                       code: str | None = None) -> dict[tuple[str, str], int]:
    """Requests the API server has served for these resources by (verb, resource), from its own /metrics;
    only those answered with `code` (e.g. "422") when given."""
    import re

    counts: dict[tuple[str, str], int] = {}
    for line in cluster.metrics().splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if labels.get("verb") not in verbs or labels.get("resource") not in resources:
            continue
        if code is not None and labels.get("code") != code:
            continue
        key = (labels["verb"], labels["resource"] + (f"/{labels['subresource']}" if labels.get("subresource") else ""))
        counts[key] = counts.get(key, 0) + int(float(line.rsplit(" ", 1)[1]))
    return counts


def apiserver_writes(cluster: LocalCluster, resources: set[str]) -> dict[tuple[str, str], int]:
    """Writes the API server has served for these resources by (verb, resource), from its own /metrics."""
    return apiserver_requests(cluster, resources)
