"""Runs the real operator (`keyless operator`, i.e. kopf) as a subprocess against a local cluster."""
from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from keyless.envtest import pki
from keyless.envtest.cluster import LocalCluster, free_port, start_process, stop_process, tail

from .conftest import ROOT, TESTDATA
from .helpers import install_crds, kubectl

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
                "--resync-seconds=3", "--retry-seconds=1", "--verbose",
                f"--metrics-listen=127.0.0.1:{self.metrics_port}",
                f"--health-listen=127.0.0.1:{self.health_port}", *self.extra_args]
        env = {**os.environ, **(self.env or {})}
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


def apply(cluster: LocalCluster, *manifests: dict, check: bool = True):
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
