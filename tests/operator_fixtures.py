"""Runs the real operator (`keyless operator`, i.e. kopf) as a subprocess against a local cluster."""
from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from keyless import pki
from keyless.envtest.cluster import LocalCluster, free_port, start_process, stop_process, tail

from .conftest import ROOT, TESTDATA
from .helpers import eventually, install_crds, kubectl

KEYLESS = str(Path(sys.executable).parent / "keyless")


def prepare_control_plane(cluster: LocalCluster) -> None:
    """CRDs (ours, Argo CD's and OpenUnison's) and the namespaces the operator writes to."""
    install_crds(cluster, ROOT / "crds", TESTDATA / "argocd-crds", TESTDATA / "openunison-crds")
    for namespace in ("argocd", "keyless-system"):
        kubectl(cluster, "create", "namespace", namespace, check=False)


class OperatorProcess:
    def __init__(self, cluster: LocalCluster, workdir: Path, extra_args: list[str] | None = None,
                 env: dict | None = None):
        self.cluster = cluster
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "operator.log"
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.extra_args = extra_args or []
        self.env = env
        self.process: subprocess.Popen | None = None

    def start(self) -> "OperatorProcess":
        args = [KEYLESS, "operator", f"--kubeconfig={self.cluster.kubeconfig}",
                "--resync-seconds=3", "--retry-seconds=1", "--log-level=DEBUG",
                f"--metrics-listen=127.0.0.1:{self.metrics_port}",
                f"--health-listen=127.0.0.1:{self.health_port}", *self.extra_args]
        env = {**os.environ, **(self.env or {})}
        self.argv = args
        self.process = start_process(args, self.log_path, env=env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"operator exited ({self.process.returncode}); log {self.log_path}:\n"
                                   f"{tail(self.log_path)}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=1):
                    return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"operator not healthy in 30s; log {self.log_path}:\n{tail(self.log_path)}")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """The sum of every sample of metric `name` (whose labels include `labels`); 0 when there is none."""
        total = 0.0
        for line in self.metrics().splitlines():
            sample, _, value = line.rpartition(" ")
            metric, _, label_text = sample.partition("{")
            if metric != name:
                continue
            found = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
            if all(found.get(k) == v for k, v in labels.items()):
                total += float(value)
        return total

    def wait_for_resyncs(self, rounds: int, timeout: float = 120) -> float:
        """Polls until the operator completed `rounds` more resync rounds (each reconciles every manifest it
        knows); returns the new count. Replaces "sleep long enough for a resync"."""
        target = self.metric("keyless_operator_resyncs_total") + rounds
        return eventually(lambda: (n := self.metric("keyless_operator_resyncs_total")) >= target and n, timeout=timeout,
                          interval=0.5, message=f"{rounds} resync round(s) of the operator")


def ca_data() -> str:
    ca, _ = pki.new_ca("tenant-proxy-ca")
    return base64.b64encode(ca.cert_pem).decode()


