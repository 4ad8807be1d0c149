"""The tenant guardrails end to end: the real kube-apiserver, with the real Argo CD CRDs, calls the
kopf webhook over TLS on loopback; tenant users are impersonated with kubectl --as/--as-group."""
from __future__ import annotations

import functools
import json
import os
import socket
import ssl
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from keyless.envtest import pki
from keyless.envtest.cluster import LocalCluster, free_port, start_process, stop_process
from keyless.webhooks import configuration, policy

from .conftest import ROOT, TESTDATA
from .helpers import eventually, install_crds, kubectl
from .operator_fixtures import remove_all_remote_tenant_clusters
from .test_webhooks_policy import (
    A_PROD, ADVERSARIAL, ALLOWED, AMBIGUOUS_DESTINATION, B_DEV, MUTATIONS, REMOTE_TENANT_CLUSTERS, Case,
    application, application_set, remote_tenant_cluster,
)

pytestmark = pytest.mark.cluster

ARGOCD = "argocd"
GROUPS = {"alice": "tenant-a-devs", "bob": "tenant-b-devs", "carla": "tenant-c-devs", "carol": "platform-admins"}
APPLICATIONSET_CONTROLLER = "system:serviceaccount:argocd:argocd-applicationset-controller"


@dataclass
class Guardrails:
    cluster: LocalCluster
    port: int
    dir: Path
    log: Path

    def served_certificate(self) -> bytes:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as raw:
            with context.wrap_socket(raw) as tls:
                return tls.getpeercert(binary_form=True)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def as_user(cluster: LocalCluster, user: str, *args: str, manifest: dict | None = None, check: bool = False):
    identity = [f"--as={user}"] + ([f"--as-group={GROUPS[user]}"] if user in GROUPS else [])
    return kubectl(cluster, *identity, *args, input=json.dumps(manifest) if manifest else None, check=check)


def rbac_for_tenant_users() -> list[dict]:
    subjects = [{"kind": "Group", "name": g, "apiGroup": "rbac.authorization.k8s.io"} for g in GROUPS.values()]
    subjects.append({"kind": "User", "name": APPLICATIONSET_CONTROLLER, "apiGroup": "rbac.authorization.k8s.io"})
    return [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "test-argocd-app-editor"},
         "rules": [{"apiGroups": ["argoproj.io"], "resources": ["applications", "applicationsets"],
                    "verbs": ["get", "list", "create", "update", "patch", "delete"]},
                   {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "create", "update"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "test-argocd-app-editor"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "test-argocd-app-editor"},
         "subjects": subjects},
    ]


