#!/usr/bin/env python3
"""Draws the Grafana dashboard (charts/keyless/files/grafana/keyless-dashboard.json) from real metrics of a demo
run, into docs/dashboard.png for the README.

It starts what `make demo` starts (control plane, two Direct-mode tenants, broker, operator with the
guardrails, the real Argo CD with the agent) and a real Prometheus (built from the Prometheus module by
tools/build-binaries.sh, with the chart's alert rules loaded) scraping the operator, the broker and the agent
every 5 s. It lets Argo CD sync both tenants, then breaks things for a while and lets them recover: a caller
that is not allowed keeps asking for tokens, a tenant keeps retrying an Application into another tenant's
cluster, the broker stops for 45 s. Then it asks Prometheus for each panel's queries over the run (Grafana's
$__rate_interval taken as four scrape intervals) and draws the panels where the dashboard puts them.

    .venv/bin/pip install -e '.[docs]'            # matplotlib, for this tool only
    tools/build-binaries.sh prometheus
    .venv/bin/python tools/render-dashboard.py [--out docs/dashboard.png]
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "operator"))

from keyless.envtest import binaries  # noqa: E402
from keyless.envtest.argocd import KEYLESS  # noqa: E402
from keyless.envtest.cluster import free_port, start_process, stop_process  # noqa: E402
from keyless.envtest.gitrepo import LocalGitRepository  # noqa: E402
from keyless.envtest.stack import KeylessStack, config_map_manifest, tenant_application_set  # noqa: E402
from keyless.envtest.tenants import TenantCluster  # noqa: E402

DASHBOARD = ROOT / "charts" / "keyless" / "files" / "grafana" / "keyless-dashboard.json"
RULES = ROOT / "charts" / "keyless" / "files" / "prometheus" / "keyless-rules.yaml"
CLUSTERS = [TenantCluster("tenant-a", "tenant-a-dev"), TenantCluster("tenant-b", "tenant-b-dev")]
SCRAPE_SECONDS = 5


def say(text: str) -> None:
    print(f"render-dashboard: {text}", flush=True)


def wait(what: str, check, timeout: float = 180.0, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen in {timeout:.0f} s")
        time.sleep(every)


def pause(seconds: float, what: str) -> None:
    """Sleeps, saying every 15 s how far along the phase is."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        say(f"  {what}: {seconds - left:.0f}/{seconds:.0f} s")
        time.sleep(min(15.0, left))


