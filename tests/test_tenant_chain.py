"""The whole chain end to end with real binaries: operator + broker on the control plane, and a
tenant API server that trusts the broker directly (proxy mode Direct, with the AuthenticationConfiguration
the operator rendered). kubectl, through the `keyless token` exec plugin, reaches it as the one identity.

Managed mode with the real kube-oidc-proxy on a real node is tested in test_managed_real_proxy.py;
the same verification code path proves External mode against the same real verifier here.
"""
from __future__ import annotations

import base64
import json
import subprocess
import uuid

import pytest
import yaml
from kubernetes import client as k

from keyless import pki
from keyless.envtest import binaries

from .broker_fixtures import bound_caller_token, caller_pod
from .chain_fixtures import GROUP, PLURAL, VERSION, running_chain
from .helpers import kubectl
from .operator_fixtures import KEYLESS, apply

pytestmark = pytest.mark.cluster

NAMESPACE = "tenants-direct"


def direct_manifest(name: str, server: str, ca_pem: bytes, role: str = "tenant-reader") -> dict:
    return {"apiVersion": "keyless.dev/v1alpha1", "kind": "RemoteTenantCluster",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"tenant": "tenant-direct", "server": server, "caData": base64.b64encode(ca_pem).decode(),
                     "access": {"clusterRole": role, "username": f"keyless:tenant-direct:{name}"},
                     "proxy": {"mode": "Direct"}}}


@pytest.fixture(scope="module")
def chain(control_plane, control_api, run_dir):
    with running_chain(control_plane, control_api, run_dir / "chain", NAMESPACE, f"keyless:{NAMESPACE}:direct",
                       "direct-tenant") as running:
        yield running


def test_direct_mode_chain_is_verified_and_ready(chain):
    apply(chain.control, direct_manifest("direct", chain.tenant.server, chain.tenant.ca_pem))
    chain.wait("direct", "ProxyReady", "True", "DirectMode")
    # The tenant API server starts knowing nobody: bind the identity the way the admin would.
    # (Built-in aggregated roles such as `view` stay empty without the aggregation controller here.)
    kubectl(chain.tenant, "create", "clusterrole", "tenant-reader", "--verb=get,list", "--resource=configmaps")
    kubectl(chain.tenant, "create", "clusterrolebinding", "keyless-direct-reader", "--clusterrole=tenant-reader",
            "--user=keyless:tenant-direct:direct")
    chain.wait("direct", "TokenVerified", "True", "Verified")
    chain.wait("direct", "Ready", "True", "Reconciled")
    status = chain.rtc("direct")["status"]
    rendered = yaml.safe_load(status["authenticationConfiguration"])
    assert rendered["kind"] == "AuthenticationConfiguration"
    assert rendered["jwt"][0]["issuer"]["audiences"] == [f"keyless:{NAMESPACE}:direct"]
    assert rendered["jwt"][0]["issuer"]["url"] == chain.broker.issuer


