#!/usr/bin/env python3
"""One agent holding thousands of targets (not a test): does it keep every file valid, at what CPU and
memory, and does the broker see a flat stream of refreshes or bursts?

    .venv/bin/python bench/bench_agent_scale.py [--targets 5000] [--ttl 60] [--minutes 4] [--broker-workers 1]

Starts a local API server (etcd + kube-apiserver), N BrokerTargets allowing Argo CD's application
controller, a Pod-bound caller token for it, the real `keyless broker` (rate limit raised to what the
fleet needs: a per-caller limit of 100/s, the default, is below 5,000 targets at 60 s tokens) and the
real `keyless agent` writing into a memory-backed directory (/dev/shm, as the chart's emptyDir).

Reports: time until every file exists; then over the steady window: the agent's CPU (process CPU time /
wall time) and RSS over time, files found missing or expired by a reader sampling all of them, and the
broker's mints per second for this caller from its audit log (mean, largest second, spread), against the
ideal N/(TTL/2).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from keyless.envtest.cluster import LocalCluster, free_port, start_process, stop_process, tail  # noqa: E402
from keyless.kube import Kube, KubeConfig  # noqa: E402
from tests.broker_fixtures import (CRD_DIR, bound_caller_token, caller_pod, ensure_namespace,  # noqa: E402
                                   service_account_username, start_broker)
from tests.helpers import install_crds  # noqa: E402

KEYLESS = str(ROOT / ".venv" / "bin" / "keyless")
BROKER_NAMESPACE = "keyless-system"
CALLER = service_account_username("argocd", "argocd-application-controller")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text()).group(1)) / 1024


async def create_targets(cluster: LocalCluster, n: int, ttl: int) -> None:
    kube = Kube(KubeConfig.from_kubeconfig(cluster.kubeconfig), connections=32)
    limit = asyncio.Semaphore(32)
    path = f"/apis/keyless.dev/v1alpha1/namespaces/{BROKER_NAMESPACE}/brokertargets"

    async def create(i: int) -> None:
        body = {"apiVersion": "keyless.dev/v1alpha1", "kind": "BrokerTarget",
                "metadata": {"name": f"fleet.c{i:05d}", "namespace": BROKER_NAMESPACE},
                "spec": {"audience": f"keyless:fleet:c{i:05d}", "username": "keyless:fleet:argocd",
                         "allowedCallers": [CALLER], "tokenTTLSeconds": ttl,
                         "clusterRef": {"namespace": "fleet", "name": f"c{i:05d}"}}}
        async with limit:
            await kube.create(path, body)

    try:
        await asyncio.gather(*(create(i) for i in range(n)))
    finally:
        await kube.close()


def sample_files(paths: list[Path]) -> tuple[int, int, int]:
    """(files, expired, unreadable) as a reader (Argo CD's `cat`) would find them now: each opened by its
    name. (Not by listing the directory: a readdir racing renames over its entries may skip some.)"""
    now = time.time()
    found = expired = unreadable = 0
    for path in paths:
        try:
            credential = json.loads(path.read_bytes())
            expiry = datetime.fromisoformat(credential["status"]["expirationTimestamp"].replace("Z", "+00:00"))
        except FileNotFoundError:
            continue  # missing
        except (OSError, ValueError, KeyError):
            unreadable += 1
            continue
        found += 1
        if expiry.timestamp() <= now:
            expired += 1
    return found, expired, unreadable


def mints_per_second(broker_log: Path, start: float, end: float) -> Counter:
    counts: Counter = Counter()
    with open(broker_log, errors="replace") as f:
        for line in f:
            if not line.startswith("{") or '"audit":"token"' not in line or '"outcome":"granted"' not in line:
                continue
            entry = json.loads(line)
            if entry["caller"] != CALLER:
                continue
            at = datetime.fromisoformat(entry["ts"].replace("Z", "+00:00")).timestamp()
            if start <= at < end:
                counts[int(at - start)] += 1
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, default=5000)
    parser.add_argument("--ttl", type=int, default=60, help="token lifetime of every target (s)")
    parser.add_argument("--minutes", type=float, default=4.0, help="steady window measured after start-up")
    parser.add_argument("--broker-workers", type=int, default=1)
    parser.add_argument("--profile", metavar="FILE", help="run the agent under cProfile, stats written to FILE")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="keyless-bench-agent-"))
    credentials = Path(tempfile.mkdtemp(prefix="keyless-bench-agent-", dir="/dev/shm"))
    cluster = LocalCluster("bench", work / "cluster", controller_manager=False,
                           extra_apiserver_args=["--max-requests-inflight=800"])
    cluster.start()
    broker = agent = None
    try:
        from kubernetes import config as kconfig

        api = kconfig.new_client_from_config(config_file=str(cluster.kubeconfig))
        install_crds(cluster, CRD_DIR / "brokertargets.keyless.dev.yaml")
        for ns in (BROKER_NAMESPACE, "argocd"):
            ensure_namespace(api, ns)
        started = time.monotonic()
        asyncio.run(create_targets(cluster, args.targets, args.ttl))
        print(f"{args.targets} BrokerTargets created in {time.monotonic() - started:.0f} s")
        pod = caller_pod(api, "argocd", "argocd-application-controller", "argocd-application-controller-0")
        token_file = work / "token"
        token_file.write_text(bound_caller_token(api, pod, seconds=3 * 3600))
        token_file.chmod(0o600)
        # The fleet's need with head-room: N/(TTL/2) tokens/s steady, the whole fleet at once at start.
        rate = max(100, 4 * args.targets // max(1, args.ttl // 2))
        broker = start_broker(cluster, BROKER_NAMESPACE, work / "broker", "--workers", str(args.broker_workers),
                              "--rate-limit-per-second", str(rate), "--rate-limit-burst", str(args.targets),
                              "--log-level", "WARNING", timeout=120)
        health = free_port()
        agent_log = work / "agent.log"
        profiler = [sys.executable, "-m", "cProfile", "-o", args.profile] if args.profile else []
        agent = start_process([*profiler, KEYLESS, "agent", "--broker-url", broker.url, "--broker-ca-file", broker.ca_file,
                               "--token-file", token_file, "--dir", credentials,
                               "--health-listen", f"127.0.0.1:{health}"], agent_log)
        started = time.monotonic()
        while len(list(credentials.glob("*.json"))) < args.targets:
            if agent.poll() is not None:
                raise SystemExit(f"agent exited: {tail(agent_log)}")
            if time.monotonic() - started > 600:
                raise SystemExit(f"only {len(list(credentials.glob('*.json')))} files after 600 s")
            time.sleep(0.5)
        all_files = time.monotonic() - started
        print(f"all {args.targets} credential files written {all_files:.1f} s after the agent started")
        paths: list[Path] = []
        while len(paths) < args.targets:  # the names once (a listing may miss a file being renamed over)
            paths = sorted(credentials.glob("*.json"))

        # Steady window: from one full refresh period after start-up on.
        time.sleep(args.ttl / 2)
        window_start = time.time()
        cpu_start, wall_start = cpu_seconds(agent.pid), time.monotonic()
        rss: list[float] = []
        samples = []
        while time.time() - window_start < args.minutes * 60:
            rss.append(rss_mb(agent.pid))
            samples.append(sample_files(paths))
            time.sleep(10)
        window_end = time.time()
        cpu = cpu_seconds(agent.pid) - cpu_start
        wall = time.monotonic() - wall_start
        rss.append(rss_mb(agent.pid))
        broker.stop()  # flushes its audit lines
        per_second = mints_per_second(broker.log_path, window_start, window_end)
        seconds = int(window_end - window_start)
        series = [per_second.get(s, 0) for s in range(seconds)]
        ideal = args.targets / (args.ttl / 2)
        per_ten = [sum(series[i:i + 10]) / 10 for i in range(0, seconds - 9, 10)]
        missing = sum(args.targets - found for found, _, _ in samples)
        expired = sum(e for _, e, _ in samples)
        unreadable = sum(u for _, _, u in samples)
        with open("/proc/loadavg") as f:
            load = f.read().split()[:3]
        print(f"\nAgent with {args.targets} targets, {args.ttl} s tokens, {wall / 60:.1f} min steady window, "
              f"{os.cpu_count()} cores, load average {' '.join(load)}")
        rows = [
            ("agent CPU (CPU time / wall)", f"{cpu / wall * 100:.1f} % of one core"),
            ("agent RSS over the window", f"{min(rss):.0f} - {max(rss):.0f} MB (first {rss[0]:.0f}, last {rss[-1]:.0f})"),
            ("files sampled (every 10 s)", f"{len(samples)} x {args.targets}: missing {missing}, expired {expired}, "
                                           f"unreadable {unreadable}"),
            ("mints/s ideal N/(TTL/2)", f"{ideal:.1f}"),
            ("mints/s mean", f"{statistics.fmean(series):.1f}"),
            ("mints/s largest second", f"{max(series)}"),
            ("mints/s 10 s windows min / max", f"{min(per_ten):.1f} / {max(per_ten):.1f}"),
            ("mints/s stdev (1 s)", f"{statistics.pstdev(series):.1f}"),
            ("time until every file existed", f"{all_files:.1f} s"),
        ]
        width = max(len(r[0]) for r in rows)
        for label, value in rows:
            print(f"  {label:<{width}}  {value}")
        histogram = Counter(min(v // 10 * 10, 400) for v in series)
        print("  seconds by mints in that second: " + ", ".join(f"{k}-{k + 9}: {histogram[k]}" for k in sorted(histogram)))
        return 0 if missing == expired == unreadable == 0 else 1
    finally:
        if agent is not None:
            stop_process(agent)
        if broker is not None:
            broker.stop()
        cluster.stop()
        shutil.rmtree(credentials, ignore_errors=True)
        if args.keep:
            print(f"(work dir kept: {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
