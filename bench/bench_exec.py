"""Argo CD's hot path: how long the configured exec command takes, per call.

client-go runs the exec command of a cluster whenever its cached credential expires: with 60-second
tokens, once a minute per tenant cluster, from the application controller (and argocd-server).
Compared, against the same real broker on loopback:

  agent          `cat <dir>/<target>.json`: the default exec command, a file the agent keeps fresh
  seed           the seed recipe's bash + curl plugin calling the seed-compatible GET /api/get-target-token
  keyless token  the on-demand Python exec plugin (POST /v1/targets/{name}/token)

Each command runs many times through hyperfine (no shell in between); mean, p50 and p99 per call, and
how many times slower than the agent path. Not a test: run `python bench/bench_exec.py [--runs N]`.
Needs the Go-built binaries (`make bins`), curl and hyperfine (`apt-get install -y curl hyperfine`;
without hyperfine a Python timing loop is used and says so).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from keyless.envtest.cluster import LocalCluster, free_port, start_process, stop_process  # noqa: E402
from tests.broker_fixtures import (CRD_DIR, KEYLESS, apply_broker_target, bound_caller_token, caller_pod,  # noqa: E402
                                   ensure_namespace, service_account_username, start_broker)
from tests.helpers import install_crds  # noqa: E402

TARGET_SPEEDUP = 5.0
BROKER_NAMESPACE = "keyless-system"
TARGET = "tenants.bench"

# The seed's plugin (reference article), unchanged but for --cacert: our test broker has its own CA.
SEED_PLUGIN = """#!/bin/bash
REMOTE_TOKEN=$(curl --cacert "$4" -H "Authorization: Bearer $(<$3)" https://$1/api/get-target-token?targetName=$2 2>/dev/null)

echo -n "{\\"apiVersion\\": \\"client.authentication.k8s.io/v1\\",\\"kind\\": \\"ExecCredential\\",\\"status\\": {\\"token\\": \\"$REMOTE_TOKEN\\"}}"
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def time_with_hyperfine(name: str, command: list[str], runs: int, work: Path) -> list[float]:
    export = work / f"{name}.json"
    subprocess.run(["hyperfine", "--style", "none", "-N", "--warmup", "5", "--runs", str(runs),
                    "--export-json", str(export), "--", " ".join(_quote(c) for c in command)],
                   check=True, stdout=subprocess.DEVNULL)
    result = json.loads(export.read_text())["results"][0]
    if any(code != 0 for code in result.get("exit_codes", [])):
        raise RuntimeError(f"{name}: some runs failed")
    return result["times"]


def time_with_python(command: list[str], runs: int) -> list[float]:
    for _ in range(5):
        subprocess.run(command, stdout=subprocess.DEVNULL, check=True)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, stdout=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - started)
    return times


def _quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\\''") + "'" if any(c in arg for c in " \"'$") else arg