def _exec_kubeconfig(chain, path, target: str, token_file, server: str | None = None):
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "t",
        "clusters": [{"name": "t", "cluster": {"server": server or chain.tenant.server,
                                               "certificate-authority-data": base64.b64encode(chain.tenant.ca_pem).decode()}}],
        "users": [{"name": "u", "user": {"exec": {
            "apiVersion": "client.authentication.k8s.io/v1", "command": str(KEYLESS), "interactiveMode": "Never",
            "args": ["token", "--broker-url", chain.broker.url, "--target", target,
                     "--broker-ca-file", str(chain.broker.ca_file), "--token-file", str(token_file)]}}}],
        "contexts": [{"name": "t", "context": {"cluster": "t", "user": "u"}}],
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_kubectl_with_keyless_token_reaches_the_tenant_as_the_one_identity(chain):
    chain.wait("direct", "TokenVerified", "True", "Verified")
    pod = caller_pod(chain.control_api, "argocd", "argocd-application-controller",
                     f"argocd-application-controller-{uuid.uuid4().hex[:6]}")
    token_file = chain.workdir / "controller-token"
    token_file.write_text(bound_caller_token(chain.control_api, pod))
    kubeconfig = _exec_kubeconfig(chain, chain.workdir / "exec-kubeconfig", f"{NAMESPACE}.direct", token_file)
    kubectl_bin = str(binaries.find("kubectl"))
    who = subprocess.run([kubectl_bin, f"--kubeconfig={kubeconfig}", "auth", "whoami", "-o", "json"],
                         capture_output=True, text=True, timeout=60)
    assert who.returncode == 0, who.stderr
    assert json.loads(who.stdout)["status"]["userInfo"]["username"] == "keyless:tenant-direct:direct"
    # The identity may read (view) but not impersonate anyone else.
    listed = subprocess.run([kubectl_bin, f"--kubeconfig={kubeconfig}", "get", "configmaps", "-A"],
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    impersonating = subprocess.run([kubectl_bin, f"--kubeconfig={kubeconfig}", "--as=system:admin", "get", "ns"],
                                   capture_output=True, text=True, timeout=60)
    assert impersonating.returncode != 0 and "impersonate" in impersonating.stderr
    secrets = subprocess.run([kubectl_bin, f"--kubeconfig={kubeconfig}", "get", "secrets", "-A"],
                             capture_output=True, text=True, timeout=60)
    assert secrets.returncode != 0 and "forbidden" in secrets.stderr.lower()


def test_token_for_another_cluster_is_refused_by_this_tenant(chain):
    # Same API server reached under another name: a different target, hence a different audience.
    other_server = chain.tenant.server.replace("127.0.0.1", "localhost")
    apply(chain.control, direct_manifest("other", other_server, chain.tenant.ca_pem))
    condition = chain.wait("other", "TokenVerified", "False", "TokenRejected")
    assert f"keyless:{NAMESPACE}:other" in condition["message"]
    events = kubectl(chain.control, "get", "events", "-n", NAMESPACE, "--field-selector",
                     "involvedObject.name=other", "-o", "json").stdout
    assert any(e["reason"] == "TokenRejected" for e in json.loads(events)["items"])
    kubectl(chain.control, "delete", "rtc", "other", "-n", NAMESPACE, "--wait=true", "--timeout=30s")


def test_wrong_ca_is_reported_as_ca_mismatch(chain):
    wrong_ca, _ = pki.new_ca("not-the-tenant-ca")
    other_server = chain.tenant.server.replace("127.0.0.1", "localhost")
    apply(chain.control, direct_manifest("wrongca", other_server, wrong_ca.cert_pem))
    chain.wait("wrongca", "TokenVerified", "False", "CAMismatch")
    assert chain.condition("wrongca", "Ready")["status"] == "False"
    kubectl(chain.control, "delete", "rtc", "wrongca", "-n", NAMESPACE, "--wait=true", "--timeout=30s")


def test_tenant_api_down_is_reported_and_recovers_by_itself(chain):
    chain.wait("direct", "Ready", "True")
    chain.tenant.stop_apiserver()
    try:
        condition = chain.wait("direct", "TokenVerified", "False", "TenantUnreachable", timeout=60)
        assert chain.tenant.server in condition["message"]
        assert chain.condition("direct", "Ready")["reason"] == "TenantUnreachable"
    finally:
        chain.tenant.restart_apiserver()
    chain.wait("direct", "Ready", "True", "Reconciled", timeout=90)


def test_no_secret_material_in_status_events_or_logs(chain):
    pod = caller_pod(chain.control_api, "argocd", "argocd-application-controller",
                     f"argocd-application-controller-{uuid.uuid4().hex[:6]}")
    token = bound_caller_token(chain.control_api, pod)
    minted = chain.broker.mint(f"{NAMESPACE}.direct", token).json()["token"]
    operator_token = (chain.workdir / "operator-token").read_text().strip()
    broker_key_material = [v for v in k.CoreV1Api(chain.control_api).list_namespaced_secret("keyless-system").items
                           for v in (v.data or {}).values()]
    chain.operator.wait_for_resyncs(2)  # the operator reconciled (and verified) with all of it around
    haystacks = {
        "status": json.dumps([o.get("status") for o in k.CustomObjectsApi(chain.control_api).list_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, PLURAL)["items"]]),
        "events": kubectl(chain.control, "get", "events", "-A", "-o", "json").stdout,
        "operator log": chain.operator.log(),
        "broker log": chain.broker.log_text(),
    }
    secrets = {"caller token": token, "operator token": operator_token, "minted token": minted}
    for i, value in enumerate(broker_key_material):
        secrets[f"broker key secret value {i}"] = value
        secrets[f"broker key secret value {i} decoded"] = base64.b64decode(value).decode(errors="replace")
    for where, text in haystacks.items():
        for what, value in secrets.items():
            # Compare on a long distinctive slice so short common substrings cannot collide.
            needle = value.strip()[-40:] if len(value.strip()) > 40 else value.strip()
            assert needle and needle not in text, f"{what} appears in {where}"
