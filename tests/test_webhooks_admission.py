"""The tenant guardrails end to end: the real kube-apiserver, with the real Argo CD CRDs, calls the
kopf webhook over TLS on loopback; tenant users are impersonated with kubectl --as/--as-group."""
from __future__ import annotations

import functools
import json
import os
import ssl
from pathlib import Path

import pytest

from keyless import pki
from keyless.envtest.cluster import LocalCluster, free_port
from keyless.webhooks import configuration, policy

from .conftest import ROOT, TESTDATA
from .guardrails_cases import (
    A_PROD, ADVERSARIAL, ALLOWED, AMBIGUOUS_DESTINATION, B_DEV, MUTATIONS, NAMESPACE_TENANTS, PLATFORM,
    REMOTE_TENANT_CLUSTERS, SCRATCH, USER_NAMESPACE, Case, application, application_set, remote_tenant_cluster,
)
from .guardrails_fixtures import apply_json, refusal_reason, serving_guardrails
from .helpers import eventually, install_crds, kubectl
from .operator_fixtures import remove_all_remote_tenant_clusters

pytestmark = pytest.mark.cluster

ARGOCD = "argocd"
TENANT = "keyless.dev/tenant"
GROUPS = {"alice": "tenant-a-devs", "bob": "tenant-b-devs", "carla": "tenant-c-devs", "carol": "platform-admins"}
APPLICATIONSET_CONTROLLER = "system:serviceaccount:argocd:argocd-applicationset-controller"


def as_user(cluster: LocalCluster, user: str, *args: str, manifest: dict | None = None, check: bool = False):
    identity = [f"--as={user}"] + ([f"--as-group={GROUPS[user]}"] if user in GROUPS else [])
    return kubectl(cluster, *identity, *args, input=json.dumps(manifest) if manifest else None, check=check)


def _group(name: str) -> dict:
    return {"kind": "Group", "name": name, "apiGroup": "rbac.authorization.k8s.io"}


def rbac_for_tenant_users() -> list[dict]:
    """Each tenant team may edit Applications in its own namespace (alice also in a namespace of no
    tenant); every team also in Argo CD's namespace, as a careless RBAC setup would allow: the
    guardrails must hold there anyway. The ApplicationSet controller everywhere."""
    role_ref = {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "test-argocd-app-editor"}
    grants = {namespace: [GROUPS[user]] for user, namespace in USER_NAMESPACE.items()}
    grants[SCRATCH] = [GROUPS["alice"]]
    grants[ARGOCD] = sorted(GROUPS[u] for u in USER_NAMESPACE)
    objects = [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "test-argocd-app-editor"},
         "rules": [{"apiGroups": ["argoproj.io"], "resources": ["applications", "applicationsets"],
                    "verbs": ["get", "list", "create", "update", "patch", "delete"]},
                   {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "create", "update"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "test-argocd-app-editor"}, "roleRef": role_ref,
         "subjects": [{"kind": "User", "name": APPLICATIONSET_CONTROLLER, "apiGroup": "rbac.authorization.k8s.io"},
                      _group(GROUPS["carol"])]},
    ]
    for namespace, groups in grants.items():
        objects.append({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                        "metadata": {"name": "test-argocd-app-editor", "namespace": namespace},
                        "roleRef": role_ref, "subjects": [_group(g) for g in groups]})
    return objects


def tenant_namespaces() -> list[dict]:
    """The tenants' namespaces (labelled by the admin), a namespace of no tenant, Argo CD's."""
    namespaces = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n, "labels": {TENANT: t}}}
                  for n, t in NAMESPACE_TENANTS.items()]
    return namespaces + [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}}
                         for n in (SCRATCH, ARGOCD, "keyless-system")]


@pytest.fixture(scope="module")
def guardrails(control_plane: LocalCluster, run_dir: Path):
    cluster = control_plane
    install_crds(cluster, ROOT / "crds" / "remotetenantclusters.keyless.dev.yaml",
                 *sorted((TESTDATA / "argocd-crds").glob("*.yaml")))
    apply_json(cluster, *tenant_namespaces())
    apply_json(cluster, *(_without_creation_time(r) for r in REMOTE_TENANT_CLUSTERS), *rbac_for_tenant_users())
    try:
        with serving_guardrails(cluster, run_dir / "webhooks") as running:
            yield running
    finally:
        remove_all_remote_tenant_clusters(cluster)


def _without_creation_time(manifest: dict) -> dict:
    """The API server sets creationTimestamp itself."""
    metadata = {k: v for k, v in manifest["metadata"].items() if k != "creationTimestamp"}
    return {**manifest, "metadata": metadata}


