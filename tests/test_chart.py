"""The Helm chart: real `helm lint`/`helm template`, the real API server accepting what it renders, and
the real operator and broker running under exactly the chart's ServiceAccounts and RBAC."""
from __future__ import annotations

import base64
import functools
import json
import re
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import jwt
import pytest
import yaml
from kubernetes import client as k
from kubernetes.client.rest import ApiException

from keyless.cli import build_parser
from keyless.envtest import binaries
from keyless.envtest.cluster import LocalCluster, free_port, start_process, stop_process, tail
from keyless.render.tenant import render_authentication_configuration

from .broker_fixtures import bound_caller_token, broker_tls, caller_pod, start_broker
from .conftest import ROOT, TESTDATA, api_client, require_binary
from .helpers import eventually, install_crds, kubectl
from .operator_fixtures import KEYLESS, OperatorProcess, apply, remove_all_remote_tenant_clusters, rtc_manifest

CHART = ROOT / "charts" / "keyless"
RELEASE_NAMESPACE = "keyless-system"
ARGOCD_NAMESPACE = "argocd"
TENANT_NAMESPACE = "keyless-clusters"  # where the RemoteTenantClusters (and their bootstrap Secrets) live
OPERATOR_USER = f"system:serviceaccount:{RELEASE_NAMESPACE}:keyless-operator"
WEBHOOK_VALUES = ["--set", "webhooks.enabled=true", "--set",
                  f"webhooks.tls.caBundle={base64.b64encode(b'test-ca').decode()}"]
RBAC_KINDS = {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}
PKI_NAMESPACE = "keyless-pki"

pytestmark = require_binary("helm")


# ---- helm -----------------------------------------------------------------------------------------
def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(binaries.find("helm")), *args], capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def template(*values: str, namespace: str = RELEASE_NAMESPACE, check: bool = True) -> subprocess.CompletedProcess:
    return helm("template", "keyless", str(CHART), "--namespace", namespace, *values, check=check)


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


# ---- static checks of what the chart renders --------------------------------------------------------
def test_chart_crds_are_byte_identical_copies_of_the_repository_crds():
    ours = {p.name: p.read_bytes() for p in (ROOT / "crds").glob("*.yaml")}
    chart = {p.name: p.read_bytes() for p in (CHART / "files" / "crds").glob("*.yaml")}
    assert ours, "no CRDs in crds/"
    assert chart == ours, "charts/keyless/files/crds/ differs from crds/: run `cp crds/*.yaml charts/keyless/files/crds/`"


def test_rendered_crds_are_the_repository_crds_plus_chart_labels_and_keep_policy():
    docs = render()
    rendered = {d["metadata"]["name"]: d for d in docs if d["kind"] == "CustomResourceDefinition"}
    for path in (ROOT / "crds").glob("*.yaml"):
        source = yaml.safe_load(path.read_text())
        crd = rendered.pop(source["metadata"]["name"])
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert crd["metadata"]["labels"]["app.kubernetes.io/instance"] == "keyless"
        crd.pop("metadata"), source.pop("metadata")
        assert crd == source
    assert not rendered
    assert not [d for d in render("--set", "crds.install=false") if d["kind"] == "CustomResourceDefinition"]


@pytest.mark.parametrize("values", [[], WEBHOOK_VALUES], ids=["defaults", "webhooks-enabled"])
def test_helm_lint_passes_strictly(values):
    result = helm("lint", "--strict", str(CHART), "--namespace", RELEASE_NAMESPACE, *values)
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("values, complaint", [
    (["--set", "operator.replicas=0"], "/operator/replicas"),
    (["--set", "image.pullPolicy=Sometimes"], "/image/pullPolicy"),
    (["--set", "broker.issuer=http://keyless.example.com"], "/broker/issuer"),
    (["--set", "operator.replica=2"], "replica"),  # a typo is refused, not silently ignored
    (["--set-json", "argocd.namespaces=[]"], "/argocd/namespaces"),
    (["--set", "podSecurityContext.runAsNonRoot=false"], "/podSecurityContext/runAsNonRoot"),
    (["--set", "broker.tls.certManager.enabled=true"], "issuerRef"),
], ids=["no-replicas", "pull-policy", "http-issuer", "unknown-key", "no-argocd-namespace", "root", "issuer-missing"])
def test_values_schema_rejects_bad_values(values, complaint):
    result = template(*values, check=False)
    assert result.returncode != 0
    assert "schema" in result.stderr and complaint in result.stderr, result.stderr
    lint = helm("lint", str(CHART), *values, check=False)
    assert lint.returncode != 0