class Prometheus:
    def __init__(self, directory: Path, stack: KeylessStack | None):
        """Scrapes `stack`; with None, only serves the data a kept run left in `directory` (--redraw)."""
        self.dir = directory
        self.port = free_port()
        if stack is None:
            self._start({"global": {}, "scrape_configs": []})
            return
        operator_port = next(str(a).rsplit(":", 1)[1] for a in stack.operator.argv if str(a).startswith("--metrics-listen"))
        broker_port = stack.issuer.rsplit(":", 1)[1]
        config = {
            "global": {"scrape_interval": f"{SCRAPE_SECONDS}s", "evaluation_interval": f"{SCRAPE_SECONDS}s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {"job_name": "keyless-operator", "static_configs": [{
                    "targets": [f"127.0.0.1:{operator_port}"],
                    "labels": {"namespace": "keyless-system", "pod": "keyless-operator-0"}}]},
                {"job_name": "keyless-broker", "scheme": "https", "tls_config": {"ca_file": str(stack.broker_ca_file)},
                 "static_configs": [{"targets": [f"127.0.0.1:{broker_port}"],
                                     "labels": {"namespace": "keyless-system", "pod": "keyless-broker-0"}}]},
                {"job_name": "keyless-agents", "static_configs": [{
                    "targets": [f"127.0.0.1:{stack.argocd.ports['agent-health']}"],
                    "labels": {"namespace": "argocd", "pod": "argocd-application-controller-0"}}]},
            ],
        }
        self._start(config)

    def _start(self, config: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "prometheus.yml").write_text(json.dumps(config))
        self.process = start_process([str(binaries.find("prometheus")), f"--config.file={self.dir / 'prometheus.yml'}",
                                      f"--storage.tsdb.path={self.dir / 'data'}",
                                      f"--web.listen-address=127.0.0.1:{self.port}"], self.dir / "prometheus.log")
        wait("prometheus ready", self._ready, timeout=60)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        query = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/v1/query_range?{query}", timeout=30) as r:
            answer = json.loads(r.read())
        if answer["status"] != "success":
            raise RuntimeError(f"{expr}: {answer}")
        return answer["data"]["result"]

    def rule_groups(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/v1/rules", timeout=10) as r:
            return sum(len(g["rules"]) for g in json.loads(r.read())["data"]["groups"])

    def stop(self) -> None:
        stop_process(self.process)


def keep_asking(stack: KeylessStack, token_file: Path, stop: threading.Event) -> None:
    """A caller the cluster does not allow, asking again and again (as a token-mode exec would)."""
    target = CLUSTERS[0].target
    while not stop.is_set():
        subprocess.run([KEYLESS, "token", "--broker-url", stack.issuer, "--target", target,
                        "--broker-ca-file", str(stack.broker_ca_file), "--token-file", str(token_file)],
                       capture_output=True, timeout=30)
        stop.wait(0.5)


def keep_retrying_refused_application(stack: KeylessStack, stop: threading.Event) -> None:
    """Tenant B's CI retrying an Application into tenant A's cluster, refused by the guardrails each time."""
    app = {"apiVersion": "argoproj.io/v1alpha1", "kind": "Application",
           "metadata": {"name": "into-tenant-a", "namespace": CLUSTERS[1].namespace},
           "spec": {"project": CLUSTERS[1].tenant, "source": {"repoURL": "https://git.example.com/b.git", "path": "."},
                    "destination": {"server": stack.tenants[CLUSTERS[0].name].cluster.server, "namespace": "default"}}}
    while not stop.is_set():
        stack.kubectl(stack.control, "create", "--dry-run=server", "--as=tenant-b-ci", "-f", "-",
                      input=json.dumps(app), check=False)
        stop.wait(1.0)


def in_background(function, *args) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=function, args=(*args, stop), daemon=True)
    thread.start()
    return thread, stop


def drive(stack: KeylessStack, workdir: Path) -> list[tuple[float, float, str]]:
    """Syncs both tenants, then the incidents; returns (start, end, label) of each incident."""
    repo = LocalGitRepository(workdir / "repo")
    repo.commit({f"{c.tenant}/hello.yaml": config_map_manifest("hello", {"tenant": c.tenant, "revision": "1"})
                 for c in CLUSTERS}, "tenants: first revision")
    for cluster in CLUSTERS:
        stack.apply_cluster(cluster.name)
    for cluster in CLUSTERS:
        stack.wait_ready(cluster.name)
        stack.apply(stack.control, tenant_application_set(cluster.tenant, repo.url, cluster.tenant, "hello"))
    say("both tenants registered; Argo CD syncing")
    pause(90, "steady state")
    incidents = []
    # A caller that may not use the cluster.
    stack.apply(stack.control,
                {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "legacy-ci", "namespace": "argocd"}},
                {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "legacy-ci-0", "namespace": "argocd"},
                 "spec": {"serviceAccountName": "legacy-ci", "containers": [{"name": "c", "image": "none"}]}})
    token = stack.kubectl(stack.control, "-n", "argocd", "create", "token", "legacy-ci", "--audience=keyless-broker",
                          "--bound-object-kind=Pod", "--bound-object-name=legacy-ci-0").stdout.strip()
    token_file = workdir / "legacy-ci-token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    begin = time.time()
    thread, stop = in_background(keep_asking, stack, token_file)
    pause(60, "a caller that is not allowed keeps asking")
    stop.set(), thread.join(30)
    incidents.append((begin, time.time(), "caller not allowed"))
    # A tenant retrying a refused Application.
    namespace = CLUSTERS[1].namespace
    stack.kubectl(stack.control, "create", "role", "app-writer", "-n", namespace, "--verb=create",
                  "--resource=applications.argoproj.io", check=False)
    stack.kubectl(stack.control, "create", "rolebinding", "app-writer", "-n", namespace, "--role=app-writer",
                  "--user=tenant-b-ci", check=False)
    begin = time.time()
    thread, stop = in_background(keep_retrying_refused_application, stack)
    pause(60, "tenant B retries an Application into tenant A's cluster")
    stop.set(), thread.join(30)
    incidents.append((begin, time.time(), "refused Applications"))
    pause(20, "quiet")
    # The broker stops.
    begin = time.time()
    stack.stop_broker()
    pause(45, "broker down")
    stack.start_broker()
    incidents.append((begin, time.time(), "broker down"))
    pause(75, "recovery")
    return incidents


_LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def draw(dashboard: dict, prometheus: Prometheus, start: float, end: float, incidents, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step = SCRAPE_SECONDS
    rate_interval = f"{4 * SCRAPE_SECONDS}s"
    panels = dashboard["panels"]
    rows = max(p["gridPos"]["y"] // 8 for p in panels) + 1
    plt.style.use("dark_background")
    figure, axes = plt.subplots(rows, 2, figsize=(16, 3.4 * rows), squeeze=False)
    figure.suptitle(f"{dashboard['title']} — Grafana dashboard panels over a demo run "
                    f"({(end - start) / 60:.0f} min, real metrics via Prometheus)", fontsize=14)
    for panel in panels:
        ax = axes[panel["gridPos"]["y"] // 8][panel["gridPos"]["x"] // 12]
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", rate_interval)
            for series in prometheus.query_range(expr, start, end, step):
                labels = series["metric"]
                name = _LEGEND.sub(lambda m: labels.get(m.group(1), ""), target.get("legendFormat") or expr)
                times = [(float(t) - start) / 60 for t, _ in series["values"]]
                values = [float(v) for _, v in series["values"]]
                ax.plot(times, values, linewidth=1.4, label=name)
        for begin, finish, label in incidents:
            ax.axvspan((begin - start) / 60, (finish - start) / 60, color="#b03030", alpha=0.18)
            ax.text((begin - start) / 60, 1.0, label, transform=ax.get_xaxis_transform(), fontsize=7,
                    va="top", color="#ff9090")
        ax.set_title(panel["title"], fontsize=11, loc="left")
        ax.set_xlim(0, (end - start) / 60)
        if panel["fieldConfig"]["defaults"].get("min") == 0:
            ax.set_ylim(bottom=0, top=max(ax.get_ylim()[1], 1e-3) * 1.15)
        ax.set_ylabel(panel["fieldConfig"]["defaults"].get("unit", ""), fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.2)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, 0.9), framealpha=0.3)
    for row in axes:
        for ax in row:
            ax.set_xlabel("minutes into the run", fontsize=8)
    figure.tight_layout(rect=(0, 0, 1, 0.98))
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=80)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "dashboard.png"))
    parser.add_argument("--keep", action="store_true", help="keep the run's folder (logs, Prometheus data)")
    parser.add_argument("--redraw", metavar="DIR", help="draw again from the folder a --keep run left (no new run)")
    args = parser.parse_args()
    if args.redraw:
        run = json.loads((Path(args.redraw) / "run.json").read_text())
        prometheus = Prometheus(Path(args.redraw) / "prometheus", None)
        try:
            draw(json.loads(DASHBOARD.read_text()), prometheus, run["start"], run["end"],
                 [tuple(i) for i in run["incidents"]], Path(args.out))
        finally:
            prometheus.stop()
        return 0
    binaries.find("prometheus"), binaries.find("argocd")
    workdir = Path(tempfile.mkdtemp(prefix="keyless-dashboard-"))
    stack = KeylessStack(workdir / "stack", CLUSTERS, guardrails=True, agent_extra_args=["--targets-poll-seconds=2"])
    prometheus = None
    try:
        say("starting the demo stack (control plane, tenants, broker, operator, Argo CD)")
        stack.start()
        prometheus = Prometheus(workdir / "prometheus", stack)
        say(f"prometheus scraping every {SCRAPE_SECONDS} s with {prometheus.rule_groups()} alert rules loaded")
        start = time.time()
        incidents = drive(stack, workdir)
        end = time.time()
        (workdir / "run.json").write_text(json.dumps({"start": start, "end": end, "incidents": incidents}))
        say(f"drawing {args.out}")
        draw(json.loads(DASHBOARD.read_text()), prometheus, start, end, incidents, Path(args.out))
        return 0
    finally:
        if prometheus is not None:
            prometheus.stop()
        stack.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            say(f"kept {workdir}")


if __name__ == "__main__":
    sys.exit(main())
