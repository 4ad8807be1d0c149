"""`keyless render` prints every object the operator would create, without a cluster."""
from __future__ import annotations

import copy
import json
import re
import subprocess

import yaml

from .conftest import ROOT
from .operator_fixtures import KEYLESS, ca_data
from .rtc_cases import BAD_INPUTS, GOOD_INPUTS, MORE_BAD_INPUTS, valid


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
    manifest = manifest.replace("${CA_DATA}", ca_data())
    docs = [d for d in yaml.safe_load_all(manifest) if d]
    result = render("-f", "-", "--broker-issuer", "https://broker.example.com", input=yaml.safe_dump_all(docs))
    assert result.returncode == 0, result.stderr
    config = [o for o in yaml.safe_load_all(result.stdout) if o["kind"] == "AuthenticationConfiguration"][0]
    issuer = config["jwt"][0]["issuer"]
    assert issuer["url"] == "https://broker.example.com"
    assert issuer["audiences"] == ["keyless:tenant-a:tenant-a-dev"]


def test_render_of_an_incomplete_manifest_says_what_is_missing():
    result = render("-f", "-", input="apiVersion: keyless.dev/v1alpha1\nkind: RemoteTenantCluster\n"
                                     "metadata: {name: x, namespace: y}\nspec: {}\n")
    assert result.returncode == 1 and result.stdout == ""
    for field in ("spec.tenant", "spec.server", "spec.access"):
        assert f"stdin#1 y/x {field}: required field is missing" in result.stderr, result.stderr


# ---- a CI gate: refuses what the API server refuses, and says where ------------------------------------------
def _cluster(name: str = "a", namespace: str | None = "tenants", **spec) -> dict:
    meta = {"name": name, **({"namespace": namespace} if namespace else {})}
    return {"apiVersion": "keyless.dev/v1alpha1", "kind": "RemoteTenantCluster", "metadata": meta,
            "spec": {"tenant": "tenant-a", "server": "https://proxy.a.example.com", "caData": ca_data(),
                     "access": {"clusterRole": "view"}, "proxy": {"mode": "External"}, **spec}}


def test_every_bad_manifest_of_the_schema_suite_is_refused_naming_its_document(tmp_path):
    """One file with every bad case: each document gets its own error line (file, index, object, field), so
    a document render accepted would be missing. tests/test_render_gate.py compares with a real API server."""
    cases = [(name, change(copy.deepcopy(valid("tenants")))) for name, (change, _) in sorted(BAD_INPUTS.items())]
    cases += [(name, change(copy.deepcopy(valid("tenants")))) for name, change in sorted(MORE_BAD_INPUTS.items())]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump_all([m for _, m in cases]))
    result = render("-f", str(path))
    assert result.returncode == 1 and result.stdout == ""
    for index, (name, _) in enumerate(cases, start=1):
        assert f"{path}#{index} " in result.stderr, f"{name} was accepted:\n{result.stderr}"
    assert "Traceback" not in result.stderr and "Error:" not in result.stderr and "celpy" not in result.stderr


def test_good_manifests_render(tmp_path):
    docs = []
    for name, change in sorted(GOOD_INPUTS.items()):
        manifest = change(copy.deepcopy(valid("tenants")))
        manifest["metadata"]["name"] = name.replace(" ", "-").lower()
        docs.append(manifest)
    path = tmp_path / "good.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    result = render("-f", str(path))
    assert result.returncode == 0, result.stderr
    secrets = [o for o in yaml.safe_load_all(result.stdout) if o["kind"] == "Secret" and "argocd.argoproj.io/secret-type"
               in o["metadata"]["labels"]]
    assert len(secrets) == len(docs)


def test_errors_name_file_document_object_and_field_and_list_allowed_values(tmp_path):
    path = tmp_path / "tenants.yaml"
    ok = _cluster("ok")
    ttl = _cluster("a", access={"clusterRole": "view", "tokenTTLSeconds": "sixty"})
    mode = _cluster("b", proxy={"mode": "Sidecar"})
    path.write_text(yaml.safe_dump_all([ok, ttl, mode]))
    result = render("-f", str(path))
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert f"keyless render: {path}#2 tenants/a spec.access.tokenTTLSeconds: must be an integer " \
           f'(got the string "sixty")' in lines, result.stderr
    assert f'keyless render: {path}#3 tenants/b spec.proxy.mode: unsupported value "Sidecar": must be one of ' \
           f'"Managed", "External", "Direct"' in lines, result.stderr
    assert not any(f"{path}#1" in line for line in lines)


def test_a_cel_rule_refusal_carries_the_rules_own_message(tmp_path):
    result = render("-f", "-", input=yaml.safe_dump(_cluster("a", server="http://proxy.a.example.com")))
    assert result.returncode == 1
    assert "stdin#1 tenants/a spec.server must start with https:// (tokens must never travel in clear text)." \
        in result.stderr, result.stderr


