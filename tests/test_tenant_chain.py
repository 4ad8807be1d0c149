"""The whole chain end to end with real binaries: operator + broker on the control plane, and a
tenant API server that trusts the broker directly (proxy mode Direct, with the AuthenticationConfiguration
the operator rendered). kubectl, through the `keyless token` exec plugin, reaches it as the one identity.

kube-oidc-proxy itself cannot be built here (the Go module proxy refuses its module), so the
Managed-mode proxy is not run; the same verification code path proves External mode against the
same real verifier.
"""
from __future__ import annotations

import base64
import contextlib
import json
import subprocess
import time
import uuid

import pytest
import yaml
from kubernetes import client as k

from keyless.envtest import binaries, pki
from keyless.envtest.cluster import LocalCluster
from keyless.render.tenant import render_authentication_configuration

from .broker_fixtures import bound_caller_token, caller_pod, ensure_namespace, start_broker
from .helpers import eventually, kubectl
from .operator_fixtures import KEYLESS, OperatorProcess, apply, prepare_control_plane, remove_all_remote_tenant_clusters

pytestmark = pytest.mark.cluster

GROUP, VERSION, PLURAL = "keyless.dev", "v1alpha1", "remotetenantclusters"
NAMESPACE = "tenants-direct"
OPERATOR_SA = "system:serviceaccount:keyless-system:keyless-operator"
CONTROLLER_SA = "system:serviceaccount:argocd:argocd-application-controller"


class Chain:
    def __init__(self, control, control_api, broker, operator, tenant, workdir, namespace=NAMESPACE):
        self.control, self.control_api, self.broker = control, control_api, broker
        self.operator, self.tenant, self.workdir = operator, tenant, workdir
        self.namespace = namespace

    def rtc(self, name: str) -> dict:
        return k.CustomObjectsApi(self.control_api).get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name)

    def condition(self, name: str, kind: str) -> dict | None:
        for c in (self.rtc(name).get("status") or {}).get("conditions", []):
            if c["type"] == kind:
                return c
        return None

    def wait(self, name: str, kind: str, status: str, reason: str | None = None, timeout: float = 60):
        def check():
            c = self.condition(name, kind)
            assert c and c["status"] == status and (reason is None or c["reason"] == reason), c
            return c
        return eventually(check, timeout=timeout, interval=0.5, message=f"{name} {kind}={status} {reason or ''}")


def direct_manifest(name: str, server: str, ca_pem: bytes, role: str = "tenant-reader") -> dict:
    return {"apiVersion": "keyless.dev/v1alpha1", "kind": "RemoteTenantCluster",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"tenant": "tenant-direct", "server": server, "caData": base64.b64encode(ca_pem).decode(),
                     "access": {"clusterRole": role, "username": f"keyless:tenant-direct:{name}"},
                     "proxy": {"mode": "Direct"}}}


@contextlib.contextmanager
def running_chain(control_plane, control_api, workdir, namespace: str, audience: str, tenant_name: str,
                  *operator_args: str):
    """Broker + operator (with a Pod-bound token) on the control plane, and a tenant API server that
    trusts the broker for exactly `audience`, with the document the operator renders (same function)."""
    workdir.mkdir(exist_ok=True)
    prepare_control_plane(control_plane)
    ensure_namespace(control_api, namespace)
    ensure_namespace(control_api, "argocd")
    broker = start_broker(control_plane, "keyless-system", workdir / "broker", "--operator-identity", OPERATOR_SA)
    operator_pod = caller_pod(control_api, "keyless-system", "keyless-operator", f"keyless-operator-{uuid.uuid4().hex[:6]}")
    token_file = workdir / "operator-token"
    token_file.write_text(bound_caller_token(control_api, operator_pod, seconds=3600))
    document = render_authentication_configuration(broker.issuer, audience, broker.ca_file.read_bytes())
    tenant = LocalCluster(tenant_name, workdir / tenant_name, controller_manager=False, authentication_config=document)
    tenant.start()
    operator = OperatorProcess(control_plane, workdir / "operator", extra_args=[
        f"--broker-issuer={broker.issuer}", f"--broker-url={broker.url}", f"--broker-ca-file={broker.ca_file}",
        f"--broker-token-file={token_file}", "--verify-seconds=2", *operator_args]).start()
    try:
        yield Chain(control_plane, control_api, broker, operator, tenant, workdir, namespace)
    finally:
        remove_all_remote_tenant_clusters(control_plane)
        operator.stop()
        broker.stop()
        tenant.stop()


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
    time.sleep(3)
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