def submit(guardrails: Guardrails, case: Case):
    """Stores case.old as an admin (if any), then sends the manifest as the case's user."""
    if case.old is not None:
        kubectl(guardrails.cluster, "apply", "-f", "-", input=json.dumps(case.old))
        return as_user(guardrails.cluster, case.user, "replace", "-f", "-", manifest=case.manifest)
    return as_user(guardrails.cluster, case.user, "create", "-f", "-", manifest=case.manifest)


@pytest.mark.parametrize("case", ADVERSARIAL, ids=lambda c: c.name)
def test_api_server_refuses_adversarial_manifest(guardrails, case):
    result = submit(guardrails, case)
    assert refusal_reason(result) == case.reason, result.stderr


@pytest.mark.parametrize("case", ALLOWED, ids=lambda c: c.name)
def test_api_server_accepts_own_tenant_manifest(guardrails, case):
    result = submit(guardrails, case)
    assert result.returncode == 0, result.stderr


def test_refusal_reaches_the_user_with_what_is_allowed_instead(guardrails):
    case = Case("cross-tenant-message", application("cross-tenant-message", "tenant-a", {"server": B_DEV}))
    result = submit(guardrails, case)
    assert refusal_reason(result) == "CrossTenantDestination"
    assert "Tenant tenant-a may deploy to: a-dev (https://a-dev.tenant-a.example.com)" in result.stderr


@pytest.mark.parametrize("case,server", MUTATIONS, ids=lambda v: getattr(v, "name", ""))
def test_api_server_stores_destinationless_application_with_its_tenants_cluster(guardrails, case, server):
    result = submit(guardrails, case)
    assert result.returncode == 0, result.stderr
    stored = json.loads(kubectl(guardrails.cluster, "get", "application", "-n",
                                case.manifest["metadata"]["namespace"], case.name, "-o", "json").stdout)
    assert stored["spec"]["destination"] == {"namespace": "guestbook", "server": server}


def test_ambiguous_destinationless_application_is_refused_with_the_choices(guardrails):
    result = submit(guardrails, AMBIGUOUS_DESTINATION)
    assert refusal_reason(result) == "NoDestination"
    assert "a-dev" in result.stderr and "a-prod" in result.stderr


def test_admins_and_argocd_controllers_are_exempt_before_the_webhook_is_called(guardrails):
    cross_tenant = application("admin-cross-tenant", "tenant-a", {"server": B_DEV}, namespace=ARGOCD)
    assert as_user(guardrails.cluster, "carol", "create", "-f", "-", manifest=cross_tenant).returncode == 0
    generated = application("controller-generated", "tenant-b", {"server": B_DEV}, namespace="tenant-b")
    result = as_user(guardrails.cluster, APPLICATIONSET_CONTROLLER, "create", "-f", "-", manifest=generated)
    assert result.returncode == 0, result.stderr
    # The same manifest from a tenant user is refused: the exemption is the identity, not the object.
    tenant_try = application("tenant-cross-tenant", "tenant-a", {"server": B_DEV})
    assert refusal_reason(as_user(guardrails.cluster, "alice", "create", "-f", "-", manifest=tenant_try))
    # matchConditions kept the exempt requests away from the webhook entirely.
    log = guardrails.log_text()
    assert "tenant-cross-tenant" in log
    assert "admin-cross-tenant" not in log and "controller-generated" not in log


def test_unrelated_objects_never_reach_the_webhook_but_applications_in_any_namespace_do(guardrails):
    # Finding 5: an Application in a namespace Argo CD was not installed in is reviewed too.
    outside = application("outside-argocd-namespaces", "tenant-b", {"server": B_DEV}, namespace=SCRATCH)
    result = as_user(guardrails.cluster, "alice", "create", "-f", "-", manifest=outside)
    assert refusal_reason(result) == "TenantProjectOutsideTenantNamespace", result.stderr
    config_map = {"apiVersion": "v1", "kind": "ConfigMap",
                  "metadata": {"name": "unrelated-config", "namespace": "tenant-a"}, "data": {"server": B_DEV}}
    assert as_user(guardrails.cluster, "alice", "create", "-f", "-", manifest=config_map).returncode == 0
    # Control: an allowed Application from the same user is reviewed (and logged) as well.
    inside = application("inside-tenant-namespace", "tenant-a", {"server": A_PROD})
    assert as_user(guardrails.cluster, "alice", "create", "-f", "-", manifest=inside).returncode == 0
    log = guardrails.log_text()
    assert "inside-tenant-namespace" in log and "outside-argocd-namespaces" in log
    assert "unrelated-config" not in log


