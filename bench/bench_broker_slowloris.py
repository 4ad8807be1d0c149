"""Broker under a slow-client attack (not a test): memory and honest callers while unauthenticated
clients hold half-sent TLS requests.

    .venv/bin/python bench/bench_broker_slowloris.py [--attackers 1500] [--seconds 30] [--max-connections 256]

Starts a local API server, the real `keyless broker` over TLS with its default connection limits (the
chart's), one BrokerTarget and one Pod-bound caller token. Then, per phase:

- hold: `--attackers` clients each complete a TLS handshake, send half a request head and never finish
  it (a byte every few seconds), the attack of issue #10 (it took the unguarded broker from 48 to 467 MiB);
- reconnect: the same clients, each opening a new half-sent request one second after the broker
  dropped its previous one (a persistent attacker).

The attackers come from `--attacker-addresses` loopback addresses (127.0.0.2 and up), as from a few
pods; the honest caller, from 127.0.0.1, mints a token every 200 ms, each on a new connection (the
worst case: it needs a free slot every time). Prints the broker's resident memory (baseline, peak of each phase;
the chart's limit is 384 MiB) and the honest caller's success rate and latency.
"""
from __future__ import annotations

import argparse
import asyncio
import resource
import ssl
import statistics
import sys
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))

from broker_world import TARGET, broker_world  # noqa: E402

CHART_MEMORY_LIMIT_MIB = 384
HALF_A_HEAD = f"POST /v1/targets/{TARGET}/token HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer ".encode()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Attack:
    """`count` slow clients against `port`; with `reconnect`, each comes back after being dropped."""

    def __init__(self, port: int, context: ssl.SSLContext, count: int, reconnect: bool, addresses: int):
        self.port, self.context, self.count, self.reconnect = port, context, count, reconnect
        self.addresses = [f"127.0.0.{2 + i}" for i in range(addresses)]
        self.opened = self.dropped = self.failed = 0
        self.stop = asyncio.Event()

    async def _one(self, address: str) -> None:
        while not self.stop.is_set():
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(
                    "127.0.0.1", self.port, ssl=self.context, server_hostname="localhost",
                    local_addr=(address, 0)), timeout=30)
                writer.write(HALF_A_HEAD)
                await writer.drain()
                self.opened += 1
                while not self.stop.is_set():  # trickle, never finish the head
                    try:
                        if await asyncio.wait_for(reader.read(1), timeout=3) == b"":
                            break
                    except asyncio.TimeoutError:
                        writer.write(b"a")
                        await writer.drain()
                self.dropped += 0 if self.stop.is_set() else 1
                writer.close()
            except (OSError, ssl.SSLError, asyncio.TimeoutError):
                self.failed += 1
            if not self.reconnect:
                await self.stop.wait()
                return
            await asyncio.sleep(1.0)

    async def run(self, seconds: float) -> None:
        tasks = []
        for index in range(self.count):
            tasks.append(asyncio.create_task(self._one(self.addresses[index % len(self.addresses)])))
            await asyncio.sleep(0)  # open them as fast as the loop allows
        await asyncio.sleep(seconds)
        self.stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)


def honest_caller(url: str, ca_file: str, token: str, stop: threading.Event, results: list) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        try:
            response = requests.post(url, headers={"Authorization": f"Bearer {token}"}, verify=ca_file, timeout=10)
            results.append((response.status_code == 200, time.perf_counter() - started))
        except requests.RequestException:
            results.append((False, time.perf_counter() - started))
        stop.wait(0.2)


def phase(name: str, broker, token: str, args, reconnect: bool) -> dict:
    context = ssl.create_default_context(cafile=str(broker.ca_file))
    port = int(broker.url.rsplit(":", 1)[1])
    attack = Attack(port, context, args.attackers, reconnect, args.attacker_addresses)
    results: list = []
    stop = threading.Event()
    honest = threading.Thread(target=honest_caller, args=(f"{broker.url}/v1/targets/{TARGET}/token",
                                                          str(broker.ca_file), token, stop, results))
    peak = [rss_mib(broker.process.pid)]
    sampling = threading.Event()

    def sample():
        while not sampling.is_set():
            peak.append(rss_mib(broker.process.pid))
            sampling.wait(0.25)

    sampler = threading.Thread(target=sample)
    sampler.start()
    honest.start()
    asyncio.run(attack.run(args.seconds))
    stop.set()
    honest.join()
    sampling.set()
    sampler.join()
    latencies = sorted(t for ok, t in results if ok)
    return {
        "phase": name, "peak_mib": max(peak), "opened": attack.opened, "dropped": attack.dropped,
        "failed": attack.failed, "honest": len(results), "honest_ok": sum(ok for ok, _ in results),
        "p50_ms": statistics.median(latencies) * 1000 if latencies else float("nan"),
        "p99_ms": latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1000 if latencies else float("nan"),
        "alive": broker.running(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attackers", type=int, default=1500)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--max-connections", type=int, default=256, help="the broker's cap (its default)")
    parser.add_argument("--attacker-addresses", type=int, default=8, help="loopback source addresses of the attackers")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the attacker needs a socket per client
    try:
        with broker_world("keyless-bench-slowloris-", "--log-level", "WARNING", "--max-connections",
                          str(args.max_connections), keep=args.keep) as world:
            broker, token = world.broker, world.token
            time.sleep(2)
            baseline = rss_mib(broker.process.pid)
            phases = [phase("hold", broker, token, args, reconnect=False),
                      phase("reconnect", broker, token, args, reconnect=True)]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    with open("/proc/loadavg") as f:
        loadavg = f.read().split()[0]
    print("\nKeyless broker under a slow-client attack")
    print(f"  attackers {args.attackers} from {args.attacker_addresses} addresses, broker --max-connections "
          f"{args.max_connections}, {args.seconds:.0f} s per phase, load average {loadavg}")
    print(f"  broker RSS at rest: {baseline:.0f} MiB (chart limit {CHART_MEMORY_LIMIT_MIB} MiB)")
    for p in phases:
        print(f"  {p['phase']:<9} peak RSS {p['peak_mib']:.0f} MiB; slow requests opened {p['opened']}, "
              f"dropped by the broker {p['dropped']}, refused {p['failed']}; honest mints "
              f"{p['honest_ok']}/{p['honest']} ok, p50 {p['p50_ms']:.0f} ms, p99 {p['p99_ms']:.0f} ms; "
              f"broker {'alive' if p['alive'] else 'DEAD'}")
    ok = all(p["alive"] and p["peak_mib"] < CHART_MEMORY_LIMIT_MIB and p["honest_ok"] == p["honest"] for p in phases)
    print(f"  under the memory limit and every honest mint served: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
