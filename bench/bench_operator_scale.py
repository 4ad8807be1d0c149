#!/usr/bin/env python3
"""Scale benchmark: N RemoteTenantClusters (default 1,000; issue 14: 5,000) applied at once on a local
control plane, 100 tenants.

Measures, from the API server's own counters (minus this script's requests):
- time until every manifest has ArgoClusterRegistered=True, and until every derived object exists
  (one Argo CD cluster Secret and one BrokerTarget per manifest, one AppProject per tenant);
- API requests per manifest during convergence;
- a quiet period: once converged, the writes (anything but GET/LIST/WATCH; leases excluded) over a window
  that holds one whole resync round, which must be 0, and the reads that resync cost;
- the operator's peak RSS (VmHWM) and its RSS at the end.
Targets (issue 14, 5,000 on 2 cores): registered <= 120 s, derived <= 300 s, <= 400 MB RSS, 0 writes
in a quiet period. Run: .venv/bin/python bench/bench_operator_scale.py [N]
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


READS = {"GET", "LIST", "WATCH"}
RESYNC_SECONDS = 120


def apiserver_counts(cluster: LocalCluster) -> dict[str, int]:
    """apiserver_request_total summed into reads, writes and all (leases excluded: leader election), and
    by "VERB resource[/subresource]"."""
    counts = {"reads": 0, "writes": 0, "all": 0}
    for line in cluster.metrics().splitlines():
        if line.startswith("apiserver_request_total{") and 'resource="leases"' not in line:
            value = int(float(line.rsplit(" ", 1)[1]))
            verb = re.search(r'verb="([A-Z]+)"', line).group(1)
            counts["reads" if verb in READS else "writes"] += value
            counts["all"] += value
            resource = re.search(r'resource="([^"]*)"', line).group(1)
            sub = re.search(r'subresource="([^"]*)"', line)
            key = f"{verb} {resource}" + (f"/{sub.group(1)}" if sub and sub.group(1) else "")
            counts[key] = counts.get(key, 0) + value
    return counts


def per_manifest(before: dict[str, int], after: dict[str, int], n: int) -> dict[str, float]:
    """Requests per manifest by verb and resource, largest first (those above 0.05)."""
    keys = [k for k in after if " " in k]
    rates = {k: (after[k] - before.get(k, 0)) / n for k in keys}
    return {k: round(v, 2) for k, v in sorted(rates.items(), key=lambda kv: -kv[1]) if v >= 0.05}


def rss_mb(pid: int) -> float:
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text()).group(1)) / 1024


async def count_derived(kube: Kube) -> tuple[int, int, int]:
    """Argo CD cluster Secrets, BrokerTargets and AppProjects as the API server has them."""
    secrets = await kube.list("/api/v1/namespaces/argocd/secrets", label_selector="argocd.argoproj.io/secret-type=cluster")
    targets = await kube.list("/apis/keyless.dev/v1alpha1/brokertargets")
    projects = await kube.list("/apis/argoproj.io/v1alpha1/namespaces/argocd/appprojects")
    return len(secrets["items"]), len(targets["items"]), len(projects["items"])


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


def is_registered(item: dict) -> bool:
    return any(c["type"] == "ArgoClusterRegistered" and c["status"] == "True"
               for c in (item.get("status") or {}).get("conditions", []))


async def watch_registered(kube: Kube, n: int, started: float, deadline: float) -> float:
    """Seconds from `started` until n manifests are ArgoClusterRegistered, from one watch (a LIST of 5,000
    manifests every second cost the API server as much as a share of the operator's own requests)."""
    path = "/apis/keyless.dev/v1alpha1/remotetenantclusters"
    registered: set[str] = set()
    listing = await kube.list(path)
    version = listing["metadata"]["resourceVersion"]
    registered.update(i["metadata"]["uid"] for i in listing["items"] if is_registered(i))
    while len(registered) < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {len(registered)}/{n} registered in time")
        async for event in kube.watch(path, resource_version=version, timeout_seconds=60):
            obj = event["object"]
            version = obj["metadata"].get("resourceVersion", version)
            if event["type"] in ("ADDED", "MODIFIED") and is_registered(obj):
                registered.add(obj["metadata"]["uid"])
            if len(registered) >= n:
                break
    return time.monotonic() - started


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
        # The operator's defaults (the test fixture's are for fast tests: DEBUG logs, a 1 s retry), but a
        # resync short enough to measure two rounds.
        operator = OperatorProcess(cluster, work / "operator", extra_args=[
            f"--resync-seconds={RESYNC_SECONDS}", "--retry-seconds=5", "--log-level=INFO"]).start()
        ca = ca_data()
        manifests = [rtc_manifest(f"c{i:04d}", tenants[i % 100], tenant=tenants[i % 100], caData=ca) for i in range(n)]
        await asyncio.sleep(2)
        before_counts = apiserver_counts(cluster)
        before = before_counts["all"]
        own = 0
        started = time.monotonic()
        waiting = asyncio.create_task(watch_registered(kube, n, started, started + 900))
        await create_all(kube, manifests)
        own += n + 2  # the creates, the watch's list and watch
        applied = time.monotonic() - started
        elapsed = await waiting
        print(f"all {n} ArgoClusterRegistered after {elapsed:.1f} s", file=sys.stderr, flush=True)
        derived = (0, 0, 0)
        while derived != (n, n, 100):
            derived = await count_derived(kube)
            own += 3
            if time.monotonic() - started > 900:
                raise SystemExit(f"derived objects {derived} of {(n, n, 100)} after 900 s; log {operator.log_path}")
            if derived != (n, n, 100):
                await asyncio.sleep(1)
        derived_seconds = time.monotonic() - started
        print(f"all derived objects after {derived_seconds:.1f} s; waiting out a quiet period with a resync",
              file=sys.stderr, flush=True)
        after_counts = apiserver_counts(cluster)
        requests = after_counts["all"] - before - own - 2  # two metric scrapes
        print(f"requests per manifest by kind: {per_manifest(before_counts, after_counts, n)}", file=sys.stderr,
              flush=True)
        # Settle (the last status writes), then a window holding one whole resync round.
        last, quiet_since = apiserver_counts(cluster), time.monotonic()
        while time.monotonic() - quiet_since < 10 and time.monotonic() - started < 1200:
            await asyncio.sleep(2)
            now = apiserver_counts(cluster)
            if now["writes"] != last["writes"]:
                quiet_since = time.monotonic()
            last = now
        window_start = apiserver_counts(cluster)
        resyncs = operator.metric("keyless_operator_resyncs_total")
        window_started = time.monotonic()
        operator.wait_for_resyncs(2, timeout=2 * RESYNC_SECONDS + 300)  # the next one may already have begun
        window = {key: value - window_start.get(key, 0) for key, value in apiserver_counts(cluster).items()}
        result = {
            "manifests": n,
            "apply_seconds": round(applied, 1),
            "all_registered_seconds": round(elapsed, 1),
            "all_derived_seconds": round(derived_seconds, 1),
            "api_requests_per_manifest": round(requests / n, 1),
            # the bench's own creates, list, watch and polls included here
            "api_requests_per_manifest_by_kind": per_manifest(before_counts, after_counts, n),
            "quiet_window_seconds": round(time.monotonic() - window_started, 1),
            "quiet_window_resync_rounds": int(operator.metric("keyless_operator_resyncs_total") - resyncs),
            "quiet_window_writes": window["writes"],
            "quiet_window_writes_by_kind": {k: v for k, v in window.items()
                                            if " " in k and k.split()[0] not in READS and v},
            "quiet_window_reads": window["reads"] - 1,  # this script's metric scrape is a GET
            "operator_peak_rss_mb": round(peak_rss_mb(operator.process.pid), 1),
            "operator_rss_end_mb": round(rss_mb(operator.process.pid), 1),
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
    print(f"\n| manifests | all ArgoClusterRegistered | all derived objects | API requests / manifest "
          f"| operator peak RSS | writes in a quiet period with a resync | reads of that resync |\n"
          f"|---|---|---|---|---|---|---|\n| {outcome['manifests']} | {outcome['all_registered_seconds']} s "
          f"| {outcome['all_derived_seconds']} s | {outcome['api_requests_per_manifest']} "
          f"| {outcome['operator_peak_rss_mb']} MB | {outcome['quiet_window_writes']} "
          f"| {outcome['quiet_window_reads']} |")
