"""The whole product on loopback, with the real Argo CD: a control plane, the broker, the operator (optionally
serving the guardrail webhooks), Argo CD with the Keyless agent beside its controller, and tenant clusters.

Used by `make demo`, tests/test_argocd_sync.py and bench/bench_argocd.py, so all three run one set-up.
"""
from __future__ import annotations

import json
import os
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from .. import pki
from . import binaries
from .argocd import KEYLESS, NAMESPACE as ARGOCD_NAMESPACE, ArgoCD
from .cluster import LocalCluster, free_port, start_clusters, start_process, stop_process, tail
from .tenants import TenantCluster, tenant_side

ROOT = Path(__file__).resolve().parents[3]
BROKER_NAMESPACE = "keyless-system"
OPERATOR_ACCOUNT = "keyless-operator"
OPERATOR_SA = f"system:serviceaccount:{BROKER_NAMESPACE}:{OPERATOR_ACCOUNT}"
TENANT_LABEL = "keyless.dev/tenant"


class StackError(RuntimeError):
    """A part of the stack failed; the message says which and shows its log."""


def wait_http_ok(url: str, context: ssl.SSLContext | None, timeout: float, what: str, log: Path,
                 process: subprocess.Popen | None = None) -> None:
    """Polls `url` until it answers 200; fails fast if `process` exits. Failures show the log's tail."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise StackError(f"{what} exited with code {process.returncode}; log {log}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, context=context, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise StackError(f"{what} not ready after {timeout:.0f}s at {url}; log {log}:\n{tail(log)}")
        time.sleep(0.2)


@dataclass
class Service:
    name: str
    argv: list[str]
    log: Path
    ready_url: str
    ca_file: Path | None = None
    process: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> None:
        self.process = start_process(self.argv, self.log, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        context = ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file else None
        wait_http_ok(self.ready_url, context, timeout, self.name, self.log, self.process)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class KeylessStack:
    def __init__(self, base_dir: Path, clusters: list[TenantCluster], *, proxy_mode: str | dict[str, str] = "Direct",
                 guardrails: bool = False, controller_path_prefix: list[Path] | None = None,
                 app_resync_seconds: int = 10, agent_extra_args: list[str] | None = None,
                 operator_extra_args: list[str] | None = None, broker_extra_args: list[str] | None = None):
        """`proxy_mode`: one mode for every cluster, or a mode per cluster name."""
        self.dir = Path(base_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.clusters = {c.name: c for c in clusters}
        modes = proxy_mode if isinstance(proxy_mode, dict) else {c.name: proxy_mode for c in clusters}
        self.proxy_mode = proxy_mode
        self.guardrails = guardrails
        self.operator_extra_args = operator_extra_args or []
        self.broker_extra_args = broker_extra_args or []
        self.control = LocalCluster("control", self.dir / "control")
        # Managed mode: the tenants get real nodes whose proxy Pods must reach the broker, so it listens
        # on the node network's host address instead of loopback.
        self.network = None
        if "Managed" in modes.values():
            from .network import NodeNetwork

            self.network = NodeNetwork.acquire()
        self.broker_host = self.network.host_address if self.network else "127.0.0.1"
        # The broker's identity comes first: tenants trust its issuer URL and CA from their first start.
        self.broker_port = free_port(self.broker_host)
        self.issuer = f"https://{self.broker_host}:{self.broker_port}"
        self.broker_ca_file = self.dir / "broker" / "ca.crt"
        self._write_broker_tls()
        self.tenants = {c.name: tenant_side(modes[c.name], c, self.dir / "tenants" / c.name, self.issuer,
                                            self.broker_ca_file.read_bytes(), self.network) for c in clusters}
        self.argocd = ArgoCD(self.control, self.dir / "argocd", broker_url=self.issuer, broker_ca_file=self.broker_ca_file,
                             controller_path_prefix=controller_path_prefix or [], app_resync_seconds=app_resync_seconds,
                             agent_extra_args=agent_extra_args or [])
        self.broker: Service | None = None
        self.operator: Service | None = None
        self.webhook_ca_pem: bytes | None = None

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self, progress=None) -> "KeylessStack":
        """Starts everything; `progress(text)`, if given, hears each part as it starts (the demo prints it)."""
        say = progress or (lambda text: None)
        parts = [(f"etcd + kube-apiserver for the control plane and {len(self.tenants)} tenant(s)",
                  lambda: start_clusters([self.control, *(t.cluster for t in self.tenants.values())], timeout=240)),
                 ("CRDs, policies and namespaces on the control plane", self._prepare_control_plane),
                 ("the tenants' own RBAC", self._prepare_tenants),
                 ("the broker", self._start_broker),
                 ("the operator" + (" with the guardrail webhooks" if self.guardrails else ""), self._start_operator),
                 ("Argo CD (Redis, repo-server, controllers) and the agent", self.argocd.start)]
        try:
            for index, (what, start) in enumerate(parts, 1):
                began = time.monotonic()
                say(f"[{index}/{len(parts)}] starting {what}")
                start()
                say(f"[{index}/{len(parts)}] {what}: up in {time.monotonic() - began:.1f} s")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stops every part, even when one of them fails to stop; the node network is released last."""
        stops = [self.argocd.stop, *(s.stop for s in (self.operator, self.broker) if s is not None),
                 *(c.stop for c in (*(t.cluster for t in self.tenants.values()), self.control))]
        errors = []
        for stop in stops:
            try:
                stop()
            except Exception as e:  # keep going: what is left running would outlive the run
                errors.append(e)
        if self.network is not None:
            network, self.network = self.network, None
            network.release()
        if errors:
            raise errors[0]

    def logs(self, lines: int = 30) -> str:
        parts = [self.argocd.logs(lines)]
        for service in (self.operator, self.broker):
            if service is not None:
                parts.append(f"----- {service.name} ({service.log}) -----\n{tail(service.log, lines)}")
        parts += [c.logs(lines) for c in (self.control, *(t.cluster for t in self.tenants.values())) if not c.running()]
        return "\n".join(p for p in parts if p)

    # ---- kubectl ------------------------------------------------------------------------------
    def kubectl(self, cluster: LocalCluster, *args: str, input: str | None = None,
                check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([str(binaries.find("kubectl")), f"--kubeconfig={cluster.kubeconfig}", *args],
                                input=input, capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise StackError(f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def apply(self, cluster: LocalCluster, *objects: dict, as_user: str | None = None,
              check: bool = True) -> subprocess.CompletedProcess:
        args = ["apply", "-f", "-"] + ([f"--as={as_user}"] if as_user else [])
        return self.kubectl(cluster, *args, input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)}),
                            check=check)

    def get(self, cluster: LocalCluster, *args: str) -> dict | None:
        result = self.kubectl(cluster, "get", *args, "-o", "json", check=False)
        if result.returncode != 0:
            if "NotFound" in result.stderr:
                return None
            raise StackError(f"kubectl get {' '.join(args)} failed: {result.stderr.strip()}")
        return json.loads(result.stdout)

    # ---- tenant clusters ----------------------------------------------------------------------
    def manifest(self, name: str) -> dict:
        return self.clusters[name].manifest(self.tenants[name].rtc_fields())

    def apply_cluster(self, name: str) -> None:
        """What the platform admin does: apply one RemoteTenantCluster (and what its mode needs with it)."""
        self.apply(self.control, *self.tenants[name].control_plane_objects(), self.manifest(name))

    def delete_cluster(self, name: str, wait: bool = True) -> None:
        spec = self.clusters[name]
        self.kubectl(self.control, "delete", "rtc", spec.name, "-n", spec.namespace, f"--wait={str(wait).lower()}",
                     "--timeout=120s")

    def condition(self, name: str, kind: str = "Ready") -> dict | None:
        spec = self.clusters[name]
        rtc = self.get(self.control, "rtc", spec.name, "-n", spec.namespace) or {}
        return next((c for c in (rtc.get("status") or {}).get("conditions", []) if c["type"] == kind), None)

    def wait_ready(self, name: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            condition = self.condition(name)
            if condition and condition["status"] == "True":
                return
            if time.monotonic() > deadline:
                raise StackError(f"{name} not Ready in {timeout:.0f}s: {condition}\n{self.logs()}")
            time.sleep(0.5)

    # ---- broker -------------------------------------------------------------------------------
    def stop_broker(self) -> None:
        self.broker.stop()

    def start_broker(self) -> None:
        """(Re)starts the broker on the same address with the same keys (they live in a Secret)."""
        self.broker.start()

    # ---- internals ----------------------------------------------------------------------------
    def _write_broker_tls(self) -> None:
        directory = self.broker_ca_file.parent
        directory.mkdir(parents=True, exist_ok=True)
        ca, _ = pki.new_ca("keyless-envtest-broker-ca")
        serving = pki.issue_certificate(ca, "keyless-broker", server=True, dns_names=("localhost",),
                                        ip_addresses=tuple(dict.fromkeys(("127.0.0.1", self.broker_host))))
        for filename, content in (("ca.crt", ca.cert_pem), ("tls.crt", serving.cert_pem), ("tls.key", serving.key_pem)):
            (directory / filename).write_bytes(content)
            (directory / filename).chmod(0o600)

    def _prepare_control_plane(self) -> None:
        # The CRDs and, as production applies them with the CRDs, the tenancy admission policies.
        manifests = sorted((ROOT / "crds").glob("*.yaml")) + sorted((ROOT / "policies").glob("*.yaml"))
        self.kubectl(self.control, "apply", "--server-side", "--force-conflicts", *[f"-f={p}" for p in manifests])
        namespaces = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}}
                      for n in (ARGOCD_NAMESPACE, BROKER_NAMESPACE)]
        # Each tenant's manifests live in the tenant's own namespace, labelled with the tenant.
        namespaces += [{"apiVersion": "v1", "kind": "Namespace",
                        "metadata": {"name": ns, "labels": {TENANT_LABEL: tenant}}}
                       for ns, tenant in sorted({(c.namespace, c.tenant) for c in self.clusters.values()})]
        self.apply(self.control, *namespaces)
        deadline = time.monotonic() + 60
        while self.kubectl(self.control, "wait", "--for=condition=Established", "--timeout=30s", "crd", "--all",
                           check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise StackError("Keyless CRDs not established in 60 s")
            time.sleep(0.3)

    def _prepare_tenants(self) -> None:
        for tenant in self.tenants.values():
            objects = tenant.tenant_admin_objects()
            if objects:
                self.apply(tenant.cluster, *objects)

    def _bound_token(self, namespace: str, account: str, pod: str) -> str:
        self.apply(self.control,
                   {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": account, "namespace": namespace}},
                   {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod, "namespace": namespace},
                    "spec": {"serviceAccountName": account, "containers": [{"name": "main", "image": "keyless:envtest"}]}})
        return self.kubectl(self.control, "-n", namespace, "create", "token", account, "--audience=keyless-broker",
                            "--duration=10800s", "--bound-object-kind=Pod", f"--bound-object-name={pod}").stdout.strip()

    def broker_replica(self, name: str, port: int) -> Service:
        """A broker process of this stack's issuer listening on `port` (the stack's own listens on the
        issuer's port; more replicas behind one address need a load balancer in front)."""
        directory = self.broker_ca_file.parent
        return Service(name, [
            KEYLESS, "broker", "--issuer", self.issuer, "--listen", f"{self.broker_host}:{port}",
            "--tls-cert-file", directory / "tls.crt", "--tls-key-file", directory / "tls.key",
            "--namespace", BROKER_NAMESPACE, "--kubeconfig", self.control.kubeconfig,
            "--operator-identity", OPERATOR_SA, *self.broker_extra_args], self.dir / f"{name}.log",
            f"https://{self.broker_host}:{port}/readyz", self.broker_ca_file)

    def _start_broker(self) -> None:
        self.broker = self.broker_replica("broker", self.broker_port)
        self.broker.start()

    def _start_operator(self) -> None:
        directory = self.dir / "operator"
        directory.mkdir(exist_ok=True)
        token = directory / "token"
        token.write_text(self._bound_token(BROKER_NAMESPACE, OPERATOR_ACCOUNT, f"{OPERATOR_ACCOUNT}-0"))
        token.chmod(0o600)
        self._operator_token = token
        health = free_port()
        args = self.operator_argv(health)
        webhook_port = None
        if self.guardrails:
            webhook_port = free_port()
            ca, _ = pki.new_ca("keyless-envtest-webhook-ca")
            serving = pki.issue_certificate(ca, "keyless-webhooks", server=True, ip_addresses=("127.0.0.1",))
            (directory / "webhook.crt").write_bytes(serving.cert_pem)
            (directory / "webhook.key").write_bytes(serving.key_pem)
            self.webhook_ca_pem = ca.cert_pem
            args += [f"--webhook-listen=127.0.0.1:{webhook_port}", f"--webhook-tls-cert-file={directory / 'webhook.crt'}",
                     f"--webhook-tls-key-file={directory / 'webhook.key'}", "--webhook-admin-group=system:masters"]
        self.operator = Service("operator", args, self.dir / "operator.log", f"http://127.0.0.1:{health}/healthz")
        self.operator.start()
        if webhook_port is not None:
            self._register_guardrails(webhook_port)

    def operator_argv(self, health_port: int, metrics_port: int | None = None) -> list:
        """`keyless operator` as this stack runs it (another replica: other ports, same identity)."""
        return [KEYLESS, "operator", f"--kubeconfig={self.control.kubeconfig}", f"--broker-issuer={self.issuer}",
                f"--broker-ca-file={self.broker_ca_file}", f"--broker-token-file={self._operator_token}",
                f"--metrics-listen=127.0.0.1:{metrics_port or free_port()}", f"--health-listen=127.0.0.1:{health_port}",
                "--resync-seconds=10", "--retry-seconds=2", "--verify-seconds=30",
                *self.argocd.operator_args(), *self.operator_extra_args]

    def _register_guardrails(self, port: int) -> None:
        import functools

        from ..webhooks import configuration, policy

        url = f"https://127.0.0.1:{port}"
        context = ssl.create_default_context(cadata=self.webhook_ca_pem.decode())
        wait_http_ok(f"{url}/readyz", context, 60, "the operator's webhook server", self.operator.log,
                     self.operator.process)
        client_config = functools.partial(configuration.url_client_config, url, self.webhook_ca_pem)
        exemptions = policy.Exemptions.build(admin_groups=["system:masters"])
        self.apply(self.control, configuration.render_validating_webhook_configuration(client_config, exemptions=exemptions),
                   configuration.render_mutating_webhook_configuration(client_config))


# ---- what tenants put in Argo CD -----------------------------------------------------------------
def tenant_application_set(tenant: str, repo_url: str, path: str, destination_namespace: str,
                           revision: str = "main") -> dict:
    """An ApplicationSet whose cluster generator selects the tenant's Keyless cluster Secrets by the label the
    operator writes, and deploys `path` of the repository to each of them, automatically, with retries."""
    return {
        "apiVersion": "argoproj.io/v1alpha1", "kind": "ApplicationSet",
        "metadata": {"name": tenant, "namespace": ARGOCD_NAMESPACE},
        "spec": {
            "goTemplate": True, "goTemplateOptions": ["missingkey=error"],
            "generators": [{"clusters": {"selector": {"matchLabels": {TENANT_LABEL: tenant}}}}],
            "template": {
                "metadata": {"name": "{{.name}}-" + destination_namespace, "labels": {TENANT_LABEL: tenant}},
                "spec": {
                    "project": tenant,
                    "source": {"repoURL": repo_url, "targetRevision": revision, "path": path},
                    "destination": {"server": "{{.server}}", "namespace": destination_namespace},
                    "syncPolicy": {"automated": {"prune": True, "selfHeal": True},
                                   "syncOptions": ["CreateNamespace=true"],
                                   "retry": {"limit": 20, "backoff": {"duration": "5s", "factor": 2, "maxDuration": "20s"}}},
                },
            },
        },
    }


def config_map_manifest(name: str, data: dict[str, str]) -> str:
    return yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data})