def rtc_manifest(name: str, namespace: str, tenant: str = "tenant-a", *, server: str | None = None,
                 **spec_overrides) -> dict:
    spec = {
        "tenant": tenant,
        "server": server or f"https://proxy.{name}.{namespace}.example.com",
        "caData": spec_overrides.pop("caData", None) or ca_data(),
        "argocd": {"labels": {"environment": "development"}},
        "access": {"clusterRole": "cluster-admin"},
        "proxy": {"mode": "External"},
    }
    for key, value in spec_overrides.items():
        spec[key] = value
    return {"apiVersion": "keyless.dev/v1alpha1", "kind": "RemoteTenantCluster",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


TENANT_LABEL = "keyless.dev/tenant"


def tenant_namespace(cluster: LocalCluster, name: str, tenant: str) -> str:
    """A namespace owned by `tenant`, as a platform admin creates and labels it."""
    kubectl(cluster, "create", "namespace", name, check=False)
    kubectl(cluster, "label", "namespace", name, f"{TENANT_LABEL}={tenant}", "--overwrite")
    return name


def label_tenant_namespaces(cluster: LocalCluster, *manifests: dict) -> None:
    """Labels each RemoteTenantCluster's namespace with its tenant, as the platform admin does before
    a tenant's manifests can live there. A namespace that already has a tenant keeps it."""
    for manifest in manifests:
        if manifest.get("kind") != "RemoteTenantCluster":
            continue
        namespace = manifest["metadata"]["namespace"]
        current = kubectl(cluster, "get", "namespace", namespace, "-o",
                          "jsonpath={.metadata.labels.keyless\\.dev/tenant}", check=False)
        if current.returncode == 0 and not current.stdout.strip():
            kubectl(cluster, "label", "namespace", namespace, f"{TENANT_LABEL}={manifest['spec']['tenant']}")


def apply(cluster: LocalCluster, *manifests: dict, check: bool = True):
    """kubectl apply, after labelling the manifests' namespaces with their tenants (if unlabelled)."""
    label_tenant_namespaces(cluster, *manifests)
    return kubectl(cluster, "apply", "-f", "-", input=yaml.safe_dump_all(manifests), check=check)


def remove_all_remote_tenant_clusters(cluster: LocalCluster, timeout: float = 90) -> None:
    """Deletes every RemoteTenantCluster, so one test module's manifests never meet another's.

    Call it while the module's operator still runs, so finalizers clean up what was created. Any
    manifest still held by a finalizer afterwards (e.g. no operator ran) has it removed.
    """
    import json as _json

    kubectl(cluster, "delete", "rtc", "--all", "--all-namespaces", "--wait=false", check=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = kubectl(cluster, "get", "rtc", "--all-namespaces", "-o", "json", check=False)
        items = _json.loads(listed.stdout).get("items", []) if listed.returncode == 0 else []
        if not items:
            return
        time.sleep(0.5)
    for item in items:
        meta = item["metadata"]
        kubectl(cluster, "patch", "rtc", meta["name"], "-n", meta["namespace"], "--type=merge",
                "-p", '{"metadata":{"finalizers":null}}', check=False)


# ---- `keyless render` with an operator's own flags ------------------------------------------------------
def _settings_flags() -> set[str]:
    import argparse

    from keyless import settings

    parser = argparse.ArgumentParser()
    settings.add_arguments(parser)
    return {flag for action in parser._actions for flag in action.option_strings}


SETTINGS_FLAGS = _settings_flags()


def settings_args(process: OperatorProcess) -> list[str]:
    """The flags of a running operator that make its OperatorSettings (the ones `keyless render` takes too)."""
    return [arg for arg in process.argv if arg.split("=", 1)[0] in SETTINGS_FLAGS]


def render_as(process: OperatorProcess, manifests: list[dict], workdir: Path) -> list[dict]:
    """`keyless render` of `manifests` with exactly the settings flags `process` runs with."""
    path = workdir / "rendered-input.yaml"
    path.write_text(yaml.safe_dump_all(manifests))
    result = subprocess.run([KEYLESS, "render", "-f", str(path), *settings_args(process)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [as_stored(d) for d in yaml.safe_load_all(result.stdout) if d]


def as_stored(obj: dict) -> dict:
    """A rendered object as the API server stores it: render prints a text Secret's `stringData` for
    readability; the API server (and the operator's apply) hold the same bytes base64-encoded in `data`."""
    if obj.get("kind") != "Secret" or "stringData" not in obj:
        return obj
    data = {k: base64.b64encode(v.encode()).decode() for k, v in obj["stringData"].items()}
    return {("data" if k == "stringData" else k): (data if k == "stringData" else v) for k, v in obj.items()}


def live_object(cluster: LocalCluster, obj: dict) -> dict:
    """The object as the API server holds it (kubectl get -o json)."""
    group = obj["apiVersion"].rpartition("/")[0]
    resource = obj["kind"].lower() + (f".{group}" if group else "")
    namespace = obj["metadata"].get("namespace")
    result = kubectl(cluster, "get", resource, obj["metadata"]["name"], "-o", "json",
                     *(["-n", namespace] if namespace else []))
    return json.loads(result.stdout)


def as_applied(live, rendered):
    """`live` cut down to the fields `rendered` sets: what the operator applied, without what the server or
    other writers added (status, managedFields, defaults, Keyless's own applied-hash annotation)."""
    if isinstance(rendered, dict) and isinstance(live, dict):
        return {key: as_applied(live[key], value) for key, value in rendered.items() if key in live}
    if isinstance(rendered, list) and isinstance(live, list) and len(rendered) == len(live):
        return [as_applied(a, b) for a, b in zip(live, rendered)]
    return live


def assert_applied_as_rendered(rendered: list[dict], cluster_of) -> int:
    """Every rendered object exists where `cluster_of(obj)` says, byte for byte as rendered (YAML of the
    applied fields). Returns how many objects were compared."""
    for obj in rendered:
        live = live_object(cluster_of(obj), obj)
        expected = yaml.safe_dump(obj, sort_keys=True)
        actual = yaml.safe_dump(as_applied(live, obj), sort_keys=True)
        assert actual == expected, f"{obj['kind']} {obj['metadata'].get('namespace')}/{obj['metadata']['name']}"
    return len(rendered)
