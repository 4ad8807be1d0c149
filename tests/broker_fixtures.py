"""Reusable pieces for tests that need the real broker and a real token verifier.

- `start_broker(...)`: the real `keyless broker` as a subprocess, HTTPS with its own CA, against a
  LocalCluster's API server; waits for /readyz.
- `bound_caller_token(...)`: a Pod-bound projected ServiceAccount token, as the kubelet would mount it.
- `start_verifiers(...)`: small extra API servers that trust the broker through structured
  authentication (issuer discovery + JWKS, one audience each): the real verifier our tokens face.
  A kube-oidc-proxy variant can later implement the same `Verifier` shape (`whoami(token)`).
- `exec_kubeconfig(...)`, `kubectl_whoami(...)`: a kubeconfig whose only credential is an exec plugin
  (as Argo CD builds one), and the real kubectl asking who it is with it.
"""
from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import requests
import yaml
from kubernetes import client as k
from kubernetes.client.rest import ApiException

from keyless import pki
from keyless.envtest import binaries
from keyless.envtest.cluster import LocalCluster, free_port, start_clusters, start_process, stop_process, tail

ROOT = Path(__file__).resolve().parent.parent
KEYLESS = ROOT / ".venv" / "bin" / "keyless"
CRD_DIR = ROOT / "crds"


