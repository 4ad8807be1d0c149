#!/usr/bin/env python3
"""Fault soak (not a test): the real Argo CD syncing three tenant clusters through Keyless while a schedule
kills and restarts its parts one at a time. Bounded in time, loopback and one test-node network only.

    sudo .venv/bin/python bench/soak.py [--minutes 22] [--keep]

The stack (keyless.envtest.stack, as `make demo` runs it, plus replicas):
- a control plane; two broker replicas behind one issuer address (a TCP balancer in this process, as a
  Service in a cluster), keys rotating every --key-rotation-seconds (default 480: two or more rotations);
  two operators with leader election; Argo CD v3 with the agent beside its application controller;
- tenants: soak-a (Managed: kube-oidc-proxy, 2 replicas, as Pods on its real node), soak-b and soak-c
  (Direct: their API servers trust the broker), one ApplicationSet each; a commit to every tenant's
  path every ~20 s, synced automatically.

Faults, one at a time, --fault-every seconds apart (default 100) after a 2-minute warm-up: the broker's key
writer (SIGKILL, back after 5 s), a broker follower, the operator leader, the agent, one proxy replica
(Pod deleted), soak-b's API server (restarted), the control plane's API server, its etcd (down 5 s), and
soak-a's CA (the proxy CA Secret deleted: the operator issues a new CA, re-registers it with Argo CD and
rolls the proxy). Key rotations happen on their own, and their times are read back from the brokers' logs.

Recorded with their times: every error an Application shows (ApplicationMonitor), each second in which
the agent's credential file of a cluster is missing or expired, each RemoteTenantCluster not Ready, the
Direct tenants' 401 answers (audit logs), and for each commit the time until every Application synced
it. Each Keyless process's RSS is sampled every 10 s. The report (stdout and soak-report.json) gives, for
each fault, the window in which anything failed (from the fault's start), and checks that nothing is lost
at the end: every manifest Ready, every derived object present, every Application synced to the last
commit and that commit's ConfigMap on every tenant.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from keyless.envtest.argocd import NAMESPACE as ARGOCD_NAMESPACE  # noqa: E402
from keyless.envtest.balancer import TcpBalancer  # noqa: E402
from keyless.envtest.cluster import free_port  # noqa: E402
from keyless.envtest.gitrepo import LocalGitRepository  # noqa: E402
from keyless.envtest.stack import (BROKER_NAMESPACE, KeylessStack, Service, config_map_manifest,  # noqa: E402
                                   tenant_application_set)
from keyless.envtest.tenants import TenantCluster  # noqa: E402
from keyless.model import names  # noqa: E402
from tests.argocd_checks import application, errors_of, sync_state, unauthenticated  # noqa: E402

CLUSTERS = [TenantCluster("soak-a", "soak-a-dev"), TenantCluster("soak-b", "soak-b-dev"),
            TenantCluster("soak-c", "soak-c-dev")]
MODES = {"soak-a-dev": "Managed", "soak-b-dev": "Direct", "soak-c-dev": "Direct"}
APP_NAMESPACE = "hello"
COMMIT_EVERY = 20.0


class SoakStack(KeylessStack):
    """KeylessStack with two broker replicas behind the issuer address and two operators electing a leader."""

    def _start_broker(self) -> None:
        ports = [free_port(self.broker_host), free_port(self.broker_host)]
        self.brokers = [self.broker_replica(f"broker-{i}", port) for i, port in enumerate(ports)]
        self.balancer = TcpBalancer(self.broker_host, self.broker_port, [(self.broker_host, p) for p in ports]).start()
        for broker in self.brokers:
            broker.start()
        self.broker = self.brokers[0]

    def _start_operator(self) -> None:
        super()._start_operator()
        health = free_port()
        second = Service("operator-1", self.operator_argv(health), self.dir / "operator-1.log",
                         f"http://127.0.0.1:{health}/healthz")
        second.start()
        self.operators = [self.operator, second]

    def stop(self) -> None:
        for service in [*getattr(self, "operators", [])[1:], *getattr(self, "brokers", [])[1:]]:
            service.stop()
        if getattr(self, "balancer", None) is not None:
            self.balancer.stop()
        super().stop()


# ---- what is recorded ----------------------------------------------------------------------------------
@dataclass
class Failure:
    at: float
    kind: str  # application | credential | not-ready | 401
    what: str
    message: str


@dataclass
class Recorder:
    stack: SoakStack
    failures: list[Failure] = field(default_factory=list)
    rss: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    app_states: list[tuple[float, str, str, str]] = field(default_factory=list)  # (at, app, sync, revision)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=loop, daemon=True)
                         for loop in (self._credentials, self._readiness, self._memory, self._applications)]

    def start(self) -> "Recorder":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)

    def _every(self, seconds: float, step) -> None:
        while not self._stop.is_set():
            try:
                step()
            except Exception as e:  # the recorder must outlive what it watches
                self.failures.append(Failure(time.time(), "recorder", step.__name__, repr(e)[:300]))
            self._stop.wait(seconds)

    def _credentials(self) -> None:
        def check_files() -> None:
            now = time.time()
            for cluster in CLUSTERS:
                path = self.stack.argocd.credential_dir / f"{cluster.target}.json"
                try:
                    status = json.loads(path.read_text())["status"]
                    expires = datetime.fromisoformat(status["expirationTimestamp"].replace("Z", "+00:00")).timestamp()
                    if expires <= now:
                        self.failures.append(Failure(now, "credential", cluster.name, f"expired {now - expires:.0f} s ago"))
                except (OSError, ValueError, KeyError) as e:
                    self.failures.append(Failure(now, "credential", cluster.name, f"unreadable: {type(e).__name__}"))
        self._every(1.0, check_files)

    def _readiness(self) -> None:
        def check_ready() -> None:
            listing = self.stack.get(self.stack.control, "rtc", "-A") or {"items": []}
            now = time.time()
            for item in listing["items"]:
                ready = next((c for c in (item.get("status") or {}).get("conditions", []) if c["type"] == "Ready"), None)
                if not ready or ready["status"] != "True":
                    self.failures.append(Failure(now, "not-ready", item["metadata"]["name"],
                                                 f"{(ready or {}).get('reason')}: {(ready or {}).get('message', '')[:200]}"))
        self._every(5.0, check_ready)

    def processes(self) -> dict[str, int]:
        found = {s.name: s.process.pid for s in (*self.stack.brokers, *self.stack.operators) if s.running()}
        for component in ("agent", "applicationset-controller-agent"):
            process = self.stack.argocd._processes.get(component)
            if process is not None and process.poll() is None:
                found[component] = process.pid
        return found

    def _memory(self) -> None:
        def sample() -> None:
            now = time.time()
            for name, pid in self.processes().items():
                try:
                    kb = int(re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text()).group(1))
                except (OSError, AttributeError):
                    continue
                self.rss.setdefault(name, []).append((now, kb / 1024))
        self._every(10.0, sample)

    def _applications(self) -> None:
        def sample() -> None:
            listing = self.stack.get(self.stack.control, "applications", "-n", ARGOCD_NAMESPACE) or {"items": []}
            now = time.time()
            for app in listing["items"]:
                name = app["metadata"]["name"]
                sync, health, revision = sync_state(app)
                self.app_states.append((now, name, f"{sync}/{health}", revision))
                for message in errors_of(app):
                    self.failures.append(Failure(now, "application", name, message))
        self._every(2.0, sample)


def app_name(cluster: TenantCluster) -> str:
    return f"{cluster.name}-{APP_NAMESPACE}"


# ---- faults --------------------------------------------------------------------------------------------
def lease_holder_pid(stack: SoakStack, name: str) -> int | None:
    """The PID in a Lease's holder identity ("<hostname>-<pid>", the broker's with "-<random>")."""
    lease = stack.get(stack.control, "lease", name, "-n", BROKER_NAMESPACE) or {}
    holder = (lease.get("spec") or {}).get("holderIdentity") or ""
    pid = holder.removeprefix(socket.gethostname() + "-").split("-")[0]
    return int(pid) if pid.isdigit() else None


def restart(service: Service, down_seconds: float = 5.0) -> str:
    pid = service.process.pid
    service.process.send_signal(signal.SIGKILL)
    service.process.wait(10)
    service.process = None
    time.sleep(down_seconds)
    service.start(timeout=120)
    return f"{service.name} (pid {pid}) killed, back as pid {service.process.pid}"


def kill_broker(stack: SoakStack, writer: bool) -> str:
    holder = lease_holder_pid(stack, "keyless-broker-key-writer")
    chosen = [b for b in stack.brokers if (b.process.pid == holder) == writer]
    return restart(chosen[0]) + (" (the key writer)" if writer else " (a follower)")


def kill_operator_leader(stack: SoakStack) -> str:
    holder = lease_holder_pid(stack, "keyless-operator")
    leader = next((o for o in stack.operators if o.process.pid == holder), None)
    if leader is None:
        raise RuntimeError(f"no operator holds the lease (holder pid {holder})")
    return restart(leader) + " (the leader)"


def kill_agent(stack: SoakStack) -> str:
    stack.argocd.restart_agent(0, down_seconds=5.0)
    return "the application controller's agent SIGKILLed, back after 5 s"


def delete_proxy_replica(stack: SoakStack) -> str:
    tenant = stack.tenants["soak-a-dev"].cluster
    pods = stack.get(tenant, "pods", "-n", "kube-oidc-proxy") or {"items": []}
    name = pods["items"][0]["metadata"]["name"]
    stack.kubectl(tenant, "delete", "pod", "-n", "kube-oidc-proxy", name, "--wait=false")
    return f"proxy Pod {name} of soak-a deleted (of {len(pods['items'])})"


def restart_tenant_apiserver(stack: SoakStack) -> str:
    stack.tenants["soak-b-dev"].cluster.restart_apiserver()
    return "soak-b's kube-apiserver restarted"


def restart_control_apiserver(stack: SoakStack) -> str:
    stack.control.restart_apiserver()
    return "the control plane's kube-apiserver restarted"


def restart_control_etcd(stack: SoakStack) -> str:
    stack.control.restart_etcd(down_seconds=5.0)
    return "the control plane's etcd down 5 s and back"


def rotate_tenant_ca(stack: SoakStack) -> str:
    secret = names.dns_label("keyless-proxy-ca", "soak-a", "soak-a-dev")
    if stack.get(stack.control, "secret", secret, "-n", BROKER_NAMESPACE) is None:
        raise RuntimeError(f"no proxy CA Secret {BROKER_NAMESPACE}/{secret}")
    stack.kubectl(stack.control, "delete", "secret", "-n", BROKER_NAMESPACE, secret)
    return f"soak-a's proxy CA Secret {secret} deleted: a new CA"


FAULTS = [("broker key writer", lambda s: kill_broker(s, writer=True)),
          ("broker follower", lambda s: kill_broker(s, writer=False)),
          ("operator leader", kill_operator_leader),
          ("agent", kill_agent),
          ("proxy replica", delete_proxy_replica),
          ("tenant API server", restart_tenant_apiserver),
          ("control-plane API server", restart_control_apiserver),
          ("control-plane etcd", restart_control_etcd),
          ("tenant CA rotation", rotate_tenant_ca)]


def key_rotations(stack: SoakStack, start: float, end: float) -> list[float]:
    """When a new key began signing, from the brokers' 'key set loaded: kid@signing_from' lines."""
    times = set()
    for broker in stack.brokers:
        for line in broker.log.read_text(errors="replace").splitlines():
            if "key set loaded:" in line:
                times.update(int(t) for t in re.findall(r"@(\d+)", line))
    return sorted(t for t in times if start <= t <= end)


