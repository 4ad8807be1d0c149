"""Proxy mode Managed against real API servers, without a node: the operator installs kube-oidc-proxy,
its trust and least-privilege RBAC on the tenant with the bootstrap credential, proves the chain,
deletes the bootstrap Secret, and keeps managing the tenant through the chain with its own tokens.

Here the tenant API server trusts the broker directly (structured authentication), standing in for
the proxy, and where a test needs the proxy Deployment ready it sets its status as the kubelet would:
this keeps the bootstrap and failure paths fast. The real kube-oidc-proxy, running as the Pods of
the rendered Deployment on a real node, is tested in test_managed_real_proxy.py.
"""
from __future__ import annotations

import base64
import json

import pytest
import yaml
from kubernetes import client as k
from kubernetes.client.rest import ApiException

from keyless.render.everything import ISSUED_AT_INSTALL
from keyless.render.tenant import TRUST_CHECKSUM_ANNOTATION, proxy_args

from .chain_fixtures import running_chain
from .conftest import api_client
from .helpers import eventually, kubectl, read_or_none
from .operator_fixtures import apply, assert_applied_as_rendered, live_object, render_as

pytestmark = pytest.mark.cluster

NAMESPACE = "tenants-managed"


def managed_manifest(chain, name: str, role: str = "cluster-admin", delete_after: bool = True,
                     secret: str = "tenant-bootstrap") -> dict:
    return {"apiVersion": "keyless.dev/v1alpha1", "kind": "RemoteTenantCluster",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"tenant": "tenant-managed", "server": chain.tenant.server,
                     "caData": base64.b64encode(chain.tenant.ca_pem).decode(),
                     "access": {"clusterRole": role},
                     "bootstrap": {"kubeconfigSecretRef": {"name": secret}, "deleteAfterInstall": delete_after}}}


def bootstrap_secret(api, name: str, kubeconfig_text: str, bootstrap_for: str | None = None) -> None:
    """The bootstrap Secret; `bootstrap_for` marks it as that manifest's, which deleteAfterInstall needs."""
    core = k.CoreV1Api(api)
    try:
        core.delete_namespaced_secret(name, NAMESPACE)
    except ApiException:
        pass
    annotations = {"keyless.dev/bootstrap-for": bootstrap_for} if bootstrap_for else None
    core.create_namespaced_secret(NAMESPACE, k.V1Secret(metadata=k.V1ObjectMeta(name=name, annotations=annotations),
                                                        string_data={"kubeconfig": kubeconfig_text}))


@pytest.fixture(scope="module")
def chain(control_plane, control_api, run_dir):
    with running_chain(control_plane, control_api, run_dir / "managed", NAMESPACE, f"keyless:{NAMESPACE}:managed",
                       "managed-tenant", "--deletion-give-up-seconds=6", "--tenant-api-timeout-seconds=3") as running:
        yield running


def bootstrap_exists(chain, name="tenant-bootstrap") -> bool:
    try:
        k.CoreV1Api(chain.control_api).read_namespaced_secret(name, NAMESPACE)
        return True
    except ApiException as e:
        assert e.status == 404
        return False


def test_missing_bootstrap_secret_is_reported_without_a_hang(chain):
    apply(chain.control, managed_manifest(chain, "nosecret", secret="does-not-exist", delete_after=False))
    condition = chain.wait("nosecret", "ProxyReady", "False", "BootstrapCredentialMissing")
    assert f"{NAMESPACE}/does-not-exist" in condition["message"]
    kubectl(chain.control, "delete", "rtc", "nosecret", "-n", NAMESPACE, "--wait=true", "--timeout=30s")


def test_unusable_bootstrap_kubeconfig_is_reported_without_echoing_it(chain):
    bootstrap_secret(chain.control_api, "garbage", "this is: [not a kubeconfig SENTINEL-9f3a")
    apply(chain.control, managed_manifest(chain, "garbage", secret="garbage", delete_after=False))
    condition = chain.wait("garbage", "ProxyReady", "False", "BootstrapCredentialInvalid")
    assert "SENTINEL-9f3a" not in json.dumps(chain.rtc("garbage")["status"])
    assert "SENTINEL-9f3a" not in chain.operator.log()
    assert "not a usable kubeconfig" in condition["message"]
    kubectl(chain.control, "delete", "rtc", "garbage", "-n", NAMESPACE, "--wait=true", "--timeout=30s")


