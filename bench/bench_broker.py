"""Broker benchmark (not a test): mint throughput and latency at 64 concurrent clients, warm review cache,
beside the raw in-process signing rate measured in the same run.

    .venv/bin/python bench/bench_broker.py [--seconds 10] [--connections 64] [--algorithm ES256]

Starts a local API server (etcd + kube-apiserver, no controllers), the real `keyless broker` over
TLS, one BrokerTarget and one Pod-bound caller token; warms the review cache with one request;
then drives `POST /v1/targets/{name}/token` with wrk (Debian package `wrk`; installed with apt-get
when missing and possible). Prints a table and the ratio broker/raw. Targets: >= 2000 tokens/s,
p99 <= 25 ms, broker >= 30 % of raw signing.
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from keyless.broker.signing import ClaimsTemplate, SigningKey, TokenSigner  # noqa: E402
from keyless.envtest.cluster import LocalCluster  # noqa: E402
from tests.broker_fixtures import (CRD_DIR, apply_broker_target, bound_caller_token, caller_pod,  # noqa: E402
                                   ensure_namespace, service_account_username, start_broker)
from tests.helpers import install_crds  # noqa: E402

WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_CALLER_TOKEN")
"""


def ensure_wrk() -> str | None:
    path = shutil.which("wrk")
    if path:
        return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("wrk missing: installing the Debian package", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False, capture_output=True)
        if not shutil.which("wrk"):
            subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True)
            subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False, capture_output=True)
    return shutil.which("wrk")