def check_output_is_a_credential(name: str, command: list[str]) -> None:
    """Every contestant must really return a usable ExecCredential, or the comparison means nothing."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    try:
        credential = json.loads(result.stdout)
        token = credential["status"]["token"]
        assert credential["kind"] == "ExecCredential" and token.count(".") == 2
    except (ValueError, KeyError, AssertionError):
        raise SystemExit(f"{name}: did not print an ExecCredential with a token (exit {result.returncode}): "
                         f"{result.stderr.strip()[:300]}")


def run(runs: int, keep: bool) -> int:
    if not shutil.which("curl"):
        raise SystemExit("curl is needed for the seed plugin: apt-get install -y curl")
    use_hyperfine = shutil.which("hyperfine") is not None
    work = Path(tempfile.mkdtemp(prefix="keyless-bench-"))
    cluster = LocalCluster("bench", work / "control", controller_manager=False)
    broker = agent = None
    try:
        cluster.start()
        from kubernetes import config
        api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
        install_crds(cluster, CRD_DIR / "brokertargets.keyless.dev.yaml")
        for ns in (BROKER_NAMESPACE, "argocd"):
            ensure_namespace(api, ns)
        controller = service_account_username("argocd", "argocd-application-controller")
        apply_broker_target(api, BROKER_NAMESPACE, TARGET, audience="keyless:tenants:bench",
                            username="keyless:bench:argocd", allowed_callers=[controller], ttl=60)
        # Generous limits: the benchmark calls far faster than one controller ever would.
        broker = start_broker(cluster, BROKER_NAMESPACE, work / "broker", "--key-prepublish-seconds", "0",
                              "--rate-limit-per-second", "100000", "--rate-limit-burst", "100000",
                              "--review-rate-limit-per-second", "100000", "--review-rate-limit-burst", "100000")
        pod = caller_pod(api, "argocd", "argocd-application-controller", "argocd-application-controller-0")
        token_file = work / "token"
        token_file.write_text(bound_caller_token(api, pod, seconds=3600))
        token_file.chmod(0o600)

        credentials = work / "credentials"
        agent = start_process([KEYLESS, "agent", "--broker-url", broker.url, "--broker-ca-file", broker.ca_file,
                               "--token-file", token_file, "--dir", credentials,
                               "--health-listen", f"127.0.0.1:{free_port()}"], work / "agent.log")
        credential_file = credentials / f"{TARGET}.json"
        deadline = time.monotonic() + 60
        while not credential_file.exists():
            if time.monotonic() > deadline or agent.poll() is not None:
                raise SystemExit(f"the agent wrote no credential; log {work / 'agent.log'}")
            time.sleep(0.1)

        seed_plugin = work / "seed-plugin.sh"
        seed_plugin.write_text(SEED_PLUGIN)
        seed_plugin.chmod(0o755)
        host_port = broker.url.removeprefix("https://")
        contestants = [
            ("agent", "`cat <dir>/<target>.json` (agent, the default)",
             [shutil.which("cat"), str(credential_file)]),
            ("seed", "seed bash + curl plugin → GET /api/get-target-token",
             [str(seed_plugin), host_port, TARGET, str(token_file), str(broker.ca_file)]),
            ("token", "`keyless token` (on-demand plugin, Python)",
             [str(KEYLESS), "token", "--broker-url", broker.url, "--target", TARGET,
              "--broker-ca-file", str(broker.ca_file), "--token-file", str(token_file)]),
        ]
        results = {}
        for name, _, command in contestants:
            check_output_is_a_credential(name, command)
            times = (time_with_hyperfine(name, command, runs, work) if use_hyperfine
                     else time_with_python(command, runs))
            results[name] = times

        agent_mean = statistics.fmean(results["agent"])
        ms = lambda s: f"{s * 1000:.2f} ms"  # noqa: E731
        print(f"\nArgo CD's exec hot path, {runs} calls each "
              f"({'hyperfine, no shell' if use_hyperfine else 'Python subprocess loop'}; {os.cpu_count()} CPUs, "
              f"load {os.getloadavg()[0]:.2f}; broker and API server on loopback)\n")
        print("| exec command | mean | p50 | p99 | vs agent |")
        print("|---|---:|---:|---:|---:|")
        for name, label, _ in contestants:
            times = results[name]
            mean = statistics.fmean(times)
            relative = "1×" if name == "agent" else f"{mean / agent_mean:.1f}× slower"
            print(f"| {label} | {ms(mean)} | {ms(percentile(times, 50))} | {ms(percentile(times, 99))} | {relative} |")
        speedup = statistics.fmean(results["seed"]) / agent_mean
        verdict = "met" if speedup >= TARGET_SPEEDUP else "NOT met"
        print(f"\nAgent path vs bash + curl: {speedup:.1f}× faster (target ≥ {TARGET_SPEEDUP:.0f}×: {verdict}).")
        return 0 if speedup >= TARGET_SPEEDUP else 1
    finally:
        if agent is not None:
            stop_process(agent)
        if broker is not None:
            broker.stop()
        cluster.stop()
        if keep:
            print(f"(work dir kept: {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300, help="calls per command (default %(default)s)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs) afterwards")
    args = parser.parse_args()
    return run(args.runs, args.keep)


if __name__ == "__main__":
    sys.exit(main())
