"""`keyless render` is a CI gate a GitOps repository can trust: for every manifest of the schema suite it gives
the real API server's verdict (refused or accepted), and what it prints for the control plane and the tenant
goes through `kubectl apply` as it is."""
from __future__ import annotations

import copy
import subprocess
import uuid

import pytest
import yaml

from keyless.envtest import binaries

from .helpers import kubectl
from .operator_fixtures import KEYLESS, label_tenant_namespaces, prepare_control_plane
from .rtc_cases import BAD_INPUTS, GOOD_INPUTS, MORE_BAD_INPUTS, valid

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def control(control_plane):
    """The CRDs (ours, Argo CD's, OpenUnison's) and the namespaces the operator writes to."""
    prepare_control_plane(control_plane)
    return control_plane


def api_server_accepts(cluster, manifest: dict) -> tuple[bool, str]:
    result = kubectl(cluster, "apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump(manifest), check=False)
    return result.returncode == 0, result.stderr


def render_verdicts(manifests: list[dict], path) -> tuple[list[bool], subprocess.CompletedProcess]:
    """Whether `keyless render` accepts each manifest: all in one file, each refusal names its document."""
    path.write_text(yaml.safe_dump_all(manifests))
    result = subprocess.run([KEYLESS, "render", "-f", str(path)], capture_output=True, text=True, timeout=120)
    lines = result.stderr.splitlines()
    accepted = [not any(line.startswith(f"keyless render: {path}#{i} ") for line in lines)
                for i in range(1, len(manifests) + 1)]
    return accepted, result


def test_render_and_the_api_server_refuse_the_same_bad_manifests(control, namespace, tmp_path):
    label_tenant_namespaces(control, valid(namespace))
    cases = {name: change for name, (change, _) in BAD_INPUTS.items()} | MORE_BAD_INPUTS
    names = sorted(cases)
    manifests = [cases[name](copy.deepcopy(valid(namespace))) for name in names]
    rendered, result = render_verdicts(manifests, tmp_path / "bad.yaml")
    assert result.returncode == 1 and result.stdout == "", result.stderr
    disagree = []
    for name, manifest, render_accepts in zip(names, manifests, rendered):
        api_accepts, api_says = api_server_accepts(control, manifest)
        if api_accepts or render_accepts:
            disagree.append(f"{name}: API server {'accepts' if api_accepts else 'refuses'} ({api_says.strip()}), "
                            f"render {'accepts' if render_accepts else 'refuses'}")
    assert not disagree, "\n".join(disagree) + "\n" + result.stderr
    assert "Traceback" not in result.stderr


def test_render_and_the_api_server_accept_the_same_good_manifests(control, namespace, tmp_path):
    label_tenant_namespaces(control, valid(namespace))
    manifests = []
    for name, change in sorted(GOOD_INPUTS.items()):
        manifest = change(copy.deepcopy(valid(namespace)))
        manifest["metadata"]["name"] = name.replace(" ", "-").lower()
        manifests.append(manifest)
        accepted, says = api_server_accepts(control, manifest)
        assert accepted, f"{name}: {says}"
    rendered, result = render_verdicts(manifests, tmp_path / "good.yaml")
    assert all(rendered) and result.returncode == 0, result.stderr


def _pipe(render_args: list[str], cluster) -> subprocess.CompletedProcess:
    """`keyless render ... | kubectl apply --dry-run=server -f -`, literally, failing when either fails."""
    kubectl_bin = binaries.find("kubectl")
    command = (f"set -o pipefail; {KEYLESS} render {' '.join(render_args)} | "
               f"{kubectl_bin} --kubeconfig={cluster.kubeconfig} apply --dry-run=server -f -")
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)


def test_render_only_control_plane_pipes_into_kubectl_apply(control, namespace, tmp_path):
    manifest = valid(namespace)
    manifest["metadata"]["name"] = "piped"
    manifest["spec"]["argocd"] = {"labels": {"environment": "dev"}}
    path = tmp_path / "tenants.yaml"
    path.write_text(yaml.safe_dump(manifest))
    result = _pipe(["--only", "control-plane", "-f", str(path)], control)
    assert result.returncode == 0, result.stderr
    applied = result.stdout.splitlines()
    assert any(line.startswith(f"secret/keyless-{namespace}-piped ") for line in applied), result.stdout
    assert any(line.startswith("appproject.argoproj.io/tenant-a ") for line in applied), result.stdout
    assert any(line.startswith("brokertarget.keyless.dev/") for line in applied), result.stdout
    assert len(applied) == 3, result.stdout


def test_render_only_tenant_pipes_into_kubectl_apply_on_the_tenant(control, tenant_cluster, namespace, tmp_path):
    proxy_namespace = f"proxy-{uuid.uuid4().hex[:8]}"
    kubectl(tenant_cluster, "create", "namespace", proxy_namespace)
    try:
        manifest = valid(namespace)
        manifest["spec"]["proxy"] = {"namespace": proxy_namespace}
        path = tmp_path / "tenants.yaml"
        path.write_text(yaml.safe_dump(manifest))
        result = _pipe(["--only", "tenant", "-f", str(path)], tenant_cluster)
        assert result.returncode == 0, result.stderr
        kinds = {line.split("/", 1)[0].split(".", 1)[0] for line in result.stdout.splitlines()}
        assert {"deployment", "service", "secret", "clusterrolebinding", "configmap"} <= kinds, result.stdout
    finally:
        kubectl(tenant_cluster, "delete", "namespace", proxy_namespace, "--wait=false", check=False)
