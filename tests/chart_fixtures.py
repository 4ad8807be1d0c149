"""The Helm chart as the tests see it: `helm template` renders, and the chart's identities applied for real
(ServiceAccounts, Roles, bindings) with the operator, broker and webhooks running under exactly them."""
from __future__ import annotations

import base64
import re
import subprocess
import uuid
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import jwt
import pytest
import yaml
from kubernetes import client as k

from keyless.envtest import binaries
from keyless.envtest.cluster import free_port

from .broker_fixtures import bound_caller_token, broker_tls, caller_pod, start_broker
from .conftest import ROOT, TESTDATA
from .helpers import eventually, install_crds, kubectl
from .operator_fixtures import OperatorProcess, apply, remove_all_remote_tenant_clusters, rtc_manifest

CHART = ROOT / "charts" / "keyless"
RELEASE_NAMESPACE = "keyless-system"
ARGOCD_NAMESPACE = "argocd"
TENANT_NAMESPACE = "keyless-clusters"  # where the RemoteTenantClusters (and their bootstrap Secrets) live
OPERATOR_USER = f"system:serviceaccount:{RELEASE_NAMESPACE}:keyless-operator"
WEBHOOK_VALUES = ["--set", "webhooks.enabled=true", "--set",
                  f"webhooks.tls.caBundle={base64.b64encode(b'test-ca').decode()}"]
# Nothing is published, so the chart has no default image: every render names one, as an install must.
IMAGE_VALUES = ["--set", "image.repository=registry.example.com/keyless"]
RBAC_KINDS = {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}
PKI_NAMESPACE = "keyless-pki"


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(binaries.find("helm")), *args], capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def template(*values: str, namespace: str = RELEASE_NAMESPACE, check: bool = True) -> subprocess.CompletedProcess:
    return helm("template", "keyless", str(CHART), "--namespace", namespace, *IMAGE_VALUES, *values, check=check)


def render(*values: str, namespace: str = RELEASE_NAMESPACE) -> list[dict]:
    return [d for d in yaml.safe_load_all(template(*values, namespace=namespace).stdout) if d]


def find(docs: list[dict], kind: str, name: str, namespace: str | None = None) -> dict:
    for d in docs:
        meta = d["metadata"]
        if d["kind"] == kind and meta["name"] == name and (namespace is None or meta.get("namespace") == namespace):
            return d
    raise AssertionError(f"{kind} {namespace}/{name} not rendered")


def container(docs: list[dict], deployment: str) -> dict:
    return find(docs, "Deployment", deployment)["spec"]["template"]["spec"]["containers"][0]


def _prepare_namespaces(cluster) -> None:
    for namespace in (RELEASE_NAMESPACE, ARGOCD_NAMESPACE, TENANT_NAMESPACE):
        kubectl(cluster, "create", "namespace", namespace, check=False)


@pytest.fixture(scope="module")
def control_plane_with_crds(control_plane, tmp_path_factory):
    """Namespaces, plus the chart's CRDs applied for real (and Argo CD's, which Argo CD would bring)."""
    _prepare_namespaces(control_plane)
    crds = [d for d in render() if d["kind"] == "CustomResourceDefinition"]
    path = tmp_path_factory.mktemp("crds") / "crds.yaml"
    path.write_text(yaml.safe_dump_all(crds))
    install_crds(control_plane, path, TESTDATA / "argocd-crds")
    return control_plane