def test_bootstrap_kubeconfig_pointing_at_the_operators_own_token_file_is_refused(chain):
    hostile = yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "clusters": [{"name": "c", "cluster": {"server": chain.tenant.server, "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": {"tokenFile": str(chain.workdir / "operator-token")}}]})
    bootstrap_secret(chain.control_api, "hostile", hostile)
    apply(chain.control, managed_manifest(chain, "hostile", secret="hostile", delete_after=False))
    condition = chain.wait("hostile", "ProxyReady", "False", "BootstrapCredentialInvalid")
    assert "tokenFile" in condition["message"] and "insecure-skip-tls-verify" in condition["message"]
    kubectl(chain.control, "delete", "rtc", "hostile", "-n", NAMESPACE, "--wait=true", "--timeout=30s")


def test_install_verify_then_bootstrap_deleted_and_role_change_reaches_tenant_through_the_chain(chain):
    bootstrap_secret(chain.control_api, "tenant-bootstrap", chain.tenant.kubeconfig.read_text(), bootstrap_for="managed")
    apply(chain.control, managed_manifest(chain, "managed"))
    tenant_api = api_client(chain.tenant)
    apps = k.AppsV1Api(tenant_api)

    deployment = eventually(lambda: read_or_none(apps.read_namespaced_deployment, "kube-oidc-proxy", "kube-oidc-proxy"),
                            timeout=60, message="proxy Deployment installed on the tenant")
    container = deployment.spec.template.spec.containers[0]
    assert container.args == proxy_args(chain.broker.issuer, f"keyless:{NAMESPACE}:managed")
    assert container.security_context.read_only_root_filesystem is True
    assert deployment.spec.template.metadata.annotations["keyless.dev/trust-checksum"]
    trust = k.CoreV1Api(tenant_api).read_namespaced_config_map("kube-oidc-proxy-issuer-ca", "kube-oidc-proxy")
    assert trust.data["ca.crt"] == chain.broker.ca_file.read_text()
    chain.wait("managed", "ProxyReady", "False", "ProxyNotReady")

    # Proven chain -> the bootstrap credential is deleted: no static credential remains.
    chain.wait("managed", "TokenVerified", "True", "Verified")
    eventually(lambda: not bootstrap_exists(chain), timeout=30, message="bootstrap Secret deleted")

    # Play the kubelet: report the proxy pods ready, as they would be on a real cluster.
    apps.patch_namespaced_deployment_status("kube-oidc-proxy", "kube-oidc-proxy",
                                            {"status": {"replicas": 2, "readyReplicas": 2, "availableReplicas": 2}})
    chain.wait("managed", "Ready", "True", "Reconciled")

    # A role change still reaches the tenant, now through the chain (no bootstrap Secret exists).
    kubectl(chain.tenant, "create", "clusterrole", "tenant-operator", "--verb=*", "--resource=*.*")
    manifest = managed_manifest(chain, "managed", role="tenant-operator")
    apply(chain.control, manifest)
    rbac = k.RbacAuthorizationV1Api(tenant_api)

    def role_changed():
        names = {b.metadata.name: b.role_ref.name for b in rbac.list_cluster_role_binding(
            label_selector="keyless.dev/cluster-name=managed").items}
        return names == {"keyless-proxy:kube-oidc-proxy:impersonate": "keyless-proxy:kube-oidc-proxy:impersonate",
                         "keyless-proxy:kube-oidc-proxy:access:tenant-operator": "tenant-operator"}

    eventually(role_changed, timeout=60, message="binding moved to the new role via the chain")
    assert not bootstrap_exists(chain)
    events = json.loads(kubectl(chain.control, "get", "events", "-n", NAMESPACE, "--field-selector",
                                "involvedObject.name=managed", "-o", "json").stdout)["items"]
    assert any("via the verified proxy path" in e["message"] for e in events)
    assert any("Deleted bootstrap Secret" in e["message"] for e in events)


