"""Benchmark: latency of the tenant guardrail webhook under concurrent admission reviews.

Starts a local kube-apiserver (for kopf and the RemoteTenantCluster watch), registers
--tenants tenants with two clusters each, runs `python -m keyless.webhooks` as a separate process,
then POSTs AdmissionReview JSON straight to it over TLS (keep-alive connections, like the API
server) with --concurrency reviews in flight, and prints p50/p90/p99 per kind of review.

    .venv/bin/python bench/bench_webhook.py [--concurrency 200] [--requests 6000] [--tenants 500]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from keyless import pki  # noqa: E402
from keyless.envtest import binaries  # noqa: E402
from keyless.envtest.cluster import LocalCluster, free_port, start_process, stop_process  # noqa: E402
from tests.guardrails_cases import application, application_set, remote_tenant_cluster  # noqa: E402

TENANT = "keyless.dev/tenant"


def kubectl(cluster: LocalCluster, *args: str, input: str | None = None) -> None:
    result = subprocess.run([str(binaries.find("kubectl")), f"--kubeconfig={cluster.kubeconfig}", *args],
                            input=input, text=True, capture_output=True)
    if result.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(args)}: {result.stderr}")


def review(resource: str, kind: str, obj: dict, user: str, groups: list[str]) -> dict:
    gvk = {"group": "argoproj.io", "version": "v1alpha1", "kind": kind}
    gvr = {"group": "argoproj.io", "version": "v1alpha1", "resource": resource}
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": str(uuid.uuid4()), "kind": gvk, "resource": gvr, "requestKind": gvk, "requestResource": gvr,
        "name": obj["metadata"]["name"], "namespace": obj["metadata"]["namespace"], "operation": "CREATE",
        "userInfo": {"username": user, "groups": groups + ["system:authenticated"]},
        "object": obj, "oldObject": None, "dryRun": False,
        "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}}}


def workload(tenants: int) -> list[tuple[str, str, dict, bool]]:
    """(label, path, AdmissionReview, expected allowed) — a mix of what tenants send."""
    items = []
    for i in range(tenants):
        tenant, other = f"tenant-{i}", f"tenant-{(i + 1) % tenants}"
        user, groups = f"user-{i}", [f"{tenant}-devs"]
        own = f"https://dev.{tenant}.example.com"
        items += [
            # Each tenant's requests come from its own namespace (named after it).
            ("Application allowed", "validate-application",
             review("applications", "Application",
                    application(f"own-{i}", tenant, {"server": own}, namespace=tenant), user, groups), True),
            ("Application refused", "validate-application",
             review("applications", "Application",
                    application(f"cross-{i}", tenant, {"server": f"https://dev.{other}.example.com"},
                                namespace=tenant), user, groups),
             False),
            ("ApplicationSet allowed", "validate-applicationset",
             review("applicationsets", "ApplicationSet", application_set(
                 f"own-set-{i}", [{"matrix": {"generators": [
                     {"git": {"repoURL": "https://git.example.com/a.git", "revision": "HEAD",
                              "directories": [{"path": "apps/*"}]}},
                     {"clusters": {"selector": {"matchLabels": {TENANT: tenant}}}}]}}], project=tenant,
                 namespace=tenant), user, groups), True),
            ("ApplicationSet refused", "validate-applicationset",
             review("applicationsets", "ApplicationSet", application_set(
                 f"cross-set-{i}", [{"clusters": {"selector": {"matchLabels": {"environment": "development"}}}}],
                 project=tenant, namespace=tenant), user, groups), False),
            ("Application mutated", "mutate-application",
             review("applications", "Application",
                    application(f"mutate-{i}", tenant, {"namespace": "x"}, labels={"environment": "production"},
                                namespace=tenant), user, groups), True),
        ]
    return items


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


async def hammer(base: str, ca_pem: bytes, items, concurrency: int, total: int):
    context = ssl.create_default_context(cadata=ca_pem.decode())
    latencies: dict[str, list[float]] = {}
    wrong = 0
    semaphore = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(ssl=context, limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        async def one(index: int) -> None:
            nonlocal wrong
            label, path, body, expected = items[index % len(items)]
            payload = json.dumps(body)
            async with semaphore:
                started = time.perf_counter()
                async with session.post(f"{base}/{path}", data=payload,
                                        headers={"Content-Type": "application/json"}) as response:
                    answer = await response.json()
                elapsed = time.perf_counter() - started
            latencies.setdefault(label, []).append(elapsed)
            if answer["response"]["allowed"] != expected or (label == "Application mutated"
                                                             and "patch" not in answer["response"]):
                wrong += 1

        await asyncio.gather(*(one(i) for i in range(min(concurrency, total))))  # warm up connections
        latencies.clear()
        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(total)))
        wall = time.perf_counter() - started
    return latencies, wall, wrong


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--tenants", type=int, default=500, help="tenants registered (two clusters each)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="keyless-bench-webhook-"))
    cluster = LocalCluster("bench", work / "cluster", controller_manager=False)
    process = None
    try:
        cluster.start()
        kubectl(cluster, "apply", "--server-side", "-f", str(ROOT / "crds" / "remotetenantclusters.keyless.dev.yaml"))
        for crd in sorted((ROOT.parent / "shared" / "testdata" / "argocd-crds").glob("*.yaml")):
            kubectl(cluster, "apply", "--server-side", "-f", str(crd))
        for attempt in range(50):  # right after creation a CRD has no conditions, which kubectl wait rejects
            try:
                kubectl(cluster, "wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
                break
            except SystemExit:
                time.sleep(0.2)
        kubectl(cluster, "create", "namespace", "keyless-system")
        namespaces = [{"apiVersion": "v1", "kind": "Namespace",
                       "metadata": {"name": f"tenant-{i}", "labels": {TENANT: f"tenant-{i}"}}} for i in range(args.tenants)]
        kubectl(cluster, "apply", "--server-side", "-f", "-",
                input=json.dumps({"apiVersion": "v1", "kind": "List", "items": namespaces}))
        clusters = [remote_tenant_cluster(f"{env}-{i}", f"tenant-{i}", f"https://{env}.tenant-{i}.example.com",
                                          {"environment": environment})
                    for i in range(args.tenants) for env, environment in (("dev", "development"), ("prod", "production"))]
        for start in range(0, len(clusters), 200):
            kubectl(cluster, "apply", "--server-side", "-f", "-",
                    input=json.dumps({"apiVersion": "v1", "kind": "List", "items": clusters[start:start + 200]}))

        ca, _ = pki.new_ca("bench-webhook-ca")
        serving = pki.issue_certificate(ca, "keyless-webhooks", server=True, ip_addresses=("127.0.0.1",))
        (work / "tls.crt").write_bytes(serving.cert_pem)
        (work / "tls.key").write_bytes(serving.key_pem)
        port = free_port()
        process = start_process(
            [sys.executable, "-m", "keyless.webhooks", f"--kubeconfig={cluster.kubeconfig}",
             f"--listen=127.0.0.1:{port}", f"--tls-cert-file={work / 'tls.crt'}", f"--tls-key-file={work / 'tls.key'}"],
            work / "webhooks.log", env=dict(os.environ))
        context = ssl.create_default_context(cadata=ca.cert_pem.decode())
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{port}/readyz", context=context, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                print((work / "webhooks.log").read_text()[-3000:], file=sys.stderr)
                return 1
            time.sleep(0.2)

        latencies, wall, wrong = asyncio.run(
            hammer(f"https://127.0.0.1:{port}", ca.cert_pem, workload(args.tenants), args.concurrency, args.requests))
    finally:
        if process is not None:
            stop_process(process)
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)

    everything = [v for values in latencies.values() for v in values]
    print(f"\nKeyless guardrail webhook: {args.requests} AdmissionReviews, {args.concurrency} in flight, "
          f"{args.tenants} tenants / {2 * args.tenants} clusters in the directory, one webhook process, "
          f"{os.cpu_count()} CPUs (shared)\n")
    print(f"{'review':<24}{'count':>7}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}")
    for label, values in sorted(latencies.items()) + [("all", everything)]:
        print(f"{label:<24}{len(values):>7}{1000 * statistics.median(values):>9.1f}"
              f"{1000 * percentile(values, 0.90):>9.1f}{1000 * percentile(values, 0.99):>9.1f}"
              f"{1000 * max(values):>9.1f}")
    print(f"\nthroughput {len(everything) / wall:.0f} reviews/s; wrong answers: {wrong}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