# ---- the run -------------------------------------------------------------------------------------------
def commit(repo: LocalGitRepository, revision: int) -> str:
    return repo.commit({f"{c.tenant}/hello.yaml": config_map_manifest("hello", {"revision": str(revision)})
                        for c in CLUSTERS}, f"revision {revision}")


def sync_lags(states: list[tuple[float, str, str, str]], commits: list[tuple[float, str]]) -> list[tuple[float, float]]:
    """(commit time, seconds until every Application was Synced/Healthy at that commit or a later one)."""
    order = {sha: i for i, (_, sha) in enumerate(commits)}
    lags = []
    for i, (at, _) in enumerate(commits):
        done = {}
        for when, app, state, revision in states:
            if when >= at and state == "Synced/Healthy" and order.get(revision, -1) >= i:
                done.setdefault(app, when)
        if len(done) == len(CLUSTERS):
            lags.append((at, max(done.values()) - at))
        else:
            lags.append((at, float("inf")))
    return lags


def lost_objects(stack: SoakStack, last_revision: int, last_sha: str) -> list[str]:
    problems = []
    for cluster in CLUSTERS:
        ready = stack.condition(cluster.name)
        if not ready or ready["status"] != "True":
            problems.append(f"{cluster.name} not Ready: {ready}")
        if stack.get(stack.control, "secret", cluster.argocd_secret_name, "-n", ARGOCD_NAMESPACE) is None:
            problems.append(f"{cluster.name}: Argo CD cluster Secret missing")
        if stack.get(stack.control, "brokertarget", cluster.target, "-n", BROKER_NAMESPACE) is None:
            problems.append(f"{cluster.name}: BrokerTarget missing")
        if stack.get(stack.control, "appproject", cluster.tenant, "-n", ARGOCD_NAMESPACE) is None:
            problems.append(f"{cluster.name}: AppProject missing")
        sync, health, revision = sync_state(application(stack, app_name(cluster)))
        if (sync, health, revision) != ("Synced", "Healthy", last_sha):
            problems.append(f"{app_name(cluster)}: {sync}/{health} at {revision[:8]}, not {last_sha[:8]}")
        landed = stack.get(stack.tenants[cluster.name].cluster, "configmap", "hello", "-n", APP_NAMESPACE)
        if ((landed or {}).get("data") or {}).get("revision") != str(last_revision):
            problems.append(f"{cluster.name}: ConfigMap hello at {((landed or {}).get('data') or {}).get('revision')}")
    return problems