def test_chart_refuses_to_mix_tenant_or_argocd_secrets_with_the_broker_signing_keys():
    result = template("--set-json", f'tenantNamespaces=["{RELEASE_NAMESPACE}"]', check=False)
    assert result.returncode != 0 and "signing keys" in result.stderr
    result = template("--set-json", f'argocd.namespaces=["{RELEASE_NAMESPACE}"]', check=False)
    assert result.returncode != 0 and "signing keys" in result.stderr
    result = template(*WEBHOOK_VALUES[:2], check=False)  # webhooks without a CA bundle or cert-manager
    assert result.returncode != 0 and "caBundle" in result.stderr


def test_secrets_are_granted_only_by_namespaced_roles_in_the_intended_namespaces():
    docs = render("--set-json", f'tenantNamespaces=["{TENANT_NAMESPACE}"]', *WEBHOOK_VALUES)
    for role in (d for d in docs if d["kind"] == "ClusterRole"):
        for rule in role["rules"]:
            assert "secrets" not in rule["resources"] and "*" not in rule["resources"], role["metadata"]["name"]
            assert "*" not in rule["verbs"], role["metadata"]["name"]

    def secret_verbs(namespace: str, role_name: str) -> set[str]:
        role = find(docs, "Role", role_name, namespace)
        return {v for r in role["rules"] if "secrets" in r["resources"] and not r.get("resourceNames")
                for v in r["verbs"]}

    assert secret_verbs(ARGOCD_NAMESPACE, "keyless-operator-argocd") == {"get", "list", "watch", "create", "patch",
                                                                          "delete"}
    assert secret_verbs(TENANT_NAMESPACE, "keyless-operator-bootstrap") == {"get", "delete"}
    # Proxy CA Secrets of Managed mode live in their own namespace, by name only (no list or watch);
    # the operator has no Secret right at all in the release namespace, home of the signing keys.
    assert secret_verbs(PKI_NAMESPACE, "keyless-operator-pki") == {"get", "create", "patch", "delete"}
    holders = {(d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs if d["kind"] == "Role"
               and any("secrets" in r["resources"] for r in d["rules"])}
    assert holders == {(ARGOCD_NAMESPACE, "keyless-operator-argocd"), (TENANT_NAMESPACE, "keyless-operator-bootstrap"),
                       (PKI_NAMESPACE, "keyless-operator-pki"), (RELEASE_NAMESPACE, "keyless-broker")}


def test_every_pod_runs_locked_down_and_the_operator_runs_as_leader_and_standby():
    docs = render(*WEBHOOK_VALUES)
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} == {"keyless-operator", "keyless-broker", "keyless-webhooks"}
    for d in deployments:
        pod = d["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
            assert c["livenessProbe"] and c["readinessProbe"]
    operator = find(docs, "Deployment", "keyless-operator")
    assert operator["spec"]["replicas"] == 2
    args = container(docs, "keyless-operator")["args"]
    assert "--leader-election" in args and f"--leader-election-namespace={RELEASE_NAMESPACE}" in args
    token_volume = next(v for v in operator["spec"]["template"]["spec"]["volumes"] if v["name"] == "broker-token")
    projected = token_volume["projected"]["sources"][0]["serviceAccountToken"]
    assert projected["audience"] == "keyless-broker" and projected["expirationSeconds"] == 3600
    broker = find(docs, "Deployment", "keyless-broker")
    assert broker["spec"]["replicas"] == 2
    pdb = find(docs, "PodDisruptionBudget", "keyless-broker")
    assert pdb["spec"]["selector"]["matchLabels"] == broker["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["minAvailable"] == 1
    probes = container(docs, "keyless-broker")
    assert probes["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "https", "scheme": "HTTPS"}
    assert probes["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "https", "scheme": "HTTPS"}
    tls_volume = next(v for v in broker["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls")
    assert tls_volume["secret"]["secretName"] == "keyless-broker-tls"


def test_container_args_are_accepted_by_the_real_command_line_parsers():
    docs = render(*WEBHOOK_VALUES)
    parser = build_parser()
    operator = parser.parse_args(container(docs, "keyless-operator")["args"])
    assert operator.argocd_namespace == [ARGOCD_NAMESPACE] and operator.leader_election
    broker = parser.parse_args(container(docs, "keyless-broker")["args"])
    assert broker.issuer == f"https://keyless-broker.{RELEASE_NAMESPACE}.svc"
    assert broker.operator_identity == OPERATOR_USER
    from keyless.webhooks.__main__ import build_parser as webhooks_parser
    webhooks = container(docs, "keyless-webhooks")
    assert webhooks["command"] == ["python", "-m", "keyless.webhooks"]
    assert webhooks_parser().parse_args(webhooks["args"]).argocd_namespace == [ARGOCD_NAMESPACE]


def test_webhook_configurations_have_the_shape_the_python_renderer_produces():
    from keyless.webhooks import configuration
    from keyless.webhooks.policy import Exemptions

    docs = render(*WEBHOOK_VALUES, "--set-json", 'argocd.namespaces=["argocd","team-argocd"]',
                  "--set-json", 'webhooks.adminUsers=["alice"]')
    ca = b"test-ca"
    client_config = functools.partial(configuration.service_client_config, RELEASE_NAMESPACE, "keyless-webhooks",
                                      443, ca)
    namespaces = ["argocd", "team-argocd"]
    expected = [
        configuration.render_validating_webhook_configuration(
            client_config, exemptions=Exemptions.build(["alice"], argocd_namespaces=namespaces),
            application_namespaces=namespaces),
        configuration.render_mutating_webhook_configuration(client_config, application_namespaces=namespaces),
    ]
    for want in expected:
        got = find(docs, want["kind"], want["metadata"]["name"])
        assert got["metadata"]["labels"].items() >= want["metadata"]["labels"].items()
        assert got["webhooks"] == want["webhooks"]


def test_argocd_values_add_the_agent_sidecar_with_its_own_token_and_a_read_only_shared_memory_volume():
    values = yaml.safe_load((CHART / "argocd-values.yaml").read_text())["controller"]
    volumes = {v["name"]: v for v in values["volumes"]}
    (agent,) = values["extraContainers"]
    args = build_parser().parse_args(agent["args"])
    assert args.command == "agent"
    operator_args = build_parser().parse_args(container(render(), "keyless-operator")["args"])
    # The agent writes exactly where the operator's exec command (`cat <dir>/<target>.json`) reads.
    assert args.dir == operator_args.credential_dir == "/var/run/keyless/credentials"
    assert args.broker_url == operator_args.exec_broker_url
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    for path in (args.dir, str(Path(args.token_file).parent), str(Path(args.broker_ca_file).parent)):
        assert mounts[path]["name"] in volumes
    credentials = volumes[mounts[args.dir]["name"]]
    assert credentials["emptyDir"]["medium"] == "Memory"
    assert not mounts[args.dir].get("readOnly")
    (controller_mount,) = values["volumeMounts"]
    assert controller_mount == {"name": mounts[args.dir]["name"], "mountPath": args.dir, "readOnly": True}
    token = volumes[mounts[str(Path(args.token_file).parent)]["name"]]["projected"]["sources"][0]["serviceAccountToken"]
    assert token == {"audience": "keyless-broker", "expirationSeconds": 3600, "path": Path(args.token_file).name}
    # The credential files are 0600: the agent must run as the controller's user (999) to share them.
    assert agent["securityContext"]["runAsUser"] == 999
    assert agent["securityContext"]["readOnlyRootFilesystem"] is True


def test_dockerfile_builds_one_non_root_image_with_the_keyless_entrypoint():
    text = (ROOT / "Dockerfile").read_text()
    instructions = [line.split(None, 1) for line in text.splitlines() if line and not line.startswith(("#", " "))]
    froms = [rest for op, rest in instructions if op == "FROM"]
    assert froms and all(f.startswith("python:3.11-slim") for f in froms)
    user = [rest for op, rest in instructions if op == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert json.loads(next(rest for op, rest in instructions if op == "ENTRYPOINT")) == ["keyless"]
    chart_uid = yaml.safe_load((CHART / "values.yaml").read_text())["podSecurityContext"]["runAsUser"]
    assert user[-1].split(":")[0] == str(chart_uid)
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignored and "!operator/" in ignored and "!pyproject.toml" in ignored


# ---- against the real API server --------------------------------------------------------------------
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


@pytest.mark.cluster
@pytest.mark.parametrize("values", [[], WEBHOOK_VALUES], ids=["defaults", "webhooks-enabled"])
def test_rendered_manifests_pass_server_side_dry_run(control_plane_with_crds, values):
    manifest = template("--set-json", f'tenantNamespaces=["{TENANT_NAMESPACE}"]', *values).stdout
    # Like helm, which creates the chart's Namespaces before the objects in them: a dry run of a
    # Namespace creates nothing, so the namespaced objects in it would find none.
    namespaces = [d for d in yaml.safe_load_all(manifest) if d and d["kind"] == "Namespace"]
    kubectl(control_plane_with_crds, "apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(namespaces))
    result = kubectl(control_plane_with_crds, "apply", "--server-side", "--dry-run=server", "-f", "-",
                     input=manifest)
    applied = [line for line in result.stdout.splitlines() if "serverside-applied" in line]
    rendered = [d for d in yaml.safe_load_all(manifest) if d]
    assert len(applied) == len(rendered), result.stdout
    assert "deployment.apps/keyless-broker serverside-applied (server dry run)" in result.stdout


@pytest.mark.cluster
def test_server_side_dry_run_refuses_a_broken_manifest(control_plane_with_crds):
    """The dry run above can fail: the same API server refuses an invalid Deployment."""
    docs = [d for d in render() if d["kind"] == "Deployment"]
    docs[0]["spec"]["selector"]["matchLabels"] = {"app.kubernetes.io/component": "something-else"}
    result = kubectl(control_plane_with_crds, "apply", "--server-side", "--dry-run=server", "-f", "-",
                     input=yaml.safe_dump_all(docs), check=False)
    assert result.returncode != 0 and "selector" in result.stderr, result.stderr


# ---- the operator and broker under exactly the chart's identities ----------------------------------
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


@pytest.mark.cluster
def test_argocd_controller_pod_with_the_agent_values_passes_server_side_dry_run(control_plane_with_crds):
    """The argocd-values.yaml pieces, placed as the argo-cd chart places them, form a valid Pod."""
    values = yaml.safe_load((CHART / "argocd-values.yaml").read_text())["controller"]
    controller = {"name": "application-controller", "image": "quay.io/argoproj/argocd:v3.1.0",
                  "args": ["/usr/local/bin/argocd-application-controller"], "volumeMounts": values["volumeMounts"]}
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "argocd-application-controller-0", "namespace": ARGOCD_NAMESPACE},
           "spec": {"serviceAccountName": "default", "containers": [controller, *values["extraContainers"]],
                    "volumes": values["volumes"]}}
    result = kubectl(control_plane_with_crds, "apply", "--server-side", "--dry-run=server", "-f", "-",
                     input=yaml.safe_dump(pod))
    assert "serverside-applied (server dry run)" in result.stdout


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


@pytest.mark.cluster
def test_chart_identities_cannot_touch_secrets_outside_their_namespaces(chart_identities):
    operator, broker = chart_identities.operator, chart_identities.broker
    # What the operator needs...
    assert can_i(operator, "create", "secrets", "-n", ARGOCD_NAMESPACE)
    assert can_i(operator, "delete", "secrets", "-n", TENANT_NAMESPACE)
    # ...and nothing more: not elsewhere, not cluster-wide, not the broker's signing keys.
    assert not can_i(operator, "create", "secrets", "-n", "default")
    assert not can_i(operator, "list", "secrets", "--all-namespaces")
    assert not can_i(operator, "list", "secrets", "-n", RELEASE_NAMESPACE)
    assert not can_i(operator, "update", "secrets/keyless-broker-signing-keys", "-n", RELEASE_NAMESPACE)
    assert not can_i(operator, "get", "secrets/keyless-broker-signing-keys", "-n", RELEASE_NAMESPACE)
    assert can_i(operator, "create", "secrets", "-n", PKI_NAMESPACE)
    assert not can_i(operator, "list", "secrets", "-n", PKI_NAMESPACE)
    assert not can_i(operator, "create", "secrets", "-n", TENANT_NAMESPACE)
    assert not can_i(operator, "create", "serviceaccounts", "--subresource=token", "-n", ARGOCD_NAMESPACE)
    assert broker != operator
    assert can_i(broker, "create", "tokenreviews.authentication.k8s.io")
    assert can_i(broker, "update", "secrets/keyless-broker-signing-keys", "-n", RELEASE_NAMESPACE)
    assert not can_i(broker, "update", "secrets/keyless-broker-tls", "-n", RELEASE_NAMESPACE)
    # The broker follows its key Secret by name: it may not list or watch the others.
    assert can_i(broker, "watch", "secrets/keyless-broker-signing-keys", "-n", RELEASE_NAMESPACE)
    assert not can_i(broker, "list", "secrets", "-n", RELEASE_NAMESPACE)
    assert not can_i(broker, "get", "secrets/keyless-broker-tls", "-n", RELEASE_NAMESPACE)
    assert not can_i(broker, "get", "secrets", "-n", ARGOCD_NAMESPACE)
    assert not can_i(broker, "create", "brokertargets.keyless.dev", "-n", RELEASE_NAMESPACE)
    assert not can_i(broker, "list", "pods", "-n", ARGOCD_NAMESPACE)


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
    pod = caller_pod(control_api, RELEASE_NAMESPACE, "keyless-operator", pod_name=f"keyless-operator-{name}")
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
                          chart_identities.directory / "broker", *files.args(chart_args[1:], drop=("--listen",)),
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


@pytest.mark.cluster
def test_operator_under_chart_rbac_registers_a_cluster(registered_cluster, operator_under_chart_rbac, control_api):
    custom, core = k.CustomObjectsApi(control_api), k.CoreV1Api(control_api)
    assert registered_cluster["status"]["observedGeneration"] == registered_cluster["metadata"]["generation"]
    assert "keyless.dev/cleanup" in registered_cluster["metadata"]["finalizers"]  # patch on the manifest
    secret = core.read_namespaced_secret(f"keyless-{TENANT_NAMESPACE}-dev", ARGOCD_NAMESPACE)
    assert secret.metadata.labels["argocd.argoproj.io/secret-type"] == "cluster"
    project = custom.get_namespaced_custom_object("argoproj.io", "v1alpha1", ARGOCD_NAMESPACE, "appprojects",
                                                  "tenant-a")
    assert project["spec"]["destinations"]
    target = custom.get_namespaced_custom_object("keyless.dev", "v1alpha1", RELEASE_NAMESPACE, "brokertargets",
                                                 f"{TENANT_NAMESPACE}.dev")
    assert target["spec"]["audience"] == f"keyless:{TENANT_NAMESPACE}:dev"

    def events():
        found = core.list_namespaced_event(TENANT_NAMESPACE, field_selector="involvedObject.name=dev").items
        assert found, "no events yet"
        return found
    assert any(e.source.component == "keyless-operator" for e in eventually(events, message="operator events"))
    lease = k.CoordinationV1Api(control_api).read_namespaced_lease("keyless-operator", RELEASE_NAMESPACE)
    assert lease.spec.holder_identity
    assert not forbidden_lines(operator_under_chart_rbac.log())


@pytest.fixture(scope="module")
def managed_tenant(chart_identities, broker_under_chart_rbac, run_dir):
    """A tenant API server that trusts the broker for one audience, as kube-oidc-proxy would on its behalf
    (the proxy cannot be built here; without a kubelet no proxy Pod would run anyway)."""
    trust = render_authentication_configuration(chart_identities.issuer, f"keyless:{TENANT_NAMESPACE}:managed",
                                                broker_under_chart_rbac.ca.read_bytes())
    tenant = LocalCluster("chart-managed-tenant", run_dir / "chart-managed-tenant", controller_manager=False,
                          authentication_config=trust)
    tenant.start()
    yield tenant
    tenant.stop()


@pytest.mark.cluster
def test_operator_under_chart_rbac_installs_managed_mode_with_the_bootstrap_secret_and_then_deletes_it(
        operator_under_chart_rbac, managed_tenant, chart_identities, control_api):
    """Every Secret right the chart grants the operator, used for real: the bootstrap kubeconfig (get,
    delete) in a tenant namespace, the proxy CA Secret in the PKI namespace, the Argo CD Secret."""
    core = k.CoreV1Api(control_api)
    core.create_namespaced_secret(TENANT_NAMESPACE, k.V1Secret(
        metadata=k.V1ObjectMeta(name="managed-bootstrap"),
        string_data={"kubeconfig": managed_tenant.kubeconfig.read_text()}))
    apply(chart_identities.cluster, {  # as the admin
        "apiVersion": "keyless.dev/v1alpha1", "kind": "RemoteTenantCluster",
        "metadata": {"name": "managed", "namespace": TENANT_NAMESPACE},
        "spec": {"tenant": "tenant-a", "server": managed_tenant.server,
                 "caData": base64.b64encode(managed_tenant.ca_pem).decode(),
                 "access": {"clusterRole": "cluster-admin"},
                 "bootstrap": {"kubeconfigSecretRef": {"name": "managed-bootstrap"}, "deleteAfterInstall": True}}})

    def verified():
        obj = k.CustomObjectsApi(control_api).get_namespaced_custom_object(
            "keyless.dev", "v1alpha1", TENANT_NAMESPACE, "remotetenantclusters", "managed")
        conditions = {c["type"]: c for c in (obj.get("status") or {}).get("conditions", [])}
        assert conditions.get("TokenVerified", {}).get("status") == "True", conditions
        return obj
    eventually(verified, timeout=120, message="the chain verified by the operator under the chart's RBAC")

    def bootstrap_deleted():
        try:
            core.read_namespaced_secret("managed-bootstrap", TENANT_NAMESPACE)
        except ApiException as e:
            return e.status == 404
        return False
    eventually(bootstrap_deleted, timeout=60, message="bootstrap Secret deleted after install")
    ca_secrets = core.list_namespaced_secret(
        PKI_NAMESPACE, label_selector=f"keyless.dev/cluster-namespace={TENANT_NAMESPACE},"
                                          "keyless.dev/cluster-name=managed").items
    assert [s.metadata.name for s in ca_secrets] and "ca.key" in ca_secrets[0].data
    tenant_apps = k.AppsV1Api(api_client(managed_tenant))
    assert tenant_apps.read_namespaced_deployment("kube-oidc-proxy", "kube-oidc-proxy")
    assert not forbidden_lines(operator_under_chart_rbac.log())


@pytest.mark.cluster
def test_standby_operator_replica_takes_over_the_lease_when_the_leader_dies(
        operator_under_chart_rbac, chart_identities, control_api, registered_cluster):
    coordination = k.CoordinationV1Api(control_api)

    def lease():
        return coordination.read_namespaced_lease("keyless-operator", RELEASE_NAMESPACE).spec

    leader = lease().holder_identity
    metrics_port, health_port = free_port(), free_port()
    args = [KEYLESS, "operator", f"--kubeconfig={chart_identities.operator}", "--verbose",
            f"--metrics-listen=127.0.0.1:{metrics_port}", f"--health-listen=127.0.0.1:{health_port}",
            *chart_operator_args(chart_identities, "standby", control_api)]
    log = chart_identities.directory / "standby.log"
    standby = start_process(args, log)
    try:
        # While the leader lives and renews, the standby (same args, same RBAC) only waits.
        renewals = set()

        def leader_renewed_twice():
            spec = lease()
            assert spec.holder_identity == leader, spec.holder_identity
            renewals.add(spec.renew_time)
            return len(renewals) >= 3
        eventually(leader_renewed_twice, timeout=60, message="the leader renewing beside the standby")
        assert standby.poll() is None, tail(log)
        assert "now leads" not in log.read_text()
        # The chart's probe is answered by the standby too (it listens on the health port itself), so
        # the kubelet never restarts a healthy standby.
        probe = container(chart_identities.docs, "keyless-operator")["livenessProbe"]["httpGet"]
        assert probe == {"path": "/healthz", "port": "health"}
        assert listening_ports(standby.pid) == {metrics_port, health_port}, tail(log)
        assert http_status(f"http://127.0.0.1:{health_port}{probe['path']}") == 200

        operator_under_chart_rbac.stop()

        def new_leader():
            holder = lease().holder_identity
            assert holder != leader, holder
            return holder
        eventually(new_leader, timeout=60, message="the standby took the Lease")
        assert standby.poll() is None, tail(log)
        # ...and reconciles: a new manifest is registered by the former standby, under the same RBAC.
        apply(chart_identities.cluster, rtc_manifest("staging", TENANT_NAMESPACE))
        def staging_registered():
            try:
                return k.CoreV1Api(control_api).read_namespaced_secret(f"keyless-{TENANT_NAMESPACE}-staging",
                                                                       ARGOCD_NAMESPACE)
            except ApiException as e:
                raise AssertionError(e.reason) from None
        eventually(staging_registered, timeout=60, message="staging registered by the former standby")
        assert not forbidden_lines(log.read_text())
    finally:
        stop_process(standby)
        if operator_under_chart_rbac.process is None:
            # Bring the module's operator back: later tests and its teardown (which finalizes this
            # module's manifests) need one running.
            operator_under_chart_rbac.start()


def verified_claims(token: str, jwks: dict, audience: str, issuer: str) -> dict:
    header = jwt.get_unverified_header(token)
    key = next(jwt.PyJWK(candidate) for candidate in jwks["keys"] if candidate["kid"] == header["kid"])
    return jwt.decode(token, key=key, algorithms=[header["alg"]], audience=audience, issuer=issuer)


@pytest.mark.cluster
def test_broker_under_chart_rbac_serves_discovery_and_mints_for_a_pod_bound_caller(
        broker_under_chart_rbac, registered_cluster, control_api):
    broker, issuer = broker_under_chart_rbac.process, broker_under_chart_rbac.issuer
    discovery = broker.get("/.well-known/openid-configuration")
    assert discovery.status_code == 200 and discovery.json()["issuer"] == issuer
    jwks = broker.get("/openid/v1/jwks").json()
    assert jwks["keys"]

    pod = caller_pod(control_api, ARGOCD_NAMESPACE, "argocd-application-controller")
    caller = bound_caller_token(control_api, pod)
    target = registered_cluster["status"]["targetName"]
    response = broker.mint(target, caller)
    assert response.status_code == 200, response.text
    claims = verified_claims(response.json()["token"], jwks, f"keyless:{TENANT_NAMESPACE}:dev", issuer)
    assert claims["sub"] == "keyless:tenant-a:argocd"

    # The broker's Pod check runs under the chart's RBAC too: a deleted caller Pod is refused.
    k.CoreV1Api(control_api).delete_namespaced_pod(pod.metadata.name, ARGOCD_NAMESPACE, grace_period_seconds=0)
    refused = eventually(lambda: (r := broker.mint(target, caller)).status_code == 401 and r.json(),
                         message="mint refused after the caller Pod is gone")
    assert refused["error"] == "pod_gone"
    assert not forbidden_lines(broker.log_text())
    secret = k.CoreV1Api(control_api).read_namespaced_secret("keyless-broker-signing-keys", RELEASE_NAMESPACE)
    assert secret.metadata.labels["keyless.dev/component"] == "broker-signing-keys"


@pytest.mark.cluster
def test_agent_from_argocd_values_keeps_the_credential_the_registered_exec_command_reads(
        broker_under_chart_rbac, registered_cluster, chart_identities, control_api):
    """operator (chart RBAC) -> Argo CD Secret; broker (chart RBAC) -> token; agent (argocd-values) -> file."""
    values = yaml.safe_load((CHART / "argocd-values.yaml").read_text())["controller"]
    (agent,) = values["extraContainers"]
    parsed = build_parser().parse_args(agent["args"])
    pod = caller_pod(control_api, ARGOCD_NAMESPACE, "argocd-application-controller",
                     pod_name="argocd-application-controller-0")
    files = PodFiles(chart_identities.directory / "agent")
    files.put(parsed.token_file, bound_caller_token(control_api, pod, audience="keyless-broker").encode())
    files.put(parsed.broker_ca_file, broker_under_chart_rbac.ca.read_bytes())
    credentials = chart_identities.directory / "agent" / "credentials"
    credentials.mkdir(mode=0o700)
    files.files[parsed.dir] = credentials
    files.files[parsed.broker_url] = broker_under_chart_rbac.process.url  # the Service, as the test reaches it
    health = free_port()
    args = [KEYLESS, *files.args(agent["args"], drop=("--health-listen",)), f"--health-listen=127.0.0.1:{health}"]
    log = chart_identities.directory / "agent.log"
    process = start_process(args, log)
    try:
        secret = k.CoreV1Api(control_api).read_namespaced_secret(f"keyless-{TENANT_NAMESPACE}-dev", ARGOCD_NAMESPACE)
        exec_config = json.loads(base64.b64decode(secret.data["config"]))["execProviderConfig"]
        assert exec_config["command"] == "cat" and exec_config["args"][0].startswith(parsed.dir + "/")
        in_pod_path = exec_config["args"][0]
        local_path = credentials / Path(in_pod_path).relative_to(parsed.dir)

        def credential():
            assert process.poll() is None, tail(log)
            assert local_path.exists(), sorted(p.name for p in credentials.iterdir())
            # What client-go in the controller container does: run the configured command.
            run = subprocess.run([exec_config["command"], str(local_path)], capture_output=True, text=True,
                                 timeout=10)
            return json.loads(run.stdout)
        exec_credential = eventually(credential, timeout=60, message="the agent's credential file")
        assert exec_credential["apiVersion"] == exec_config["apiVersion"] == parsed.exec_api_version
        assert exec_credential["kind"] == "ExecCredential"
        assert exec_credential["status"]["expirationTimestamp"]
        jwks = broker_under_chart_rbac.process.get("/openid/v1/jwks").json()
        claims = verified_claims(exec_credential["status"]["token"], jwks, f"keyless:{TENANT_NAMESPACE}:dev",
                                 broker_under_chart_rbac.issuer)
        assert claims["sub"] == "keyless:tenant-a:argocd"
        assert oct(local_path.stat().st_mode & 0o777) == "0o600"
    finally:
        stop_process(process)

def test_cert_manager_issues_the_serving_certificates_the_pods_mount():
    issuer_ref = ["--set", "broker.tls.certManager.enabled=true", "--set", "broker.tls.certManager.issuerRef.name=ca",
                  "--set", "broker.tls.certManager.issuerRef.kind=ClusterIssuer",
                  "--set", "broker.issuer=https://keyless.example.com",
                  "--set", "webhooks.enabled=true", "--set", "webhooks.tls.certManager.enabled=true",
                  "--set", "webhooks.tls.certManager.issuerRef.name=ca"]
    docs = render(*issuer_ref)
    for name, service_host in (("keyless-broker", "keyless-broker.keyless-system.svc"),
                               ("keyless-webhooks", "keyless-webhooks.keyless-system.svc")):
        certificate = find(docs, "Certificate", name, RELEASE_NAMESPACE)
        volume = next(v for v in find(docs, "Deployment", name)["spec"]["template"]["spec"]["volumes"]
                      if v["name"] == "tls")
        assert certificate["spec"]["secretName"] == volume["secret"]["secretName"]
        assert service_host in certificate["spec"]["dnsNames"]
        assert certificate["spec"]["issuerRef"]["name"] == "ca"
    # The issuer's own host must be in the broker's certificate: tenant clusters dial it for discovery.
    assert "keyless.example.com" in find(docs, "Certificate", "keyless-broker")["spec"]["dnsNames"]
    for kind in ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"):
        webhook = find(docs, kind, "keyless-tenant-guardrails")
        assert webhook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == \
            f"{RELEASE_NAMESPACE}/keyless-webhooks"


def test_broker_ca_is_published_where_the_agent_sidecar_reads_it():
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    docs = render("--set", f"broker.tls.caCert={pem}", "--set-json", 'argocd.namespaces=["argocd","team-argocd"]')
    agent_values = yaml.safe_load((CHART / "argocd-values.yaml").read_text())["controller"]
    (ca_volume,) = [v for v in agent_values["volumes"] if "configMap" in v]
    for namespace in ("argocd", "team-argocd"):
        config_map = find(docs, "ConfigMap", ca_volume["configMap"]["name"], namespace)
        assert config_map["data"]["ca.crt"] == pem
    assert not [d for d in render() if d["kind"] == "ConfigMap"]


@pytest.mark.cluster
def test_webhook_server_under_chart_rbac_syncs_its_tenant_directory_and_turns_ready(chart_identities,
                                                                                    registered_cluster):
    files = PodFiles(chart_identities.directory / "webhooks")
    ca, cert, key = broker_tls(chart_identities.directory / "webhooks-tls")
    files.put("/var/run/keyless/tls/tls.crt", cert.read_bytes())
    files.put("/var/run/keyless/tls/tls.key", key.read_bytes())
    spec = container(chart_identities.docs, "keyless-webhooks")
    port = free_port()
    command = [str(Path(KEYLESS).parent / arg) if arg == "python" else arg for arg in spec["command"]]
    args = [*command, f"--kubeconfig={chart_identities.webhooks}", *files.args(spec["args"], drop=("--listen",)),
            f"--listen=127.0.0.1:{port}"]
    log = chart_identities.directory / "webhooks.log"
    process = start_process(args, log)
    context = ssl.create_default_context(cafile=str(ca))
    probe = spec["readinessProbe"]["httpGet"]

    def ready():
        assert process.poll() is None, tail(log)
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}{probe['path']}", context=context, timeout=2) as r:
                return r.status == 200
        except OSError as e:
            raise AssertionError(str(e)) from None
    try:
        # /readyz turns 200 only after the RemoteTenantCluster list+watch succeeded under the chart's RBAC.
        eventually(ready, timeout=90, message="webhook server ready under the chart's RBAC")
        assert not forbidden_lines(log.read_text())
    finally:
        stop_process(process)
