"""`keyless render` prints every object the operator would create, without a cluster."""
from __future__ import annotations

import subprocess

import yaml

from .conftest import ROOT
from .operator_fixtures import KEYLESS


def render(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([KEYLESS, "render", *args], capture_output=True, text=True, input=input, timeout=60)


def test_render_of_a_managed_cluster_lists_control_plane_and_tenant_objects():
    result = render("-f", str(ROOT / "examples" / "tenant-a-dev-managed.yaml"))
    assert result.returncode == 0, result.stderr
    objects = list(yaml.safe_load_all(result.stdout))
    kinds = [o["kind"] for o in objects]
    assert kinds[:3] == ["Secret", "AppProject", "BrokerTarget"]
    for kind in ("Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "Deployment",
                 "Service", "PodDisruptionBudget"):
        assert kind in kinds
    tls = next(o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] == "kube-oidc-proxy-tls")
    assert "PRIVATE KEY" not in result.stdout and tls["type"] == "kubernetes.io/tls"
    # The bootstrap Secret in the input is not something the operator creates.
    assert "tenant-a-prod-bootstrap" not in [o["metadata"]["name"] for o in objects]


def test_render_of_a_direct_cluster_prints_the_authentication_configuration(tmp_path):
    manifest = (ROOT / "examples" / "tenant-a-dev.yaml").read_text().replace("${SERVER}", "https://t.example.com")
    manifest = manifest.replace("${CA_DATA}", "")
    manifest = manifest.replace("  caData: \n", "").replace("  caData:          # base64 PEM of that endpoint's CA\n", "")
    doc = yaml.safe_load(manifest)
    doc["spec"].pop("caData", None)
    result = render("-f", "-", "--broker-issuer", "https://broker.example.com", input=yaml.safe_dump(doc))
    assert result.returncode == 0, result.stderr
    config = [o for o in yaml.safe_load_all(result.stdout) if o["kind"] == "AuthenticationConfiguration"][0]
    issuer = config["jwt"][0]["issuer"]
    assert issuer["url"] == "https://broker.example.com"
    assert issuer["audiences"] == ["keyless:tenants:tenant-a-dev"]


def test_render_of_an_incomplete_manifest_says_what_is_missing():
    result = render("-f", "-", input="kind: RemoteTenantCluster\nmetadata: {name: x, namespace: y}\nspec: {}\n")
    assert result.returncode == 1
    assert "required field 'tenant'" in result.stderr