def raw_signing_rate(algorithm: str, seconds: float) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second) of exactly the broker's per-token claim building
    and signing, in a tight loop in this process, on one core."""
    key = SigningKey.generate(algorithm, time.time(), time.time())
    signer = TokenSigner(key)
    template = ClaimsTemplate("https://broker.example", "keyless:t:argocd", "keyless:ns:cluster")
    count, started, cpu_started = 0, time.perf_counter(), time.process_time()
    deadline = started + seconds
    while True:
        for _ in range(200):
            signer.sign_payload(template.payload(int(time.time()), 60)[0])
        count += 200
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - started), count / (time.process_time() - cpu_started)


def process_cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process (and its reaped children), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(v) for v in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def _seconds(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value).groups()
    return float(number) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[unit]


def run_wrk(wrk: str, url: str, token: str, connections: int, seconds: int, threads: int, workdir: Path) -> dict:
    script = workdir / "mint.lua"
    script.write_text(WRK_SCRIPT)
    result = subprocess.run(
        [wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "5s", "-s", str(script), url],
        capture_output=True, text=True, env={**os.environ, "BENCH_CALLER_TOKEN": token}, timeout=seconds + 60)
    out = result.stdout
    if result.returncode != 0:
        raise RuntimeError(f"wrk failed: {result.stderr or out}")
    latency = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)$", out, re.M))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)$", out, re.M)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p50": _seconds(latency["50"]), "p90": _seconds(latency["90"]), "p99": _seconds(latency["99"]),
            "requests": int(re.search(r"(\d+) requests in", out).group(1)),
            "non_2xx": int(non_2xx.group(1)) if non_2xx else 0, "socket_errors": errors.group(1) if errors else "",
            "raw": out}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--algorithm", choices=["ES256", "RS256"], default="ES256")
    parser.add_argument("--raw-seconds", type=float, default=3.0)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args()

    wrk = ensure_wrk()
    if not wrk:
        print("bench_broker: needs `wrk` (Debian package wrk); install it and re-run", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="keyless-bench-broker-"))
    cluster = LocalCluster("bench", workdir / "cluster", controller_manager=False).start()
    broker = None
    try:
        from kubernetes import config as kconfig

        api = kconfig.new_client_from_config(config_file=str(cluster.kubeconfig))
        install_crds(cluster, CRD_DIR / "brokertargets.keyless.dev.yaml")
        for ns in ("keyless-system", "argocd"):
            ensure_namespace(api, ns)
        caller = service_account_username("argocd", "argocd-application-controller")
        apply_broker_target(api, "keyless-system", "tenants.bench", audience="keyless:tenants:bench",
                            username="keyless:bench:argocd", allowed_callers=[caller], ttl=60)
        pod = caller_pod(api, "argocd", "argocd-application-controller", "argocd-application-controller-0")
        token = bound_caller_token(api, pod)
        broker = start_broker(cluster, "keyless-system", workdir / "broker", "--signing-algorithm", args.algorithm,
                              "--rate-limit-per-second", "1000000", "--rate-limit-burst", "1000000",
                              # a longer positive cache than the default 5 s keeps the run "warm" throughout
                              "--review-cache-seconds", str(args.seconds + 30), "--log-level", "WARNING")
        # The audit log goes to a file as in a cluster (stdout -> container log); it is part of the cost.
        url = f"{broker.url}/v1/targets/tenants.bench/token"
        warm = broker.mint("tenants.bench", token)
        if warm.status_code != 200:
            raise RuntimeError(f"warm-up mint failed: {warm.status_code} {warm.text}")

        raw_before, raw_cpu_before = raw_signing_rate(args.algorithm, args.raw_seconds)
        cpu_before = process_cpu_seconds(broker.process.pid)
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        load = run_wrk(wrk, url, token, args.connections, args.seconds, args.threads, workdir)
        broker_cpu = process_cpu_seconds(broker.process.pid) - cpu_before
        children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        wrk_cpu = (children_after.ru_utime + children_after.ru_stime
                   - children_before.ru_utime - children_before.ru_stime)
        raw_after, raw_cpu_after = raw_signing_rate(args.algorithm, args.raw_seconds)
        raw = (raw_before + raw_after) / 2
        raw_cpu = (raw_cpu_before + raw_cpu_after) / 2
        # The machine is shared: wall-clock rates move with other load. CPU time per token does not,
        # so report that ratio too (raw signing CPU per token / broker CPU per token).
        broker_per_cpu = load["requests"] / broker_cpu if broker_cpu else float("nan")
        with open("/proc/loadavg") as f:
            loadavg = f.read().split()[0]
        reviews = re.search(r"^keyless_broker_token_reviews_total ([\d.e+]+)$", broker.get("/metrics").text, re.M)

        ratio = load["rps"] / raw
        rows = [
            ("algorithm", args.algorithm),
            ("cores", str(os.cpu_count())),
            ("concurrent clients", str(args.connections)),
            ("requests (non-2xx)", f"{load['requests']} ({load['non_2xx']})"),
            ("broker mint throughput", f"{load['rps']:.0f} tokens/s"),
            ("broker p50 / p90 / p99", f"{load['p50'] * 1000:.1f} / {load['p90'] * 1000:.1f} / {load['p99'] * 1000:.1f} ms"),
            ("raw in-process signing", f"{raw:.0f} tokens/s (before {raw_before:.0f}, after {raw_after:.0f})"),
            ("broker / raw (wall)", f"{ratio * 100:.1f} %"),
            ("broker CPU used", f"{broker_cpu:.1f} s of {args.seconds} s ({broker_per_cpu:.0f} tokens per CPU-second)"),
            ("load generator (wrk) CPU used", f"{wrk_cpu:.1f} s"),
            ("raw signing per CPU-second", f"{raw_cpu:.0f} tokens"),
            ("broker / raw (CPU)", f"{broker_per_cpu / raw_cpu * 100:.1f} %"),
            ("load average (1 min)", loadavg),
            ("TokenReviews during run", reviews.group(1) if reviews else "?"),
        ]
        width = max(len(r[0]) for r in rows)
        print("\nKeyless broker benchmark")
        for label, value in rows:
            print(f"  {label:<{width}}  {value}")
        verdicts = [("throughput >= 2000/s", load["rps"] >= 2000), ("p99 <= 25 ms", load["p99"] <= 0.025),
                    ("broker >= 30 % of raw", ratio >= 0.30), ("no errors", load["non_2xx"] == 0)]
        print("  " + ", ".join(f"{name}: {'yes' if ok else 'NO'}" for name, ok in verdicts))
        if load["socket_errors"]:
            print(f"  wrk socket errors: {load['socket_errors']}")
        return 0 if load["non_2xx"] == 0 else 1
    finally:
        if broker is not None:
            broker.stop()
        cluster.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"  work directory kept: {workdir}")


if __name__ == "__main__":
    sys.exit(main())