def apply_json(cluster: LocalCluster, *objects: dict) -> None:
    kubectl(cluster, "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)}))


@pytest.fixture(scope="module")
def guardrails(control_plane: LocalCluster, run_dir: Path):
    cluster = control_plane
    install_crds(cluster, ROOT / "crds" / "remotetenantclusters.keyless.dev.yaml",
                 *sorted((TESTDATA / "argocd-crds").glob("*.yaml")))
    for namespace in (ARGOCD, "keyless-system"):
        kubectl(cluster, "create", "namespace", namespace, check=False)
    apply_json(cluster, *REMOTE_TENANT_CLUSTERS, *rbac_for_tenant_users())

    # Two CAs: the API server trusts both, so the serving certificate can later move to the second.
    directory = run_dir / "webhooks"
    directory.mkdir(exist_ok=True)
    first_ca, _ = pki.new_ca("guardrails-test-ca-1")
    second_ca, _ = pki.new_ca("guardrails-test-ca-2")
    serving = pki.issue_certificate(first_ca, "keyless-webhooks", server=True, ip_addresses=("127.0.0.1",))
    (directory / "tls.crt").write_bytes(serving.cert_pem)
    (directory / "tls.key").write_bytes(serving.key_pem)
    (directory / "second-ca.json").write_text(json.dumps({"cert": second_ca.cert_pem.decode(),
                                                          "key": second_ca.key_pem.decode()}))
    (directory / "second-ca.json").chmod(0o600)

    port = free_port()
    log = directory / "webhooks.log"
    process = start_process(
        [sys.executable, "-m", "keyless.webhooks", f"--kubeconfig={cluster.kubeconfig}",
         f"--listen=127.0.0.1:{port}", f"--tls-cert-file={directory / 'tls.crt'}",
         f"--tls-key-file={directory / 'tls.key'}", "--cert-check-interval=0.3",
         "--admin-group=system:masters", "--admin-group=platform-admins", "--verbose"],
        log, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    ready_context = ssl.create_default_context(cadata=first_ca.cert_pem.decode())

    def ready() -> bool:
        if process.poll() is not None:  # not an AssertionError: eventually() must stop polling
            raise RuntimeError(f"webhook process exited:\n{log.read_text()[-3000:]}")
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/readyz", context=ready_context, timeout=2) as r:
            return r.status == 200

    exemptions = policy.Exemptions.build(admin_groups=["system:masters", "platform-admins"])
    client_config = functools.partial(configuration.url_client_config, f"https://127.0.0.1:{port}",
                                      first_ca.cert_pem + second_ca.cert_pem)
    try:
        eventually(lambda: _quietly(ready), timeout=90, message="webhook /readyz")
        apply_json(cluster,
                   configuration.render_validating_webhook_configuration(client_config, exemptions=exemptions),
                   configuration.render_mutating_webhook_configuration(client_config))
        yield Guardrails(cluster, port, directory, log)
    finally:
        kubectl(cluster, "delete", "validatingwebhookconfiguration,mutatingwebhookconfiguration",
                configuration.DEFAULT_NAME, "--ignore-not-found", check=False)
        stop_process(process)
        remove_all_remote_tenant_clusters(cluster)


def _quietly(check):
    try:
        return check()
    except (OSError, ssl.SSLError):
        return False


def refusal_reason(result) -> str | None:
    """The guardrail reason from a kubectl error, or None when the request went through."""
    if result.returncode == 0:
        return None
    marker = "denied the request: "
    assert marker in result.stderr, result.stderr
    return result.stderr.split(marker, 1)[1].split(":", 1)[0]


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
    stored = json.loads(kubectl(guardrails.cluster, "get", "application", "-n", ARGOCD, case.name, "-o", "json").stdout)
    assert stored["spec"]["destination"] == {"namespace": "guestbook", "server": server}


def test_ambiguous_destinationless_application_is_refused_with_the_choices(guardrails):
    result = submit(guardrails, AMBIGUOUS_DESTINATION)
    assert refusal_reason(result) == "NoDestination"
    assert "a-dev" in result.stderr and "a-prod" in result.stderr


def test_admins_and_argocd_controllers_are_exempt_before_the_webhook_is_called(guardrails):
    cross_tenant = application("admin-cross-tenant", "tenant-a", {"server": B_DEV})
    assert as_user(guardrails.cluster, "carol", "create", "-f", "-", manifest=cross_tenant).returncode == 0
    generated = application("controller-generated", "tenant-b", {"server": B_DEV})
    result = as_user(guardrails.cluster, APPLICATIONSET_CONTROLLER, "create", "-f", "-", manifest=generated)
    assert result.returncode == 0, result.stderr
    # The same manifest from a tenant user is refused: the exemption is the identity, not the object.
    tenant_try = application("tenant-cross-tenant", "tenant-a", {"server": B_DEV})
    assert refusal_reason(as_user(guardrails.cluster, "alice", "create", "-f", "-", manifest=tenant_try))
    # matchConditions kept the exempt requests away from the webhook entirely.
    log = guardrails.log_text()
    assert "tenant-cross-tenant" in log
    assert "admin-cross-tenant" not in log and "controller-generated" not in log


def test_unrelated_objects_never_reach_the_webhook(guardrails, namespace):
    # An Application outside the Argo CD namespaces, and a ConfigMap inside one.
    outside = application("outside-argocd-namespaces", "tenant-a", {"server": B_DEV})
    outside["metadata"]["namespace"] = namespace
    assert as_user(guardrails.cluster, "alice", "create", "-f", "-", manifest=outside).returncode == 0
    config_map = {"apiVersion": "v1", "kind": "ConfigMap",
                  "metadata": {"name": "unrelated-config", "namespace": ARGOCD}, "data": {"server": B_DEV}}
    assert as_user(guardrails.cluster, "alice", "create", "-f", "-", manifest=config_map).returncode == 0
    # Control: an in-scope Application from the same user is reviewed (and logged).
    inside = application("inside-argocd-namespace", "tenant-a", {"server": A_PROD})
    assert as_user(guardrails.cluster, "alice", "create", "-f", "-", manifest=inside).returncode == 0
    log = guardrails.log_text()
    assert "inside-argocd-namespace" in log
    assert "outside-argocd-namespaces" not in log and "unrelated-config" not in log


def test_new_remote_tenant_cluster_is_allowed_once_registered(guardrails):
    server = "https://b-prod.tenant-b.example.com"
    app = application("b-prod-app", "tenant-b", {"server": server})
    assert refusal_reason(as_user(guardrails.cluster, "bob", "create", "-f", "-", manifest=app)) == \
        "UnregisteredDestination"
    apply_json(guardrails.cluster, remote_tenant_cluster("b-prod", "tenant-b", server, {"environment": "production"}))
    eventually(lambda: as_user(guardrails.cluster, "bob", "create", "-f", "-", manifest=app).returncode == 0,
               timeout=30, message="Application on the newly registered cluster accepted")


def test_serving_certificate_is_reloaded_without_restart(guardrails):
    second = json.loads((guardrails.dir / "second-ca.json").read_text())
    from keyless.envtest.pki import KeyPair

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

        tenant = as_user(cluster, "alice", "create", "-f", "-",
                         manifest=in_outage(application("outage-tenant", "tenant-a", {"server": A_PROD})))
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