def test_keyless_render_with_the_operators_flags_prints_every_object_it_applied_byte_for_byte(chain, tmp_path):
    """What `keyless render` prints with the operator's own settings flags is what the operator applied, on the
    control plane and on the tenant; only the certificates issued at install time are placeholders."""
    live = chain.rtc("managed")
    chain.wait("managed", "ProxyReady", "True")
    manifest = {"apiVersion": live["apiVersion"], "kind": live["kind"],
                "metadata": {"name": "managed", "namespace": NAMESPACE}, "spec": live["spec"]}
    rendered = render_as(chain.operator, [manifest], tmp_path)
    control_kinds = {"Secret", "AppProject", "BrokerTarget"}
    on_control_plane = [o for o in rendered[:3] if o["kind"] in control_kinds]
    tenant_side = rendered[len(on_control_plane):]
    assert len(on_control_plane) == 3 and {o["kind"] for o in tenant_side} >= {"Deployment", "ClusterRoleBinding"}
    # The serving certificate and the checksum that rolls the proxy on its change are issued at install time.
    tls = next(o for o in tenant_side if o["kind"] == "Secret")
    assert {base64.b64decode(v) for v in tls["data"].values()} == {ISSUED_AT_INSTALL}
    tls["data"] = live_object(chain.tenant, tls)["data"]
    deployment = next(o for o in tenant_side if o["kind"] == "Deployment")
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    annotations[TRUST_CHECKSUM_ANNOTATION] = live_object(chain.tenant, deployment)["spec"]["template"]["metadata"][
        "annotations"][TRUST_CHECKSUM_ANNOTATION]
    compared = assert_applied_as_rendered(rendered, lambda o: chain.control if o in on_control_plane else chain.tenant)
    assert compared == len(rendered) >= 12


def test_bootstrap_kubeconfig_and_issued_keys_never_appear_in_status_events_or_logs(chain):
    kubeconfig = yaml.safe_load(chain.tenant.kubeconfig.read_text())
    client_key = kubeconfig["users"][0]["user"]["client-key-data"]
    ca_secrets = k.CoreV1Api(chain.control_api).list_namespaced_secret(
        "keyless-system", label_selector="keyless.dev/cluster-namespace=tenants-managed").items
    issued_keys = [s.data[name] for s in ca_secrets for name in ("ca.key", "tls.key") if name in (s.data or {})]
    haystacks = {
        "status": json.dumps([o.get("status") for o in k.CustomObjectsApi(chain.control_api).list_namespaced_custom_object(
            "keyless.dev", "v1alpha1", NAMESPACE, "remotetenantclusters")["items"]]),
        "events": kubectl(chain.control, "get", "events", "-A", "-o", "json").stdout,
        "operator log": chain.operator.log(),
    }
    assert issued_keys, "the proxy CA Secret should exist while the manifest does"
    needles = [client_key, base64.b64decode(client_key).decode()] + issued_keys
    needles += [base64.b64decode(x).decode() for x in issued_keys]
    for where, text in haystacks.items():
        for needle in needles:
            assert needle.strip()[-40:] not in text, f"key material in {where}"


def test_deleting_a_manifest_of_a_dead_tenant_gives_up_with_an_event(chain):
    chain.wait("managed", "TokenVerified", "True")
    chain.tenant.stop_apiserver()
    try:
        kubectl(chain.control, "delete", "rtc", "managed", "-n", NAMESPACE, "--wait=true", "--timeout=60s")
    finally:
        chain.tenant.restart_apiserver()
    events = json.loads(kubectl(chain.control, "get", "events", "-n", NAMESPACE, "--field-selector",
                                "involvedObject.name=managed", "-o", "json").stdout)["items"]
    assert any(e["reason"] == "TenantCleanupAbandoned" for e in events)
    assert not read_or_none(k.CoreV1Api(chain.control_api).read_namespaced_secret, "keyless-tenants-managed-managed", "argocd")
