"""The real Argo CD through Keyless: time from applying a RemoteTenantCluster to its first Synced Application,
and what the exec credential costs per cluster with the real application controller, against the seed's
bash + curl plugin measured in the same run.

One stack (keyless.envtest.stack): control plane, broker, operator, Argo CD v3 with the agent beside its
controller, and two Direct-mode tenant clusters:

  keyless  a RemoteTenantCluster; Argo CD's exec command is `cat <agent's file>` (the operator's Secret)
  seed     registered by hand as the seed recipe did: a cluster Secret whose exec command is the seed's bash
           + curl plugin calling the broker's seed-compatible GET /api/get-target-token on every call, with
           a BrokerTarget for the same identity and token lifetime (60 s)

Both tenants get a commit every ~20 s for --minutes (default 5), synced automatically. Each exec call goes
through a wrapper first on the controller's PATH (or in front of the seed plugin) that spawns the real
command and records its wall time and CPU (wait4 rusage of the command and its children: bash, curl).
The tenants' audit logs count the 401s each approach causes; the broker's audit lines count the tokens
minted per cluster; /proc gives the agent's own CPU.

Not a test: `python bench/bench_argocd.py [--minutes N] [--keep]`. Needs the Go-built binaries (`make bins`,
including argocd and redis) and curl.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from keyless.envtest.argocd import NAMESPACE  # noqa: E402
from keyless.envtest.gitrepo import LocalGitRepository  # noqa: E402
from keyless.envtest.stack import BROKER_NAMESPACE, KeylessStack, config_map_manifest, tenant_application_set  # noqa: E402
from keyless.envtest.tenants import TenantCluster  # noqa: E402
from tests.argocd_checks import application, errors_of, sync_state, unauthenticated, wait_synced  # noqa: E402

KEYLESS = TenantCluster("keyless", "keyless-dev")
SEED = TenantCluster("seed", "seed-dev")
APP_NAMESPACE = "hello"
COMMIT_EVERY = 20.0
CONTROLLER_SA = f"system:serviceaccount:{NAMESPACE}:argocd-application-controller"

# The seed's plugin (reference article), unchanged but for --cacert: our broker has its own CA.
SEED_PLUGIN = """#!/bin/bash
REMOTE_TOKEN=$(curl --cacert "$4" -H "Authorization: Bearer $(<$3)" https://$1/api/get-target-token?targetName=$2 2>/dev/null)

echo -n "{\\"apiVersion\\": \\"client.authentication.k8s.io/v1\\",\\"kind\\": \\"ExecCredential\\",\\"status\\": {\\"token\\": \\"$REMOTE_TOKEN\\"}}"
"""

# Spawns the real command (stdout/stderr go straight to client-go) and logs one JSON line with what it cost.
MEASURE = """#!{python} -S
import json, os, sys, time
log, real = {log!r}, {real!r}
args = [real, *sys.argv[1:]] if real else sys.argv[1:]
started = time.perf_counter()
pid = os.posix_spawn(args[0], args, os.environ)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - started
with open(log, "a") as f:
    f.write(json.dumps({{"ppid": os.getppid(), "at": time.time(), "command": os.path.basename(args[0]),
                        "args": args[1:], "wall": wall, "cpu": usage.ru_utime + usage.ru_stime}}) + "\\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def write_measuring_wrappers(directory: Path, log: Path) -> tuple[Path, Path]:
    """`cat` (first on the controller's PATH) and `measure <command> <args>` (in front of the seed plugin)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, real in (("cat", shutil.which("cat")), ("measure", "")):
        path = directory / name
        path.write_text(MEASURE.format(python=sys.executable, log=str(log), real=real))
        path.chmod(0o755)
        paths.append(path)
    return paths[0], paths[1]


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def register_seed_cluster(stack: KeylessStack, measure: Path, plugin: Path, repo_url: str) -> None:
    """What the seed recipe did by hand: a broker target, a cluster Secret with the curl plugin, a project, an app."""
    tenant = stack.tenants[SEED.name]
    token_file = stack.argocd.broker_token_file
    host_port = stack.issuer.removeprefix("https://")
    config = {"tlsClientConfig": {"insecure": False, "caData": base64.b64encode(tenant.cluster.ca_pem).decode()},
              "execProviderConfig": {"command": str(measure), "apiVersion": "client.authentication.k8s.io/v1",
                                     "args": [str(plugin), host_port, SEED.target, str(token_file),
                                              str(stack.broker_ca_file)]}}
    server = tenant.cluster.server
    stack.apply(stack.control,
                {"apiVersion": "keyless.dev/v1alpha1", "kind": "BrokerTarget",
                 "metadata": {"name": SEED.target, "namespace": BROKER_NAMESPACE},
                 "spec": {"audience": SEED.audience, "username": SEED.username, "allowedCallers": [CONTROLLER_SA],
                          "tokenTTLSeconds": 60}},
                {"apiVersion": "v1", "kind": "Secret",
                 "metadata": {"name": "seed-cluster", "namespace": NAMESPACE,
                              "labels": {"argocd.argoproj.io/secret-type": "cluster"}},
                 "stringData": {"name": SEED.name, "server": server, "project": SEED.tenant, "config": json.dumps(config)}},
                {"apiVersion": "argoproj.io/v1alpha1", "kind": "AppProject",
                 "metadata": {"name": SEED.tenant, "namespace": NAMESPACE},
                 "spec": {"sourceRepos": ["*"], "destinations": [{"server": server, "namespace": "*"}],
                          "clusterResourceWhitelist": [{"group": "*", "kind": "*"}]}},
                {"apiVersion": "argoproj.io/v1alpha1", "kind": "Application",
                 "metadata": {"name": f"{SEED.name}-{APP_NAMESPACE}", "namespace": NAMESPACE},
                 "spec": {"project": SEED.tenant,
                          "source": {"repoURL": repo_url, "targetRevision": "main", "path": SEED.tenant},
                          "destination": {"server": server, "namespace": APP_NAMESPACE},
                          "syncPolicy": {"automated": {"prune": True, "selfHeal": True},
                                         "syncOptions": ["CreateNamespace=true"],
                                         "retry": {"limit": 20, "backoff": {"duration": "5s", "factor": 2,
                                                                            "maxDuration": "20s"}}}}})


def time_to_first_sync(stack: KeylessStack, repo_url: str) -> dict[str, float]:
    """Applies the keyless RemoteTenantCluster (its tenant's ApplicationSet already waits) and times each stage."""
    stack.apply(stack.control, tenant_application_set(KEYLESS.tenant, repo_url, KEYLESS.tenant, APP_NAMESPACE))
    app = f"{KEYLESS.name}-{APP_NAMESPACE}"
    started = time.monotonic()
    stack.apply_cluster(KEYLESS.name)
    stages: dict[str, float] = {}
    deadline = started + 300
    while "synced" not in stages:
        now = time.monotonic() - started
        if "secret" not in stages and stack.get(stack.control, "secret", KEYLESS.argocd_secret_name, "-n", NAMESPACE):
            stages["secret"] = now
        ready = stack.condition(KEYLESS.name)
        if "ready" not in stages and ready and ready["status"] == "True":
            stages["ready"] = now
        if "credential" not in stages and (stack.argocd.credential_dir / f"{KEYLESS.target}.json").exists():
            stages["credential"] = now
        found = application(stack, app)
        if "application" not in stages and found:
            stages["application"] = now
        if found and sync_state(found)[:2] == ("Synced", "Healthy"):
            stages["synced"] = now
        if time.monotonic() > deadline:
            raise SystemExit(f"{app} not Synced within 300 s: {sync_state(found)} {errors_of(found)}\n{stack.logs()}")
        time.sleep(0.2)
    return stages


def broker_mints(stack: KeylessStack, start: float) -> dict[tuple[str, str], int]:
    """Tokens granted to Argo CD's identity since `start`, by (target, endpoint): the agent uses `token`, the
    seed plugin `get-target-token` (the agent also keeps a file for the seed's target: same identity)."""
    counts: dict[tuple[str, str], int] = {}
    for line in stack.broker.log.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"audit":"token"' in line:
            entry = json.loads(line)
            if entry["outcome"] == "granted" and entry["caller"] == CONTROLLER_SA and _epoch(entry["ts"]) >= start:
                key = (entry["target"], entry["endpoint"])
                counts[key] = counts.get(key, 0) + 1
    return counts


def _epoch(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def run(minutes: float, keep: bool) -> int:
    if not shutil.which("curl"):
        raise SystemExit("curl is needed for the seed plugin: apt-get install -y curl")
    work = Path(tempfile.mkdtemp(prefix="keyless-bench-argocd-"))
    exec_log = work / "exec-calls.jsonl"
    cat_wrapper, measure = write_measuring_wrappers(work / "controller-path", exec_log)
    plugin = work / "seed-plugin.sh"
    plugin.write_text(SEED_PLUGIN)
    plugin.chmod(0o755)
    stack = KeylessStack(work / "stack", [KEYLESS, SEED], controller_path_prefix=[cat_wrapper.parent])
    try:
        started = time.monotonic()
        stack.start()
        print(f"stack up in {time.monotonic() - started:.0f} s (control plane, 2 tenants, broker, operator, Argo CD)")
        repo = LocalGitRepository(work / "repo")
        repo.commit({f"{c.tenant}/hello.yaml": config_map_manifest("hello", {"revision": "0"}) for c in (KEYLESS, SEED)},
                    "revision 0")
        register_seed_cluster(stack, measure, plugin, repo.url)
        stages = time_to_first_sync(stack, repo.url)
        wait_synced(stack, f"{SEED.name}-{APP_NAMESPACE}")

        window_start = time.time()
        agent_pid = stack.argocd.process_pid("agent")
        agent_cpu_start = process_cpu_seconds(agent_pid)
        revision = 0
        errors: dict[str, set[str]] = {KEYLESS.name: set(), SEED.name: set()}
        while time.time() - window_start < minutes * 60:
            commit_at = time.monotonic()
            revision += 1
            repo.commit({f"{c.tenant}/hello.yaml": config_map_manifest("hello", {"revision": str(revision)})
                         for c in (KEYLESS, SEED)}, f"revision {revision}")
            while time.monotonic() - commit_at < COMMIT_EVERY:
                for cluster in (KEYLESS, SEED):
                    errors[cluster.name].update(errors_of(application(stack, f"{cluster.name}-{APP_NAMESPACE}")))
                time.sleep(1)
        window_end = time.time()
        elapsed_minutes = (window_end - window_start) / 60
        agent_cpu = process_cpu_seconds(agent_pid) - agent_cpu_start
        mints = broker_mints(stack, window_start)

        calls = [json.loads(line) for line in exec_log.read_text().splitlines()]
        calls = [c for c in calls if window_start <= c["at"] <= window_end]
        keyless_file = f"{stack.argocd.exec_credential_dir}/{KEYLESS.target}.json"
        per_cluster = {
            KEYLESS.name: [c for c in calls if c["command"] == "cat" and c["args"] == [keyless_file]],
            SEED.name: [c for c in calls if c["command"] == plugin.name],
        }
        by_controller = all(c["ppid"] == stack.argocd.controller_pid for cs in per_cluster.values() for c in cs)
        ms = lambda s: f"{s * 1000:.2f} ms"  # noqa: E731

        print(f"\nRemoteTenantCluster applied -> first Synced+Healthy Application (ApplicationSet already waiting): "
              f"**{stages['synced']:.1f} s** (cluster Secret {stages.get('secret', float('nan')):.1f} s, "
              f"Ready {stages.get('ready', float('nan')):.1f} s, Application generated "
              f"{stages.get('application', float('nan')):.1f} s, agent's credential file "
              f"{stages.get('credential', float('nan')):.1f} s)")
        print(f"\nSteady state, {elapsed_minutes:.1f} min, a commit every {COMMIT_EVERY:.0f} s to each tenant, 60 s tokens; "
              f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; every exec call's parent was the controller: "
              f"{by_controller}\n")
        print("| per cluster | Keyless agent (`cat` of the agent's file) | seed bash + curl plugin |")
        print("|---|---:|---:|")
        rows = []
        endpoint = {KEYLESS.name: "token", SEED.name: "get-target-token"}
        for name in (KEYLESS.name, SEED.name):
            cs = per_cluster[name]
            cpu = [c["cpu"] for c in cs]
            wall = [c["wall"] for c in cs]
            rows.append({
                "exec calls / min": f"{len(cs) / elapsed_minutes:.1f}",
                "CPU per exec call (mean)": ms(statistics.fmean(cpu)) if cpu else "-",
                "wall per exec call (mean)": ms(statistics.fmean(wall)) if wall else "-",
                "exec CPU / min": ms(sum(cpu) / elapsed_minutes),
                "tokens minted for it / min": f"{mints.get((stack.clusters[name].target, endpoint[name]), 0) / elapsed_minutes:.1f}",
                "401s from the tenant / min": f"{len(unauthenticated(stack.tenants[name].audit_events(), window_start, window_end)) / elapsed_minutes:.1f}",
                "Argo CD errors seen (distinct)": str(len(errors[name])),
            })
        # The agent keeps a file for both targets (the seed's too: same identity), so half its CPU is one cluster's.
        rows[0]["agent CPU / min (half of its 2 targets)"] = ms(agent_cpu / 2 / elapsed_minutes)
        rows[1]["agent CPU / min (half of its 2 targets)"] = "-"
        for key in rows[0]:
            print(f"| {key} | {rows[0][key]} | {rows[1][key]} |")
        for name, seen in errors.items():
            for message in sorted(seen)[:3]:
                print(f"  {name}: {message[:200]}")
        return 0
    finally:
        stack.stop()
        if keep:
            print(f"(work dir kept: {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="steady-state window (default %(default)s)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs) afterwards")
    args = parser.parse_args()
    return run(args.minutes, args.keep)


if __name__ == "__main__":
    sys.exit(main())
