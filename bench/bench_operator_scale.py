#!/usr/bin/env python3
"""Scale benchmark: 1,000 RemoteTenantClusters applied at once on a local control plane.

Measures: time until every manifest has ArgoClusterRegistered=True, API requests per manifest
(from the API server's own counters, minus this script's requests), and the operator's peak RSS.
Targets (issue 3): <= 120 s, <= 300 MB RSS. Run: .venv/bin/python bench/bench_operator_scale.py [N]
"""
from __future__ import annotations

import asyncio
import json
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from keyless.envtest.cluster import LocalCluster  # noqa: E402
from keyless.kube import Kube, KubeConfig  # noqa: E402
from tests.operator_fixtures import OperatorProcess, ca_data, prepare_control_plane, rtc_manifest  # noqa: E402


def apiserver_requests(cluster: LocalCluster) -> int:
    text = cluster.metrics()
    total = 0
    for line in text.splitlines():
        if line.startswith("apiserver_request_total{") and 'resource="leases"' not in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


async def create_all(kube: Kube, manifests: list[dict], concurrency: int = 64) -> None:
    limit = asyncio.Semaphore(concurrency)

    async def create(m: dict) -> None:
        async with limit:
            ns = m["metadata"]["namespace"]
            await kube.create(f"/apis/keyless.dev/v1alpha1/namespaces/{ns}/remotetenantclusters", m)

    await asyncio.gather(*(create(m) for m in manifests))


async def count_registered(kube: Kube) -> int:
    listing = await kube.list("/apis/keyless.dev/v1alpha1/remotetenantclusters")
    done = 0
    for item in listing["items"]:
        for c in (item.get("status") or {}).get("conditions", []):
            if c["type"] == "ArgoClusterRegistered" and c["status"] == "True":
                done += 1
    return done


async def main(n: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="keyless-bench-scale-"))
    cluster = LocalCluster("bench", work / "cluster", controller_manager=False,
                           extra_apiserver_args=["--max-requests-inflight=800", "--max-mutating-requests-inflight=400"])
    cluster.start()
    operator = None
    try:
        prepare_control_plane(cluster)
        kube = Kube(KubeConfig.from_kubeconfig(cluster.kubeconfig), connections=64)
        # 100 tenants, each owning the namespace named after it (labelled by the admin).
        tenants = [f"tenant-{t:03d}" for t in range(100)]
        for tenant in tenants:
            await kube.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                     "metadata": {"name": tenant, "labels": {"keyless.dev/tenant": tenant}}})
        operator = OperatorProcess(cluster, work / "operator", extra_args=["--resync-seconds=300"]).start()
        ca = ca_data()
        manifests = [rtc_manifest(f"c{i:04d}", tenants[i % 100], tenant=tenants[i % 100], caData=ca) for i in range(n)]
        await asyncio.sleep(2)
        before = apiserver_requests(cluster)
        own = 0
        started = time.monotonic()
        await create_all(kube, manifests)
        own += n
        applied = time.monotonic() - started
        registered = 0
        while registered < n:
            await asyncio.sleep(1)
            registered = await count_registered(kube)
            own += 1
            if time.monotonic() - started > 900:
                raise SystemExit(f"only {registered}/{n} registered after 900 s; log {operator.log_path}")
        elapsed = time.monotonic() - started
        await asyncio.sleep(5)  # AppProject and status writes of the last ones
        requests = apiserver_requests(cluster) - before - own - 2  # two metric scrapes
        result = {
            "manifests": n,
            "apply_seconds": round(applied, 1),
            "all_registered_seconds": round(elapsed, 1),
            "api_requests_per_manifest": round(requests / n, 1),
            "operator_peak_rss_mb": round(peak_rss_mb(operator.process.pid), 1),
        }
        await kube.close()
        return result
    finally:
        if operator:
            operator.stop()
        cluster.stop()


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    outcome = asyncio.run(main(count))
    print(json.dumps(outcome, indent=2))
    print(f"\n| manifests | all ArgoClusterRegistered | API requests / manifest | operator peak RSS |\n"
          f"|---|---|---|---|\n| {outcome['manifests']} | {outcome['all_registered_seconds']} s "
          f"| {outcome['api_requests_per_manifest']} | {outcome['operator_peak_rss_mb']} MB |")
