"""Broker benchmark (not a test): mint throughput and latency at 64 concurrent clients, warm review cache,
beside the raw in-process signing rate measured in the same run, for each worker count asked for
(`--workers 1,2`: one broker process, then two on one port, side by side in one run).

    .venv/bin/python bench/bench_broker.py [--seconds 10] [--connections 64] [--algorithm ES256] [--workers 1,2]

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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from broker_world import TARGET, broker_world  # noqa: E402
from keyless.broker.signing import ClaimsTemplate, SigningKey, TokenSigner  # noqa: E402

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


def process_tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and its live children (the broker's other workers)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        children = []
    return process_cpu_seconds(pid) + sum(process_tree_cpu_seconds(int(c)) for c in children)


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


def wait_for_workers(broker, workers: int, timeout: float = 60.0) -> None:
    """Worker 0 answers first; the others join the port once they have loaded keys and targets."""
    port = int(broker.url.rsplit(":", 1)[1])
    deadline = time.monotonic() + timeout
    while True:
        listening = sum(1 for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
                        if line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A")
        if listening >= workers:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {listening} of {workers} broker workers listening after {timeout:.0f} s")
        time.sleep(0.2)


def measure(args, wrk: str, workers: int) -> dict:
    # a longer positive review cache than the default 5 s keeps the run "warm" throughout
    with broker_world("keyless-bench-broker-", "--signing-algorithm", args.algorithm, "--workers", str(workers),
                      "--rate-limit-per-second", "1000000", "--rate-limit-burst", "1000000",
                      "--review-cache-seconds", str(args.seconds + 30), "--log-level", "WARNING",
                      keep=args.keep) as world:
        broker, token, workdir = world.broker, world.token, world.workdir
        wait_for_workers(broker, workers)
        for _ in range(4 * workers):  # warm every worker's review cache (new connection each)
            broker.mint(TARGET, token)
        # The audit log goes to a file as in a cluster (stdout -> container log); it is part of the cost.
        url = f"{broker.url}/v1/targets/{TARGET}/token"
        raw_before, raw_cpu_before = raw_signing_rate(args.algorithm, args.raw_seconds)
        cpu_before = process_tree_cpu_seconds(broker.process.pid)
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        load = run_wrk(wrk, url, token, args.connections, args.seconds, args.threads, workdir)
        broker_cpu = process_tree_cpu_seconds(broker.process.pid) - cpu_before
        children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        wrk_cpu = (children_after.ru_utime + children_after.ru_stime
                   - children_before.ru_utime - children_before.ru_stime)
        raw_after, raw_cpu_after = raw_signing_rate(args.algorithm, args.raw_seconds)
        with open("/proc/loadavg") as f:
            loadavg = f.read().split()[0]
        reviews = re.search(r"^keyless_broker_token_reviews_total ([\d.e+]+)$", broker.get_internal("/metrics").text, re.M)
    return {"workers": workers, "load": load, "broker_cpu": broker_cpu, "wrk_cpu": wrk_cpu,
            "raw": (raw_before + raw_after) / 2, "raw_before": raw_before, "raw_after": raw_after,
            "raw_cpu": (raw_cpu_before + raw_cpu_after) / 2, "loadavg": loadavg,
            "reviews": reviews.group(1) if reviews else "?"}


def report(args, m: dict) -> bool:
    load, raw, raw_cpu, broker_cpu = m["load"], m["raw"], m["raw_cpu"], m["broker_cpu"]
    # The machine is shared: wall-clock rates move with other load. CPU time per token does not,
    # so report that ratio too (raw signing CPU per token / broker CPU per token).
    broker_per_cpu = load["requests"] / broker_cpu if broker_cpu else float("nan")
    ratio = load["rps"] / raw
    rows = [
        ("workers", str(m["workers"])),
        ("algorithm", args.algorithm),
        ("cores", str(os.cpu_count())),
        ("concurrent clients", str(args.connections)),
        ("requests (non-2xx)", f"{load['requests']} ({load['non_2xx']})"),
        ("broker mint throughput", f"{load['rps']:.0f} tokens/s"),
        ("broker p50 / p90 / p99", f"{load['p50'] * 1000:.1f} / {load['p90'] * 1000:.1f} / {load['p99'] * 1000:.1f} ms"),
        ("raw in-process signing", f"{raw:.0f} tokens/s (before {m['raw_before']:.0f}, after {m['raw_after']:.0f})"),
        ("broker / raw (wall)", f"{ratio * 100:.1f} %"),
        ("broker CPU used", f"{broker_cpu:.1f} s of {args.seconds} s ({broker_per_cpu:.0f} tokens per CPU-second)"),
        ("load generator (wrk) CPU used", f"{m['wrk_cpu']:.1f} s"),
        ("raw signing per CPU-second", f"{raw_cpu:.0f} tokens"),
        ("broker / raw (CPU)", f"{broker_per_cpu / raw_cpu * 100:.1f} %"),
        ("load average (1 min)", m["loadavg"]),
        ("TokenReviews during run", m["reviews"]),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\nKeyless broker benchmark, {m['workers']} worker(s)")
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    verdicts = [("throughput >= 2000/s", load["rps"] >= 2000), ("p99 <= 25 ms", load["p99"] <= 0.025),
                ("broker >= 30 % of raw", ratio >= 0.30), ("no errors", load["non_2xx"] == 0)]
    print("  " + ", ".join(f"{name}: {'yes' if ok else 'NO'}" for name, ok in verdicts))
    if load["socket_errors"]:
        print(f"  wrk socket errors: {load['socket_errors']}")
    return load["non_2xx"] == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--algorithm", choices=["ES256", "RS256"], default="ES256")
    parser.add_argument("--raw-seconds", type=float, default=3.0)
    parser.add_argument("--workers", default="1", help="broker worker counts to measure, e.g. 1,2 (default 1)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args()

    wrk = ensure_wrk()
    if not wrk:
        print("bench_broker: needs `wrk` (Debian package wrk); install it and re-run", file=sys.stderr)
        return 2
    results = [measure(args, wrk, int(n)) for n in args.workers.split(",")]
    ok = all([report(args, m) for m in results])
    if len(results) > 1:
        print("\n| workers | tokens/s | p50 | p99 | % of raw signing (wall) | % of raw (CPU) | load avg |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for m in results:
            load = m["load"]
            per_cpu = load["requests"] / m["broker_cpu"] / m["raw_cpu"] * 100 if m["broker_cpu"] else float("nan")
            print(f"| {m['workers']} | {load['rps']:.0f} | {load['p50'] * 1000:.1f} ms | {load['p99'] * 1000:.1f} ms "
                  f"| {load['rps'] / m['raw'] * 100:.1f} % | {per_cpu:.1f} % | {m['loadavg']} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