def report(stack: SoakStack, recorder: Recorder, faults: list[dict], commits, start: float, end: float,
           lost: list[str], unauthorized: list[tuple[float, str]]) -> dict:
    observed = [*recorder.failures, *(Failure(at, "401", name, "tenant answered 401") for at, name in unauthorized)]
    # The harness's own reads fail while the control plane is down: not a failure of Keyless or Argo CD.
    blind = sorted(f.at for f in observed if f.kind == "recorder")
    failures = sorted((f for f in observed if f.kind != "recorder"), key=lambda f: f.at)
    lags = sync_lags(recorder.app_states, commits)
    rotations = key_rotations(stack, start, end)
    events = sorted([*({"name": f["name"], "at": f["at"], "what": f["what"]} for f in faults),
                     *({"name": "key rotation", "at": float(t), "what": "a new key began signing"} for t in rotations)],
                    key=lambda e: e["at"])
    rows = []
    for i, event in enumerate(events):
        until = events[i + 1]["at"] if i + 1 < len(events) else end
        inside = [f for f in failures if event["at"] <= f.at < until]
        window_lags = [lag for at, lag in lags if event["at"] <= at < until]
        rows.append({**event, "at_s": round(event["at"] - start, 1), "until_s": round(until - start, 1),
                     "failures": len(inside),
                     "harness_blind_s": len([t for t in blind if event["at"] <= t < until]),
                     "failure_window_s": round(inside[-1].at - event["at"], 1) if inside else 0.0,
                     "failure_kinds": sorted({f"{f.kind}:{f.what}" for f in inside}),
                     "examples": [f"{f.kind} {f.what} +{f.at - event['at']:.0f}s: {f.message[:160]}" for f in inside[:3]],
                     "max_sync_lag_s": round(max(window_lags), 1) if window_lags else None})
    before_faults = [f for f in failures if f.at < (events[0]["at"] if events else end)]
    memory = {}
    for name, samples in recorder.rss.items():
        values = [mb for _, mb in samples]
        head, tail_ = values[: max(1, len(values) // 4)], values[-max(1, len(values) // 4):]
        memory[name] = {"samples": len(values), "first_quarter_median_mb": round(statistics.median(head), 1),
                        "last_quarter_median_mb": round(statistics.median(tail_), 1), "max_mb": round(max(values), 1),
                        "minutes": round((samples[-1][0] - samples[0][0]) / 60, 1)}
    finite = [lag for _, lag in lags if lag != float("inf")]
    return {"minutes": round((end - start) / 60, 1), "commits": len(commits),
            "sync_lag_s": {"median": round(statistics.median(finite), 1) if finite else None,
                           "max": round(max(finite), 1) if finite else None,
                           "never_synced": sum(1 for _, lag in lags if lag == float("inf"))},
            "failures_before_first_fault": len(before_faults), "faults": rows, "lost_objects": lost, "rss": memory}


def print_report(result: dict) -> None:
    print(f"\nSoak: {result['minutes']} min, {result['commits']} commits to 3 tenants (1 Managed, 2 Direct); "
          f"commit -> every Application synced: median {result['sync_lag_s']['median']} s, "
          f"max {result['sync_lag_s']['max']} s, never {result['sync_lag_s']['never_synced']}")
    print(f"failures before the first fault: {result['failures_before_first_fault']}\n")
    print("| at | fault | failures | failure window | kinds | max commit->synced |")
    print("|---:|---|---:|---:|---|---:|")
    for row in result["faults"]:
        print(f"| {row['at_s']:.0f} s | {row['name']}: {row['what']} | {row['failures']} | "
              f"{row['failure_window_s']:.0f} s | {', '.join(row['failure_kinds']) or '-'} | "
              f"{row['max_sync_lag_s'] if row['max_sync_lag_s'] is not None else '-'} s |")
        for example in row["examples"]:
            print(f"|  |   {example} | | | | |")
    print("\n| process | RSS first quarter (median) | last quarter (median) | max | over |")
    print("|---|---:|---:|---:|---:|")
    for name, m in sorted(result["rss"].items()):
        print(f"| {name} | {m['first_quarter_median_mb']} MB | {m['last_quarter_median_mb']} MB | {m['max_mb']} MB "
              f"| {m['minutes']} min |")
    print(f"\nlost objects at the end: {result['lost_objects'] or 'none'}")


def run(minutes: float, fault_every: float, rotation_seconds: float, keep: bool) -> int:
    work = Path(tempfile.mkdtemp(prefix="keyless-soak-"))
    stack = SoakStack(work / "stack", CLUSTERS, proxy_mode=MODES,
                      operator_extra_args=["--leader-election"],
                      broker_extra_args=[f"--key-rotation-seconds={rotation_seconds}",
                                         f"--key-prepublish-seconds={min(60.0, rotation_seconds / 4)}"])
    recorder = None
    try:
        began = time.monotonic()
        stack.start(progress=print)
        print(f"stack up in {time.monotonic() - began:.0f} s")
        repo = LocalGitRepository(work / "repo")
        commits = [(time.time(), commit(repo, 0))]
        for cluster in CLUSTERS:
            stack.apply(stack.control, tenant_application_set(cluster.tenant, repo.url, cluster.tenant, APP_NAMESPACE))
            stack.apply_cluster(cluster.name)
        for cluster in CLUSTERS:
            stack.wait_ready(cluster.name, timeout=300)
        deadline = time.monotonic() + 300
        while any(sync_state(application(stack, app_name(c)))[:2] != ("Synced", "Healthy") for c in CLUSTERS):
            if time.monotonic() > deadline:
                raise SystemExit(f"Applications not Synced in 300 s\n{stack.logs()}")
            time.sleep(2)
        print(f"3 tenants Ready and Synced after {time.monotonic() - began:.0f} s; soaking for {minutes} min")

        start = time.time()
        recorder = Recorder(stack).start()
        faults: list[dict] = []
        schedule = [(120 + i * fault_every, name, action) for i, (name, action) in enumerate(FAULTS)]
        revision, next_commit = 0, time.time() + COMMIT_EVERY
        while time.time() - start < minutes * 60:
            now = time.time()
            if now >= next_commit:
                revision += 1
                commits.append((time.time(), commit(repo, revision)))
                next_commit = now + COMMIT_EVERY
            if schedule and now - start >= schedule[0][0]:
                _, name, action = schedule.pop(0)
                at = time.time()
                try:
                    what = action(stack)
                except Exception as e:
                    what = f"FAULT ACTION FAILED: {e!r}"[:300]
                faults.append({"name": name, "at": at, "what": what, "took_s": round(time.time() - at, 1)})
                print(f"+{at - start:6.0f} s  {name}: {what}", flush=True)
            time.sleep(0.5)
        # Let the last commit land, then look for anything lost.
        last_sha = commits[-1][1]
        settle = time.monotonic() + 180
        while time.monotonic() < settle and lost_objects(stack, revision, last_sha):
            time.sleep(5)
        end = time.time()
        recorder.stop()
        lost = lost_objects(stack, revision, last_sha)
        unauthorized = [(float(datetime.fromisoformat(e["stageTimestamp"].replace("Z", "+00:00")).timestamp()), name)
                        for name, tenant in stack.tenants.items() if tenant.proxy_mode == "Direct"
                        for e in unauthenticated(tenant.audit_events(), start, end)]
        result = report(stack, recorder, faults, commits, start, end, lost, unauthorized)
        (work / "soak-report.json").write_text(json.dumps(result, indent=2))
        print_report(result)
        print(f"\nreport: {work / 'soak-report.json'}")
        return 1 if lost else 0
    finally:
        if recorder is not None:
            recorder.stop()
        stack.stop()
        if keep:
            print(f"(work dir kept: {work})")
        else:
            report_file = work / "soak-report.json"
            if report_file.exists():
                shutil.copy(report_file, Path(tempfile.gettempdir()) / "keyless-soak-report.json")
            shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=22.0, help="soak length after warm-up (default %(default)s)")
    parser.add_argument("--fault-every", type=float, default=100.0, help="seconds between faults (default %(default)s)")
    parser.add_argument("--key-rotation-seconds", type=float, default=480.0,
                        help="the brokers' key rotation period (default %(default)s: two or more rotations)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs) afterwards")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("the soak needs root: soak-a's kube-oidc-proxy runs as Pods on a test node")
    return run(args.minutes, args.fault_every, args.key_rotation_seconds, args.keep)


if __name__ == "__main__":
    sys.exit(main())