# ---- the broker ------------------------------------------------------------------------------------
@dataclass
class BrokerProcess:
    issuer: str
    url: str  # where this replica listens (replicas share one issuer)
    namespace: str
    dir: Path
    ca_file: Path
    process: subprocess.Popen
    log_path: Path
    args: list[str] = field(default_factory=list)
    metrics_url: str = ""  # the separate plain-HTTP listener of /metrics and /openapi.json (--metrics-listen)

    def session(self) -> requests.Session:
        """A keep-alive session; pass verify=str(ca_file) per request (REQUESTS_CA_BUNDLE would win otherwise)."""
        return requests.Session()

    def get(self, path: str, token: str | None = None, **kwargs) -> requests.Response:
        headers = kwargs.pop("headers", {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return requests.get(self.url + path, headers=headers, verify=str(self.ca_file), timeout=30, **kwargs)

    def get_internal(self, path: str, **kwargs) -> requests.Response:
        """GET from the metrics listener (/metrics, /openapi.json): not on the public URL."""
        return requests.get(self.metrics_url + path, timeout=30, **kwargs)

    def mint(self, target: str, token: str | None, **kwargs) -> requests.Response:
        headers = kwargs.pop("headers", {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return requests.post(f"{self.url}/v1/targets/{target}/token", headers=headers,
                             verify=str(self.ca_file), timeout=30, **kwargs)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def audit_lines(self) -> list[dict]:
        lines = []
        for line in self.log_text().splitlines():
            if line.startswith("{") and '"audit":"token"' in line:
                lines.append(json.loads(line))
        return lines

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        stop_process(self.process)

    def restarted(self, cluster: LocalCluster) -> "BrokerProcess":
        """The same broker started again (after stop()): same address, TLS files and flags; its keys are
        in its Secret, so tokens it signed before stay valid."""
        port = int(self.url.rsplit(":", 1)[1])
        tls = (self.ca_file, self.ca_file.parent / "tls.crt", self.ca_file.parent / "tls.key")
        extra = self.args[self.args.index("--kubeconfig") + 2:]
        return start_broker(cluster, self.namespace, self.dir, *extra, port=port, tls=tls,
                            issuer=self.issuer, host=urlsplit(self.url).hostname)


def broker_tls(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path, Path]:
    """A CA and a serving certificate for 127.0.0.1/localhost (and `host`): (ca, cert, key) files."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, _ = pki.new_ca("keyless-broker-test-ca")
    serving = pki.issue_certificate(ca, "keyless-broker", server=True, dns_names=("localhost",),
                                    ip_addresses=tuple(dict.fromkeys(("127.0.0.1", host))))
    paths = directory / "ca.crt", directory / "tls.crt", directory / "tls.key"
    for path, content in zip(paths, (ca.cert_pem, serving.cert_pem, serving.key_pem)):
        path.write_bytes(content)
        path.chmod(0o600)
    return paths


def start_broker(cluster: LocalCluster, namespace: str, directory: Path, *extra_args: str,
                 port: int | None = None, tls: tuple[Path, Path, Path] | None = None,
                 issuer: str | None = None, timeout: float = 30.0, host: str = "127.0.0.1") -> BrokerProcess:
    """Starts `keyless broker` for `namespace` of `cluster` and waits until it is ready.

    `host`: the address it listens on (a node network's host address to be reachable from Pods)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_file, cert_file, key_file = tls or broker_tls(directory / "tls", host)
    port = port or free_port(host)
    url = f"https://{host}:{port}"
    issuer = issuer or url
    if not any(a.startswith("--metrics-listen") for a in extra_args):
        extra_args = (*extra_args, "--metrics-listen", f"127.0.0.1:{free_port()}")
    metrics_listen = next(a.split("=", 1)[1] if "=" in a else extra_args[i + 1]
                          for i, a in enumerate(extra_args) if a.startswith("--metrics-listen"))
    args = [str(KEYLESS), "broker", "--issuer", issuer, "--listen", f"{host}:{port}",
            "--tls-cert-file", str(cert_file), "--tls-key-file", str(key_file), "--namespace", namespace,
            "--kubeconfig", str(cluster.kubeconfig), *extra_args]
    log_path = directory / f"broker-{port}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = start_process(args, log_path, env=env)
    broker = BrokerProcess(issuer, url, namespace, directory, ca_file, process, log_path, args,
                           f"http://{metrics_listen}")
    context = ssl.create_default_context(cafile=str(ca_file))
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"keyless broker exited with {process.returncode}:\n{tail(log_path)}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", context=context, timeout=2) as r:
                if r.status == 200:
                    return broker
        except (urllib.error.URLError, OSError) as e:
            last = str(e)
        time.sleep(0.1)
    stop_process(process)
    raise RuntimeError(f"keyless broker not ready in {timeout}s ({last}):\n{tail(log_path)}")


# ---- callers ---------------------------------------------------------------------------------------
def ensure_namespace(api, name: str) -> None:
    try:
        k.CoreV1Api(api).create_namespace(k.V1Namespace(metadata=k.V1ObjectMeta(name=name)))
    except ApiException as e:
        if e.status != 409:
            raise


def caller_pod(api, namespace: str, service_account: str, pod_name: str | None = None) -> k.V1Pod:
    """A ServiceAccount and a Pod that runs as it (stored only: no kubelet runs it)."""
    core = k.CoreV1Api(api)
    try:
        core.create_namespaced_service_account(namespace, k.V1ServiceAccount(
            metadata=k.V1ObjectMeta(name=service_account)))
    except ApiException as e:
        if e.status != 409:
            raise
    return core.create_namespaced_pod(namespace, k.V1Pod(
        metadata=k.V1ObjectMeta(name=pod_name or service_account),
        spec=k.V1PodSpec(service_account_name=service_account,
                         containers=[k.V1Container(name="c", image="example.invalid/none")]),
    ))


def bound_caller_token(api, pod: k.V1Pod, audience: str = "keyless-broker", seconds: int = 600) -> str:
    """A projected ServiceAccount token bound to `pod`, as the kubelet would mount it."""
    request = k.AuthenticationV1TokenRequest(spec=k.V1TokenRequestSpec(
        audiences=[audience], expiration_seconds=seconds,
        bound_object_ref=k.V1BoundObjectReference(kind="Pod", api_version="v1",
                                                   name=pod.metadata.name, uid=pod.metadata.uid),
    ))
    return k.CoreV1Api(api).create_namespaced_service_account_token(
        pod.spec.service_account_name, pod.metadata.namespace, request).status.token


def service_account_username(namespace: str, name: str) -> str:
    return f"system:serviceaccount:{namespace}:{name}"


def apply_broker_target(api, namespace: str, name: str, *, audience: str, username: str,
                        allowed_callers: list[str], ttl: int = 60, groups: list[str] | None = None) -> dict:
    spec = {"audience": audience, "username": username, "allowedCallers": allowed_callers,
            "tokenTTLSeconds": ttl}
    if groups:
        spec["groups"] = groups
    body = {"apiVersion": "keyless.dev/v1alpha1", "kind": "BrokerTarget",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}
    custom = k.CustomObjectsApi(api)
    return custom.patch_namespaced_custom_object(
        "keyless.dev", "v1alpha1", namespace, "brokertargets", name, body,
        field_manager="keyless-operator", force=True,
        _content_type="application/apply-patch+yaml")


# ---- verifiers -------------------------------------------------------------------------------------
def authentication_config(issuer: str, audience: str, ca_pem: bytes) -> str:
    """Structured authentication for an API server that trusts the broker for one audience: the
    same document the operator renders for Direct mode."""
    from keyless.render.tenant import render_authentication_configuration

    return render_authentication_configuration(issuer, audience, ca_pem)


@dataclass
class Verifier:
    """A real token verifier for one audience; `whoami(token)` -> (HTTP status, username or None)."""

    name: str
    audience: str
    cluster: LocalCluster

    @property
    def pid(self) -> int:
        return self.cluster._processes["kube-apiserver"].pid

    def running(self) -> bool:
        return self.cluster.running("kube-apiserver")

    def whoami(self, token: str) -> tuple[int, str | None]:
        context = ssl.create_default_context(cadata=self.cluster.ca_pem.decode())
        body = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}).encode()
        request = urllib.request.Request(
            f"{self.cluster.server}/apis/authentication.k8s.io/v1/selfsubjectreviews", data=body, method="POST",
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, context=context, timeout=30) as r:
                info = json.loads(r.read())["status"]["userInfo"]
                return r.status, info.get("username")
        except urllib.error.HTTPError as e:
            return e.code, None

    def stop(self) -> None:
        self.cluster.stop()


def start_verifiers(base_dir: Path, issuer: str, broker_ca_pem: bytes, audiences: dict[str, str]) -> list[Verifier]:
    """One small API server per {name: audience}, each trusting `issuer` for that audience only."""
    clusters = [LocalCluster(f"verifier-{name}", base_dir / f"verifier-{name}", controller_manager=False,
                             authentication_config=authentication_config(issuer, audience, broker_ca_pem))
                for name, audience in audiences.items()]
    start_clusters(clusters)
    return [Verifier(name, audience, c) for (name, audience), c in zip(audiences.items(), clusters)]


def wait_for_verifier(verifier: Verifier, token: str, timeout: float = 30.0) -> tuple[int, str | None]:
    """The API server loads the issuer's discovery asynchronously: poll until it answers with a user."""
    deadline = time.monotonic() + timeout
    result = verifier.whoami(token)
    while result[0] != 201 and time.monotonic() < deadline:
        time.sleep(0.3)
        result = verifier.whoami(token)
    return result


if __name__ == "__main__":  # pragma: no cover - quick manual check
    print(authentication_config("https://127.0.0.1:1", "aud", b"PEM"), file=sys.stderr)


# ---- exec credentials -------------------------------------------------------------------------------
V1 = "client.authentication.k8s.io/v1"
V1BETA1 = "client.authentication.k8s.io/v1beta1"


def exec_kubeconfig(path: Path, verifier, command: str, args: list[str], api_version: str = V1) -> Path:
    """A kubeconfig whose only credential is an exec plugin, as Argo CD builds from its cluster Secret."""
    exec_config = {"apiVersion": api_version, "command": command, "args": args, "interactiveMode": "Never",
                   "provideClusterInfo": False}
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "tenant",
        "clusters": [{"name": "tenant", "cluster": {
            "server": verifier.cluster.server,
            "certificate-authority-data": base64.b64encode(verifier.cluster.ca_pem).decode()}}],
        "users": [{"name": "keyless", "user": {"exec": exec_config}}],
        "contexts": [{"name": "tenant", "context": {"cluster": "tenant", "user": "keyless"}}],
    }))
    return path


def kubectl_whoami(kubeconfig: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(binaries.find("kubectl")), f"--kubeconfig={kubeconfig}", "auth", "whoami",
                           "-o", "jsonpath={.status.userInfo.username}"],
                          capture_output=True, text=True, timeout=60)