def test_new_remote_tenant_cluster_is_allowed_once_registered(guardrails):
    server = "https://b-prod.tenant-b.example.com"
    app = application("b-prod-app", "tenant-b", {"server": server}, namespace="tenant-b")
    assert refusal_reason(as_user(guardrails.cluster, "bob", "create", "-f", "-", manifest=app)) == \
        "UnregisteredDestination"
    apply_json(guardrails.cluster, _without_creation_time(
        remote_tenant_cluster("b-prod", "tenant-b", server, {"environment": "production"})))
    eventually(lambda: as_user(guardrails.cluster, "bob", "create", "-f", "-", manifest=app).returncode == 0,
               timeout=30, message="Application on the newly registered cluster accepted")


def test_serving_certificate_is_reloaded_without_restart(guardrails):
    second = json.loads((guardrails.dir / "second-ca.json").read_text())
    from keyless.pki import KeyPair

    renewed = pki.issue_certificate(KeyPair(second["cert"].encode(), second["key"].encode()),
                                    "keyless-webhooks", server=True, ip_addresses=("127.0.0.1",))
    before = guardrails.served_certificate()
    # Like a Secret volume update: both files change, each replaced atomically.
    for name, content in (("tls.key", renewed.key_pem), ("tls.crt", renewed.cert_pem)):
        staged = guardrails.dir / f".{name}.new"
        staged.write_bytes(content)
        os.replace(staged, guardrails.dir / name)
    expected = ssl.PEM_cert_to_DER_cert(renewed.cert_pem.decode())
    eventually(lambda: guardrails.served_certificate() == expected, timeout=30,
               message="webhook serving the renewed certificate")
    assert before != expected
    # The API server still reaches the webhook, now over the renewed certificate.
    case = Case("after-reload", application_set("after-reload", [{"clusters": {"selector": {}}}]),
                "ClusterGeneratorNotPinned")
    assert refusal_reason(submit(guardrails, case)) == case.reason
    assert "Reloaded the webhook serving certificate" in guardrails.log_text()


def test_unreachable_webhook_refuses_tenants_but_never_blocks_admins_or_argocd(guardrails):
    """The failurePolicy choice, proven: the same rendered configurations pointed at a dead port."""
    cluster, outage_namespace = guardrails.cluster, "argocd-outage"
    kubectl(cluster, "create", "namespace", outage_namespace, check=False)
    dead = functools.partial(configuration.url_client_config, f"https://127.0.0.1:{free_port()}",
                             guardrails.dir.joinpath("tls.crt").read_bytes())
    exemptions = policy.Exemptions.build(admin_groups=["system:masters", "platform-admins"])
    name = "keyless-guardrails-outage"
    apply_json(cluster,
               configuration.render_validating_webhook_configuration(
                   dead, exemptions=exemptions, application_namespaces=[outage_namespace], name=name),
               configuration.render_mutating_webhook_configuration(
                   dead, application_namespaces=[outage_namespace], name=name))
    try:
        def in_outage(app: dict) -> dict:
            app["metadata"]["namespace"] = outage_namespace
            return app

        # A request the reachable guardrails allow (no tenant's project or cluster), so the refusal
        # can only come from the unreachable webhook.
        kubectl(cluster, "create", "rolebinding", "outage-editor", "-n", outage_namespace,
                "--clusterrole=test-argocd-app-editor", f"--group={GROUPS['alice']}", check=False)
        tenant = as_user(cluster, "alice", "create", "-f", "-",
                         manifest=in_outage(application("outage-tenant", "default", {"server": PLATFORM})))
        assert tenant.returncode != 0 and "failed calling webhook" in tenant.stderr
        admin = as_user(cluster, "carol", "create", "-f", "-",
                        manifest=in_outage(application("outage-admin", "tenant-a", {"server": A_PROD})))
        assert admin.returncode == 0, admin.stderr
        controller = as_user(cluster, APPLICATIONSET_CONTROLLER, "create", "-f", "-",
                             manifest=in_outage(application("outage-controller", "tenant-b", {"server": B_DEV})))
        assert controller.returncode == 0, controller.stderr
        # Mutation failing is ignored: an admin's destination-less Application is stored unchanged.
        bare = as_user(cluster, "carol", "create", "-f", "-",
                       manifest=in_outage(application("outage-bare", "tenant-b", {"namespace": "x"})))
        assert bare.returncode == 0, bare.stderr
    finally:
        kubectl(cluster, "delete", "validatingwebhookconfiguration,mutatingwebhookconfiguration", name,
                "--ignore-not-found", check=False)