def test_a_file_without_a_remote_tenant_cluster_fails_with_a_clear_message(tmp_path):
    path = tmp_path / "other.yaml"
    path.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    result = render("-f", str(path))
    assert result.returncode == 1 and result.stdout == ""
    assert f"{path}: no RemoteTenantCluster in it" in result.stderr


def test_unreadable_input_fails_without_a_traceback(tmp_path):
    missing = render("-f", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 1 and "nope.yaml: cannot read it: No such file or directory" in missing.stderr
    broken = render("-f", "-", input="kind: [unclosed\n")
    assert broken.returncode == 1 and "stdin: not valid YAML at line" in broken.stderr, broken.stderr
    for result in (missing, broken):
        assert "Traceback" not in result.stderr and "Error" not in result.stderr


def test_a_manifest_without_namespace_is_an_error_unless_namespace_is_given():
    text = yaml.safe_dump(_cluster("a", namespace=None))
    result = render("-f", "-", input=text)
    assert result.returncode == 1 and result.stdout == ""
    assert "stdin#1 (no namespace)/a metadata.namespace: not set" in result.stderr and "--namespace" in result.stderr
    assert "keyless--" not in result.stdout + result.stderr
    given = render("-f", "-", "--namespace", "tenants", input=text)
    assert given.returncode == 0, given.stderr
    target = next(o for o in yaml.safe_load_all(given.stdout) if o["kind"] == "BrokerTarget")
    assert target["spec"]["audience"] == "keyless:tenants:a"


def test_the_tenancy_policy_is_checked_when_the_namespace_is_in_the_input():
    def namespace(labels):
        return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "tenants", "labels": labels}}

    of_b = render("-f", "-", input=yaml.safe_dump_all([namespace({"keyless.dev/tenant": "tenant-b"}), _cluster("a")]))
    assert of_b.returncode == 1
    assert "stdin#2 tenants/a admission policy keyless-remotetenantcluster-tenancy refuses it: spec.tenant must be " \
           "tenant-b, the tenant of namespace tenants" in of_b.stderr, of_b.stderr
    unlabelled = render("-f", "-", input=yaml.safe_dump_all([namespace({}), _cluster("a")]))
    assert unlabelled.returncode == 1 and "belongs to no tenant" in unlabelled.stderr
    owned = render("-f", "-", input=yaml.safe_dump_all([namespace({"keyless.dev/tenant": "tenant-a"}), _cluster("a")]))
    assert owned.returncode == 0 and "note:" not in owned.stderr, owned.stderr
    # Without the Namespace render cannot know its label, and says so.
    unknown = render("-f", "-", input=yaml.safe_dump(_cluster("a")))
    assert unknown.returncode == 0 and "namespace tenants is not in the input" in unknown.stderr


def test_output_is_readable_and_says_where_each_document_goes():
    result = render("-f", str(ROOT / "examples" / "tenant-a-dev-managed.yaml"))
    assert result.returncode == 0, result.stderr
    chunks = re.split(r"(?m)^---\n", result.stdout)[1:]
    assert chunks and all(c.startswith("# goes to ") for c in chunks)
    objects = list(yaml.safe_load_all(result.stdout))
    secret = objects[0]
    assert secret["kind"] == "Secret" and "data" not in secret
    config = json.loads(secret["stringData"]["config"])  # readable as is, no base64
    assert config["execProviderConfig"]["command"] == "cat"
    assert "(--only control-plane)" in chunks[0] and "(--only tenant)" in chunks[-1]


def test_only_selects_a_destination():
    path = str(ROOT / "examples" / "tenant-a-dev-managed.yaml")
    control = list(yaml.safe_load_all(render("-f", path, "--only", "control-plane").stdout))
    assert [o["kind"] for o in control] == ["Secret", "AppProject", "BrokerTarget"]
    tenant = list(yaml.safe_load_all(render("-f", path, "--only", "tenant").stdout))
    assert "Deployment" in [o["kind"] for o in tenant] and "BrokerTarget" not in [o["kind"] for o in tenant]
    both = list(yaml.safe_load_all(render("-f", path, "--only", "tenant", "--only", "control-plane").stdout))
    assert len(both) == len(control) + len(tenant)
    none = render("-f", path, "--only", "api-server-file")
    assert none.returncode == 0 and none.stdout == "" and "nothing for --only api-server-file" in none.stderr


def test_help_says_what_render_cannot_check():
    text = subprocess.run([KEYLESS, "render", "--help"], capture_output=True, text=True, timeout=60).stdout
    assert "oldSelf" in text and "--only" in text and "keyless.dev/tenant label" in text