def service_account_kubeconfig(cluster, service_account: str, directory: Path) -> Path:
    """A kubeconfig that authenticates as the chart's ServiceAccount with a real TokenRequest token."""
    token = kubectl(cluster, "create", "token", service_account, "-n", RELEASE_NAMESPACE,
                    "--duration=2h").stdout.strip()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{service_account}.kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": service_account,
        "clusters": [{"name": "control", "cluster": {
            "server": cluster.server, "certificate-authority-data": base64.b64encode(cluster.ca_pem).decode()}}],
        "users": [{"name": service_account, "user": {"token": token}}],
        "contexts": [{"name": service_account, "context": {"cluster": "control", "user": service_account}}],
    }))
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def chart_identities(control_plane_with_crds, run_dir):
    """The chart's ServiceAccounts, Roles, ClusterRoles and bindings applied for real; kubeconfigs as them.

    Rendered with the broker's issuer where this test serves it (https://127.0.0.1:<port>), as an admin
    sets broker.issuer to the URL tenant clusters reach; every other value is the chart's default.
    """
    cluster = control_plane_with_crds
    directory = run_dir / "chart-identities"
    broker_port = free_port()
    issuer = f"https://127.0.0.1:{broker_port}"
    docs = render("--set-json", f'tenantNamespaces=["{TENANT_NAMESPACE}"]', "--set", f"broker.issuer={issuer}",
                  *WEBHOOK_VALUES)
    rbac = [d for d in docs if d["kind"] in RBAC_KINDS]
    kubectl(cluster, "apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(rbac))
    return SimpleNamespace(
        cluster=cluster, docs=docs, directory=directory, issuer=issuer, broker_port=broker_port,
        broker_tls=broker_tls(directory / "broker-tls"),
        operator=service_account_kubeconfig(cluster, "keyless-operator", directory),
        broker=service_account_kubeconfig(cluster, "keyless-broker", directory),
        webhooks=service_account_kubeconfig(cluster, "keyless-webhooks", directory),
    )


def can_i(kubeconfig: Path, *args: str) -> bool:
    result = subprocess.run([str(binaries.find("kubectl")), f"--kubeconfig={kubeconfig}", "auth", "can-i", *args],
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() in ("yes", "no"), result.stderr
    return result.stdout.strip() == "yes"


class PodFiles:
    """Plays the kubelet for a Deployment's container: its in-pod file paths mapped to local files."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.files: dict[str, Path | str] = {}
        directory.mkdir(parents=True, exist_ok=True)

    def put(self, pod_path: str, content: bytes) -> Path:
        local = self.directory / pod_path.strip("/").replace("/", "_")
        local.write_bytes(content)
        local.chmod(0o600)
        self.files[pod_path] = local
        return local

    def args(self, args: list[str], drop: tuple[str, ...] = ()) -> list[str]:
        """The container's args with every mapped value (mounted path, Service URL) replaced; `drop` flags removed."""
        out = []
        for arg in args:
            flag, _, value = arg.partition("=")
            if flag in drop:
                continue
            out.append(f"{flag}={self.files[value]}" if value in self.files else arg)
        return out


def chart_operator_args(identities, name: str, control_api) -> list[str]:
    """The chart's operator args; the pod's files in place: broker CA, and the projected token (audience
    keyless-broker) bound to a Pod of the chart's keyless-operator ServiceAccount."""
    files = PodFiles(identities.directory / name)
    ca, _, _ = identities.broker_tls
    files.put("/var/run/keyless/broker-ca/ca.crt", ca.read_bytes())
    pod = caller_pod(control_api, RELEASE_NAMESPACE, "keyless-operator", pod_name=f"keyless-operator-{name}-{uuid.uuid4().hex[:6]}")  # fixtures of several modules share the control plane
    files.put("/var/run/secrets/keyless.dev/broker/token", bound_caller_token(control_api, pod, seconds=3600).encode())
    files.files[f"https://keyless-broker.{RELEASE_NAMESPACE}.svc"] = identities.issuer  # the Service, as reached here
    args = container(identities.docs, "keyless-operator")["args"]
    assert args[0] == "operator"
    # Ports are chosen by the test harness (OperatorProcess); everything else is the chart's.
    return files.args(args[1:], drop=("--metrics-listen", "--health-listen", "--resync-seconds"))


@pytest.fixture(scope="module")
def broker_under_chart_rbac(chart_identities):
    """The real broker with the chart Deployment's args, its TLS files in place, as keyless-broker."""
    files = PodFiles(chart_identities.directory / "broker")
    ca, cert, key = chart_identities.broker_tls
    files.put("/var/run/keyless/tls/tls.crt", cert.read_bytes())
    files.put("/var/run/keyless/tls/tls.key", key.read_bytes())
    chart_args = container(chart_identities.docs, "keyless-broker")["args"]
    assert f"--issuer={chart_identities.issuer}" in chart_args
    # start_broker supplies --listen/--kubeconfig/TLS; the chart's own flags come after and win.
    broker = start_broker(SimpleNamespace(kubeconfig=chart_identities.broker), RELEASE_NAMESPACE,
                          chart_identities.directory / "broker", *files.args(chart_args[1:], drop=("--listen", "--metrics-listen")),
                          port=chart_identities.broker_port, tls=(ca, cert, key))
    yield SimpleNamespace(process=broker, issuer=chart_identities.issuer, ca=ca)
    broker.stop()


@pytest.fixture(scope="module")
def operator_under_chart_rbac(chart_identities, broker_under_chart_rbac, control_api):
    process = OperatorProcess(SimpleNamespace(kubeconfig=chart_identities.operator),
                              chart_identities.directory / "operator",
                              extra_args=chart_operator_args(chart_identities, "operator", control_api)).start()
    yield process
    remove_all_remote_tenant_clusters(chart_identities.cluster)
    process.stop()


@pytest.fixture(scope="module")
def registered_cluster(operator_under_chart_rbac, chart_identities, control_api):
    """A RemoteTenantCluster (applied by an admin) that the operator registered under the chart's RBAC."""
    apply(chart_identities.cluster, rtc_manifest("dev", TENANT_NAMESPACE))

    def registered():
        obj = k.CustomObjectsApi(control_api).get_namespaced_custom_object(
            "keyless.dev", "v1alpha1", TENANT_NAMESPACE, "remotetenantclusters", "dev")
        conditions = {c["type"]: c for c in (obj.get("status") or {}).get("conditions", [])}
        wanted = ("ArgoClusterRegistered", "AppProjectReady", "BrokerTargetRegistered")
        assert all(conditions.get(t, {}).get("status") == "True" for t in wanted), conditions
        return obj
    return eventually(registered, timeout=60, message="RemoteTenantCluster registered under the chart's RBAC")


def http_status(url: str) -> int | None:
    """The HTTP status of a GET, or None when nothing listens."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def listening_ports(pid: int) -> set[int]:
    """TCP ports a process listens on (its socket inodes matched against /proc/net/tcp in LISTEN state)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def forbidden_lines(log: str) -> list[str]:
    # Not a bare "403": timestamps such as 02:51:34.403Z contain it.
    pattern = re.compile(r'[Ff]orbidden|"status":\s*403\b|\bHTTP 403\b')
    return [line for line in log.splitlines() if pattern.search(line)]


def verified_claims(token: str, jwks: dict, audience: str, issuer: str) -> dict:
    header = jwt.get_unverified_header(token)
    key = next(jwt.PyJWK(candidate) for candidate in jwks["keys"] if candidate["kid"] == header["kid"])
    return jwt.decode(token, key=key, algorithms=[header["alg"]], audience=audience, issuer=issuer)
