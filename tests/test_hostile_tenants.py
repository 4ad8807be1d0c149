"""A hostile tenant against the real parts: the CRD and the tenancy admission policies on a real
kube-apiserver, the guardrail webhooks served over TLS, the operator and the broker as processes.

mallory (tenant-ha) may write RemoteTenantClusters, Secrets, Applications and ApplicationSets in her
own namespaces (and, by a careless grant, Applications in Argo CD's namespace); victor (tenant-hb) is
the victim. Every attempt below is refused with a message that says what to do instead, and victor's
objects are left exactly as they were (same resourceVersions).
"""
from __future__ import annotations

import base64
import json
import socket
import ssl
import threading
import uuid

import pytest
from kubernetes import client as k

from keyless import pki

from .broker_fixtures import apply_broker_target, bound_caller_token, caller_pod, start_broker, start_verifiers
from .chain_fixtures import running_chain
from .conftest import ROOT
from .guardrails_fixtures import apply_json, refusal_reason, serving_guardrails
from .helpers import eventually, kubectl, read_or_none

pytestmark = pytest.mark.cluster

NS_A, NS_A2, NS_B, NS_FREE = "hostile-a", "hostile-a2", "hostile-b", "hostile-free"
TENANT_A, TENANT_B, TENANT_C = "tenant-ha", "tenant-hb", "tenant-hc"
USERS = {"mallory": "tenant-ha-devs", "victor": "tenant-hb-devs", "root": "platform-admins"}
B_SERVER = "https://b-dev.hostile.example.com"
CA = base64.b64encode(pki.new_ca("hostile-tenant-ca")[0].cert_pem).decode()
REPO = "https://git.example.com/apps.git"
GROUP, VERSION, PLURAL = "keyless.dev", "v1alpha1", "remotetenantclusters"
CONTROLLER_SA = "argocd-application-controller"


# ---- manifests ----------------------------------------------------------------------------------------
def rtc(name: str, namespace: str, tenant: str = TENANT_A, server: str | None = None, **spec) -> dict:
    body = {"tenant": tenant, "server": server or f"https://{name}.{namespace}.example.com", "caData": CA,
            "access": {"clusterRole": "cluster-admin"}, "proxy": {"mode": "External"}}
    for key, value in spec.items():
        body[key] = value
    return {"apiVersion": "keyless.dev/v1alpha1", "kind": "RemoteTenantCluster",
            "metadata": {"name": name, "namespace": namespace}, "spec": body}


def application(name: str, namespace: str, project: str, destination: dict) -> dict:
    return {"apiVersion": "argoproj.io/v1alpha1", "kind": "Application",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"project": project, "destination": {"namespace": "apps", **destination},
                     "source": {"repoURL": REPO, "path": "guestbook", "targetRevision": "HEAD"}}}


def application_set(name: str, namespace: str, generators: list, project: str = TENANT_A,
                    destination: dict | None = None, metadata: dict | None = None, **spec) -> dict:
    return {"apiVersion": "argoproj.io/v1alpha1", "kind": "ApplicationSet",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"generators": generators, **spec, "template": {
                "metadata": {"name": "{{name}}-guestbook", **(metadata or {})},
                "spec": {"project": project, "destination": {"namespace": "apps",
                                                             **(destination or {"server": "{{server}}"})},
                         "source": {"repoURL": REPO, "path": "guestbook", "targetRevision": "HEAD"}}}}}


def pinned(tenant: str = TENANT_A) -> dict:
    return {"clusters": {"selector": {"matchLabels": {"keyless.dev/tenant": tenant}}}}


def rbac() -> list[dict]:
    """mallory and victor edit their own namespaces' objects, never Namespaces, never others' objects;
    mallory may also write Applications in Argo CD's namespace and patch her namespace (both careless
    grants an admin might make: the guardrails and the label policy hold anyway). root is an admin."""
    editor = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
              "metadata": {"name": "hostile-tenant-editor"},
              "rules": [{"apiGroups": ["keyless.dev"], "resources": ["remotetenantclusters"],
                         "verbs": ["get", "list", "create", "update", "patch", "delete"]},
                        {"apiGroups": ["argoproj.io"], "resources": ["applications", "applicationsets"],
                         "verbs": ["get", "list", "create", "update", "patch", "delete"]},
                        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "create"]}]}
    relabel = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
               "metadata": {"name": "hostile-namespace-patcher"},
               "rules": [{"apiGroups": [""], "resources": ["namespaces"], "resourceNames": [NS_A],
                          "verbs": ["get", "patch", "update"]}]}

    def binding(name: str, namespace: str | None, role: str, group: str) -> dict:
        meta = {"name": name, **({"namespace": namespace} if namespace else {})}
        return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding" if namespace else "ClusterRoleBinding",
                "metadata": meta, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                "subjects": [{"kind": "Group", "name": group, "apiGroup": "rbac.authorization.k8s.io"}]}

    objects = [editor, relabel,
               binding("hostile-namespace-patcher", None, "hostile-namespace-patcher", USERS["mallory"]),
               binding("hostile-admins", None, "cluster-admin", USERS["root"])]
    for namespace in (NS_A, NS_A2, NS_FREE, "argocd"):
        objects.append(binding("hostile-mallory", namespace, "hostile-tenant-editor", USERS["mallory"]))
    objects.append(binding("hostile-victor", NS_B, "hostile-tenant-editor", USERS["victor"]))
    return objects


def namespaces() -> list[dict]:
    labelled = {NS_A: TENANT_A, NS_A2: TENANT_A, NS_B: TENANT_B}
    return [{"apiVersion": "v1", "kind": "Namespace",
             "metadata": {"name": n, **({"labels": {"keyless.dev/tenant": labelled[n]}} if n in labelled else {})}}
            for n in (NS_A, NS_A2, NS_B, NS_FREE)]


# ---- the world --------------------------------------------------------------------------------------------
class World:
    def __init__(self, chain, guardrails):
        self.chain, self.guardrails = chain, guardrails
        self.cluster, self.api = chain.control, chain.control_api

    def as_user(self, user: str, *args: str, manifest: dict | None = None):
        return kubectl(self.cluster, f"--as={user}", f"--as-group={USERS[user]}", *args,
                       input=json.dumps(manifest) if manifest else None, check=False)

    def create(self, user: str, manifest: dict):
        return self.as_user(user, "create", "-f", "-", manifest=manifest)

    def rtc(self, namespace: str, name: str) -> dict | None:
        return read_or_none(k.CustomObjectsApi(self.api).get_namespaced_custom_object, GROUP, VERSION, namespace,
                            PLURAL, name)

    def condition(self, namespace: str, name: str, kind: str) -> dict:
        obj = self.rtc(namespace, name) or {}
        return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == kind), {})

    def wait(self, namespace: str, name: str, kind: str, status: str, reason: str | None = None) -> dict:
        def check():
            c = self.condition(namespace, name, kind)
            assert c.get("status") == status and (reason is None or c.get("reason") == reason), c
            return c
        return eventually(check, timeout=60, interval=0.5, message=f"{namespace}/{name} {kind}={status} {reason}")

    def argocd_secret(self, namespace: str, name: str):
        return read_or_none(k.CoreV1Api(self.api).read_namespaced_secret, f"keyless-{namespace}-{name}", "argocd")

    def broker_target(self, namespace: str, name: str):
        return read_or_none(k.CustomObjectsApi(self.api).get_namespaced_custom_object, "keyless.dev", "v1alpha1",
                          "keyless-system", "brokertargets", f"{namespace}.{name}")

    def app_project(self, name: str) -> dict | None:
        return read_or_none(k.CustomObjectsApi(self.api).get_namespaced_custom_object, "argoproj.io", "v1alpha1",
                          "argocd", "appprojects", name)

    def tenant_secrets(self, tenant: str) -> list[str]:
        return sorted(s.metadata.name for s in k.CoreV1Api(self.api).list_namespaced_secret(
            "argocd", label_selector=f"keyless.dev/tenant={tenant}").items)

    def victim_state(self) -> dict:
        """resourceVersions of everything of victor's a hostile request could touch (its manifest: spec and
        condition states)."""
        custom = k.CustomObjectsApi(self.api)

        def version(obj) -> str | None:
            if obj is None:
                return None
            return obj.metadata.resource_version if hasattr(obj, "metadata") else obj["metadata"]["resourceVersion"]

        def manifest(obj) -> tuple | None:
            # Its spec (generation) and where each condition stands; not its resourceVersion: the operator
            # rewrites the status when a failing check's message changes (e.g. a DNS error's wording under
            # load), which is not something a hostile request did.
            if obj is None:
                return None
            return (obj["metadata"]["generation"],
                    tuple((x["type"], x["status"], x["reason"]) for x in (obj.get("status") or {}).get("conditions", [])))

        return {
            "rtc": manifest(self.rtc(NS_B, "b-dev")),
            "argocd secret": version(self.argocd_secret(NS_B, "b-dev")),
            "broker target": version(self.broker_target(NS_B, "b-dev")),
            "app project": version(self.app_project(TENANT_B)),
            "application": version(custom.get_namespaced_custom_object("argoproj.io", "v1alpha1", NS_B,
                                                                       "applications", "b-app")),
            "central application": version(custom.get_namespaced_custom_object("argoproj.io", "v1alpha1", "argocd",
                                                                               "applications", "b-central")),
            "application set": version(custom.get_namespaced_custom_object("argoproj.io", "v1alpha1", NS_B,
                                                                           "applicationsets", "b-set")),
        }

    def without_tenancy_policy(self):
        """The admission policy switched off (as on a cluster without it), restored on exit."""
        world = self

        def enforced() -> bool:
            # A server-side dry run of a manifest only the policy refuses (its namespace has no tenant).
            probe = json.dumps(rtc("policy-probe", NS_FREE))
            return kubectl(world.cluster, "create", "--dry-run=server", "-f", "-", input=probe,
                           check=False).returncode != 0

        class _Off:
            def __enter__(self):
                kubectl(world.cluster, "delete", "validatingadmissionpolicybinding",
                        "keyless-remotetenantcluster-tenancy", "--ignore-not-found")
                # The API server loads policy changes asynchronously.
                eventually(lambda: not enforced(), timeout=60, message="tenancy policy off")

            def __exit__(self, *exc):
                kubectl(world.cluster, "apply", "-f", str(ROOT / "policies" / "remotetenantcluster-tenancy.yaml"))
                eventually(enforced, timeout=60, message="tenancy policy back on")

        return _Off()


@pytest.fixture(scope="module")
def world(control_plane, control_api, run_dir):
    directory = run_dir / "hostile"
    # A Managed manifest whose "bootstrap credential" is no kubeconfig cannot clean its tenant: give up fast.
    with running_chain(control_plane, control_api, directory, NS_A, f"keyless:{NS_A}:deputy", "hostile-deputy",
                       "--deletion-give-up-seconds=5") as chain:
        cluster = chain.control
        kubectl(cluster, "apply", "-f", str(ROOT / "policies"))
        try:
            apply_json(cluster, *namespaces(), *rbac())
            eventually(lambda: kubectl(cluster, "create", "--dry-run=server", "-f", "-", check=False,
                                       input=json.dumps(rtc("policy-probe", NS_FREE))).returncode != 0,
                       timeout=60, message="tenancy policy enforced")
            with serving_guardrails(cluster, directory / "webhooks", admin_groups=("system:masters", USERS["root"])) \
                    as guardrails:
                w = World(chain, guardrails)
                # victor's honest set-up: a registered cluster, an Application and an ApplicationSet in his
                # namespace, and (made by an admin) an Application in Argo CD's namespace.
                assert w.create("victor", rtc("b-dev", NS_B, TENANT_B, B_SERVER)).returncode == 0
                w.wait(NS_B, "b-dev", "BrokerTargetRegistered", "True")
                eventually(lambda: w.create("victor", application("b-app", NS_B, TENANT_B, {"server": B_SERVER}))
                           .returncode == 0 or w.as_user("victor", "get", "application", "b-app", "-n", NS_B)
                           .returncode == 0, timeout=30, message="victor's Application accepted")
                assert w.create("victor", application_set("b-set", NS_B, [pinned(TENANT_B)],
                                                          project=TENANT_B)).returncode == 0
                assert w.create("root", application("b-central", "argocd", TENANT_B, {"name": "b-dev"})).returncode == 0
                yield w
        finally:
            kubectl(cluster, "delete", "-f", str(ROOT / "policies"), "--ignore-not-found", check=False)


@pytest.fixture
def untouched(world):
    """Asserts after the test that victor's objects were not modified."""
    before = world.victim_state()
    yield
    assert world.victim_state() == before


# ---- finding 1: the project switch ------------------------------------------------------------------------
def test_an_application_naming_another_tenants_project_and_cluster_is_refused(world, untouched):
    result = world.create("mallory", application("switch", NS_A, TENANT_B, {"server": B_SERVER}))
    assert refusal_reason(result) == "ProjectOfAnotherTenant"
    assert f"Use a project of tenant {TENANT_A}" in result.stderr


def test_another_tenants_application_cannot_be_edited_not_even_its_repository(world, untouched):
    for namespace, name in ((NS_B, "b-app"), ("argocd", "b-central")):
        stored = json.loads(world.as_user("root", "get", "application", name, "-n", namespace, "-o", "json").stdout)
        stored["spec"]["source"]["repoURL"] = "https://evil.example.com/payload.git"
        result = world.as_user("mallory", "replace", "-f", "-", manifest=stored)
        assert result.returncode != 0
        if namespace == "argocd":  # RBAC carelessly lets her write there; the guardrails do not
            assert refusal_reason(result) == "ControlNamespaceAdminsOnly"
            assert "Create it in a namespace of your tenant" in result.stderr
        else:
            assert "forbidden" in result.stderr


# ---- finding 2: spec.tenant is bound to the namespace -------------------------------------------------------
def test_a_manifest_claiming_another_tenant_is_refused_at_admission_with_what_to_do(world, untouched):
    claim = rtc("claims-b", NS_A, TENANT_B, access={"clusterRole": "cluster-admin",
                                                     "username": "keyless:tenant-hb:argocd"})
    result = world.create("mallory", claim)
    assert result.returncode != 0
    assert f"spec.tenant must be {TENANT_A}, the tenant of namespace {NS_A}" in result.stderr


def test_without_the_admission_policy_the_operator_derives_nothing_from_a_foreign_tenant_manifest(world, untouched):
    claim = rtc("claims-b-late", NS_A, TENANT_B, argocd={"labels": {"environment": "development"}})
    with world.without_tenancy_policy():
        assert world.create("mallory", claim).returncode == 0
    condition = world.wait(NS_A, "claims-b-late", "ArgoClusterRegistered", "False", "NamespaceNotOwned")
    assert f"namespace {NS_A} belongs to tenant {TENANT_A}, not {TENANT_B}" in condition["message"]
    assert world.condition(NS_A, "claims-b-late", "Ready")["reason"] == "NamespaceNotOwned"
    events = json.loads(kubectl(world.cluster, "get", "events", "-n", NS_A, "--field-selector",
                                "involvedObject.name=claims-b-late", "-o", "json").stdout)["items"]
    assert any(e["reason"] == "NamespaceNotOwned" and e["type"] == "Warning" for e in events)
    # Nothing to select with victor's pinned ApplicationSet: only his own cluster carries his label.
    assert world.tenant_secrets(TENANT_B) == [f"keyless-{NS_B}-b-dev"]
    assert world.broker_target(NS_A, "claims-b-late") is None
    assert [d["server"] for d in world.app_project(TENANT_B)["spec"]["destinations"]] == [B_SERVER]
    # And victor's work goes on: his new Application to his cluster is accepted.
    assert world.create("victor", application("b-app-2", NS_B, TENANT_B, {"name": "b-dev"})).returncode == 0
    kubectl(world.cluster, "delete", "rtc", "claims-b-late", "-n", NS_A, "--wait=true", "--timeout=30s")


def test_claiming_another_tenants_server_name_or_project_takes_nothing_and_denies_it_nothing(world, untouched):
    assert world.create("mallory", rtc("same-server", NS_A, server=B_SERVER)).returncode == 0
    assert world.create("mallory", rtc("same-name", NS_A, argocd={"clusterName": "b-dev"})).returncode == 0
    project = world.create("mallory", rtc("same-project", NS_A, argocd={"project": TENANT_B}))
    assert project.returncode != 0 and "spec.argocd.project must be the tenant's name" in project.stderr
    for name, what in (("same-server", "server"), ("same-name", "Argo CD cluster name")):
        message = world.wait(NS_A, name, "ArgoClusterRegistered", "False", "Conflict")["message"]
        assert what in message and "another tenant" in message and NS_B not in message
        assert world.argocd_secret(NS_A, name) is None and world.broker_target(NS_A, name) is None
    # No denial of service: victor still deploys to his cluster by server and by name.
    for index, destination in enumerate(({"server": B_SERVER}, {"name": "b-dev"})):
        app = application(f"b-still-{index}", NS_B, TENANT_B, destination)
        assert world.create("victor", app).returncode == 0
    for name in ("same-server", "same-name"):
        kubectl(world.cluster, "delete", "rtc", name, "-n", NS_A, "--wait=true", "--timeout=30s")


# ---- finding 3: audiences ---------------------------------------------------------------------------------------
def test_an_audience_of_another_namespace_is_refused_by_the_policy_and_by_the_operator(world, untouched):
    stolen = rtc("steal-audience", NS_A, access={"clusterRole": "cluster-admin", "audience": f"keyless:{NS_B}:b-dev"})
    result = world.create("mallory", stolen)
    assert result.returncode != 0 and f"spec.access.audience must start with keyless:{NS_A}:" in result.stderr
    with world.without_tenancy_policy():
        assert world.create("mallory", stolen).returncode == 0
    condition = world.wait(NS_A, "steal-audience", "ArgoClusterRegistered", "False", "InvalidSpec")
    assert f"must start with keyless:{NS_A}:" in condition["message"]
    assert world.broker_target(NS_A, "steal-audience") is None
    kubectl(world.cluster, "delete", "rtc", "steal-audience", "-n", NS_A, "--wait=true", "--timeout=30s")


def test_an_older_manifest_cannot_take_an_audience_by_removing_and_adding_it_back(world, untouched):
    assert world.create("mallory", rtc("older", NS_A)).returncode == 0
    world.wait(NS_A, "older", "BrokerTargetRegistered", "True")
    stored = world.rtc(NS_A, "older")
    for audience in (f"keyless:{NS_A}:younger-victim", f"keyless:{NS_B}:b-dev"):
        stored["spec"]["access"]["audience"] = audience
        result = world.as_user("mallory", "replace", "-f", "-", manifest=stored)
        assert result.returncode != 0 and "spec.access.audience is immutable" in result.stderr
    assert world.broker_target(NS_A, "older")["spec"]["audience"] == f"keyless:{NS_A}:older"
    kubectl(world.cluster, "delete", "rtc", "older", "-n", NS_A, "--wait=true", "--timeout=30s")


def test_the_broker_mints_nothing_for_an_audience_two_targets_share(world, untouched):
    broker, api = world.chain.broker, world.api
    pod = caller_pod(api, "argocd", CONTROLLER_SA, f"{CONTROLLER_SA}-{uuid.uuid4().hex[:6]}")
    token = bound_caller_token(api, pod)
    victim = world.broker_target(NS_B, "b-dev")["spec"]
    eventually(lambda: broker.mint(f"{NS_B}.b-dev", token).status_code == 200, message="victor's target mints")
    # A second target with the same audience, as only a broken or compromised writer could make one.
    apply_broker_target(api, "keyless-system", "hostile-duplicate", audience=victim["audience"],
                        username="keyless:tenant-ha:argocd", allowed_callers=[f"system:serviceaccount:argocd:{CONTROLLER_SA}"])
    try:
        refused = eventually(lambda: (r := broker.mint("hostile-duplicate", token)).status_code == 409 and r.json(),
                             message="the duplicate refused")
        assert refused["error"] == "audience_conflict"
        assert broker.mint(f"{NS_B}.b-dev", token).json()["error"] == "audience_conflict"
    finally:
        k.CustomObjectsApi(api).delete_namespaced_custom_object("keyless.dev", "v1alpha1", "keyless-system",
                                                                "brokertargets", "hostile-duplicate")
    eventually(lambda: broker.mint(f"{NS_B}.b-dev", token).status_code == 200, message="victor's target mints again")


# ---- finding 4: keys as Argo CD reads them --------------------------------------------------------------------
@pytest.mark.parametrize("generators, spec, reason", [
    ([pinned()], {"goTemplate": True, "templatePatch": f'{{"Spec": {{"destination": {{"server": "{B_SERVER}"}}}}}}'},
     "CrossTenantDestination"),
    ([pinned()], {"templatePatch": f"spec:\n  Destination:\n    Server: {B_SERVER}\n"}, "CrossTenantDestination"),
    ([{"matrix": {"generators": [{"matrix": {"Generators": [{"list": {"elements": [{"server": B_SERVER}]}},
                                                             pinned()]}}]}}], {}, "CrossTenantDestination"),
], ids=["templatePatch-Spec", "templatePatch-Destination-Server", "nested-Generators"])
def test_keys_in_another_case_cannot_smuggle_a_destination(world, untouched, generators, spec, reason):
    result = world.create("mallory", application_set(f"smuggle-{uuid.uuid4().hex[:6]}", NS_A, generators, **spec))
    assert refusal_reason(result) == reason
    assert "Tenant tenant-ha may deploy to" in result.stderr


# ---- finding 5: applications in any namespace ------------------------------------------------------------------
def test_applications_anywhere_are_judged_by_the_tenant_of_their_namespace(world, untouched):
    for project in (TENANT_B, TENANT_A):
        result = world.create("mallory", application(f"free-{project}", NS_FREE, project, {"server": B_SERVER}))
        assert refusal_reason(result) == "TenantProjectOutsideTenantNamespace"
    assert world.create("mallory", rtc("a-dev", NS_A)).returncode == 0
    world.wait(NS_A, "a-dev", "AppProjectReady", "True")
    # Argo CD enforces the same: each Keyless project accepts Applications only from its tenant's namespaces.
    assert world.app_project(TENANT_A)["spec"]["sourceNamespaces"] == [NS_A, NS_A2]
    assert world.app_project(TENANT_B)["spec"]["sourceNamespaces"] == [NS_B]
    own = application("own", NS_A2, TENANT_A, {"name": "a-dev"})
    assert world.create("mallory", own).returncode == 0


# ---- finding 6: deleteAfterInstall ---------------------------------------------------------------------------------
def test_delete_after_install_deletes_only_a_secret_marked_for_that_manifest(world, run_dir):
    """The chain check is the author's to fake (own server, own CA): only the marker decides."""
    core = k.CoreV1Api(world.api)
    precious = core.create_namespaced_secret(NS_A, k.V1Secret(metadata=k.V1ObjectMeta(name="precious"),
                                                             string_data={"kubeconfig": "not mine to delete"}))
    assert world.as_user("mallory", "delete", "secret", "precious", "-n", NS_A).returncode != 0
    marked_verifier, = start_verifiers(run_dir / "hostile-verifiers", world.chain.broker.issuer,
                                       world.chain.broker.ca_file.read_bytes(), {"marked": f"keyless:{NS_A}:marked"})
    try:
        core.create_namespaced_secret(NS_A, k.V1Secret(
            metadata=k.V1ObjectMeta(name="marked", annotations={"keyless.dev/bootstrap-for": "marked"}),
            string_data={"kubeconfig": "a bootstrap credential"}))
        for name, secret, cluster in (("deputy", "precious", world.chain.tenant), ("marked", "marked", marked_verifier.cluster)):
            manifest = rtc(name, NS_A, server=cluster.server, caData=base64.b64encode(cluster.ca_pem).decode(),
                           proxy={"mode": "Managed"},
                           bootstrap={"kubeconfigSecretRef": {"name": secret}, "deleteAfterInstall": True})
            assert world.create("mallory", manifest).returncode == 0
        world.wait(NS_A, "deputy", "TokenVerified", "True", "Verified")
        world.wait(NS_A, "marked", "TokenVerified", "True", "Verified")
        # The control: the marked Secret goes...
        eventually(lambda: read_or_none(core.read_namespaced_secret, "marked", NS_A) is None,
                   message="the marked bootstrap Secret deleted")
        # ...the unmarked one stays, and the condition says what to do.
        condition = world.wait(NS_A, "deputy", "ProxyReady", "False")
        assert "keyless.dev/bootstrap-for=deputy" in condition["message"] and "was kept" in condition["message"]
        assert core.read_namespaced_secret("precious", NS_A).metadata.uid == precious.metadata.uid
    finally:
        for name in ("deputy", "marked"):
            kubectl(world.cluster, "delete", "rtc", name, "-n", NS_A, "--wait=true", "--timeout=60s", check=False)
        marked_verifier.stop()


# ---- finding 7: the broker, unauthenticated ------------------------------------------------------------------------
def _slow_connection(port: int, context: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    tls = context.wrap_socket(raw, server_hostname="localhost")
    tls.sendall(b"POST /v1/targets/x/token HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer ")  # never finished
    return tls


def _closed_by_server(sock: ssl.SSLSocket) -> bool:
    try:
        sock.settimeout(30)
        return sock.recv(1) == b""
    except TimeoutError:
        return False  # still open
    except (ssl.SSLError, OSError):
        return True


def test_the_broker_serves_honest_callers_while_slow_clients_hold_more_connections_than_it_allows(world, run_dir):
    broker = start_broker(world.cluster, "keyless-system", run_dir / "hostile-broker", "--max-connections", "16",
                          "--request-head-timeout-seconds", "300", "--operator-identity",
                          "system:serviceaccount:keyless-system:keyless-operator")
    context = ssl.create_default_context(cafile=str(broker.ca_file))
    port = int(broker.url.rsplit(":", 1)[1])
    slow: list[ssl.SSLSocket] = []
    try:
        pod = caller_pod(world.api, "argocd", CONTROLLER_SA, f"{CONTROLLER_SA}-{uuid.uuid4().hex[:6]}")
        token = bound_caller_token(world.api, pod)
        for _ in range(48):  # three times the cap; the head timeout is far away
            slow.append(_slow_connection(port, context))
        for _ in range(3):
            response = broker.mint(f"{NS_B}.b-dev", token)
            assert response.status_code == 200, response.text
        closed = sum(_closed_by_server(s) for s in slow[:32])
        assert closed == 32, "every slow connection beyond the cap was evicted, oldest first"
        assert broker.running()
    finally:
        for sock in slow:
            sock.close()
        broker.stop()


# ---- further attempts of a hostile tenant ---------------------------------------------------------------------------
def _rtc_attempt(**spec):
    return rtc(f"try-{uuid.uuid4().hex[:6]}", NS_A, **spec)


FURTHER_ATTEMPTS = {
    # name: (user, manifest, what the refusal says)
    "fullwidth unicode tenant": ("mallory", _rtc_attempt(tenant="tenant-\uff48b"), "spec.tenant"),
    "upper-case tenant": ("mallory", _rtc_attempt(tenant="Tenant-hb"), "spec.tenant"),
    "another tenant's username": ("mallory", _rtc_attempt(access={"clusterRole": "x", "username": "keyless:tenant-hb:argocd"}),
                                  "must start with keyless:<tenant>:"),
    "username prefix of a longer tenant": ("mallory", _rtc_attempt(access={"clusterRole": "x",
                                                                          "username": "keyless:tenant-hax:argocd"}),
                                           "must start with keyless:<tenant>:"),
    "tenant label on the cluster Secret": ("mallory", _rtc_attempt(argocd={"labels": {"keyless.dev/tenant": TENANT_B}}),
                                           "Argo CD and Keyless own them"),
    "tenant label key in another case": ("mallory", _rtc_attempt(argocd={"labels": {"Keyless.dev/tenant": TENANT_B}}),
                                         "valid Kubernetes label keys"),
    "another tenant's sub-project": ("mallory", _rtc_attempt(argocd={"project": f"{TENANT_B}.x"}),
                                     "spec.argocd.project must be the tenant's name"),
    "a project sharing only a prefix": ("mallory", _rtc_attempt(argocd={"project": f"{TENANT_A}-b"}),
                                        "spec.argocd.project must be the tenant's name"),
    "another namespace's audience": ("mallory", _rtc_attempt(access={"clusterRole": "x",
                                                                    "audience": f"keyless:{NS_B}:future"}),
                                     f"must start with keyless:{NS_A}:"),
    "a manifest in the victim's namespace": ("mallory", rtc("intrude", NS_B, TENANT_A), "forbidden"),
    "a manifest in a namespace of no tenant": ("mallory", rtc("unowned", NS_FREE, TENANT_A), "belongs to no tenant"),
    "a manifest moved into the victim's namespace by an admin": ("root", rtc("moved", NS_B, TENANT_A),
                                                                  f"spec.tenant must be {TENANT_B}"),
    "an Application in Argo CD's namespace": ("mallory", application("central", "argocd", TENANT_A, {"server": B_SERVER}),
                                              "ControlNamespaceAdminsOnly"),
    "own cluster name, victim's server": ("mallory", application("mixed", NS_A, TENANT_A,
                                                                {"name": "a-dev", "server": B_SERVER}),
                                          "CrossTenantDestination"),
    "victim's project from the tenant's second namespace": ("mallory", application("second", NS_A2, TENANT_B,
                                                                                    {"server": B_SERVER}),
                                                             "ProjectOfAnotherTenant"),
    "generated Applications into the victim's namespace": ("mallory", application_set(
        "into-b", NS_A, [pinned()], metadata={"namespace": NS_B}), "TemplateNamespace"),
    "a YAML alias smuggling a destination": ("mallory", application_set(
        "alias", NS_A, [pinned()], templatePatch=f"x: &d {{destination: {{server: '{B_SERVER}'}}}}\nspec: *d\n"),
        "CrossTenantDestination"),
    "the tenant label key in another case in a selector": ("mallory", application_set(
        "case-label", NS_A, [{"clusters": {"selector": {"matchLabels": {"Keyless.dev/tenant": TENANT_A}}}}]),
        "ClusterGeneratorNotPinned"),
    "a Kelvin sign doubling a key in a nested generator": ("mallory", application_set(
        "kelvin", NS_A, [{"matrix": {"generators": [{"matrix": {"generators": [{"clusters": {"selector": {
            "matchLabels": {"keyless.dev/tenant": TENANT_A},
            "matchExpressions": [{"key": "environment", "\u212aey": "keyless.dev/tenant", "operator": "Exists"}]}}}]}}]}}]),
        "AmbiguousKeys"),
    "a long s spelling spec in a templatePatch": ("mallory", application_set(
        "long-s", NS_A, [pinned()], templatePatch=f"\u017fpec:\n  project: {TENANT_B}\n"), "ProjectOfAnotherTenant"),
}


@pytest.mark.parametrize("attempt", sorted(FURTHER_ATTEMPTS))
def test_further_hostile_attempts_are_refused_with_a_reason(world, untouched, attempt):
    user, manifest, expected = FURTHER_ATTEMPTS[attempt]
    result = world.create(user, manifest)
    assert result.returncode != 0, f"{attempt} was accepted"
    assert expected in result.stderr, result.stderr


def test_relabelling_a_namespace_by_its_tenant_is_refused_even_with_rbac_to_patch_it(world, untouched):
    result = world.as_user("mallory", "label", "namespace", NS_A, f"keyless.dev/tenant={TENANT_B}", "--overwrite")
    assert result.returncode != 0 and "only platform admins may set, change or remove" in result.stderr
    result = world.as_user("mallory", "label", "namespace", NS_A, "keyless.dev/tenant-")
    assert result.returncode != 0 and "only platform admins" in result.stderr
    assert world.as_user("mallory", "label", "namespace", NS_A, "team=a", "--overwrite").returncode == 0


def test_a_label_on_the_manifest_itself_changes_no_tenant(world, untouched):
    manifest = rtc("labelled", NS_A)
    manifest["metadata"]["labels"] = {"keyless.dev/tenant": TENANT_B}
    assert world.create("mallory", manifest).returncode == 0
    world.wait(NS_A, "labelled", "ArgoClusterRegistered", "True")
    assert world.argocd_secret(NS_A, "labelled").metadata.labels["keyless.dev/tenant"] == TENANT_A
    kubectl(world.cluster, "delete", "rtc", "labelled", "-n", NS_A, "--wait=true", "--timeout=30s")


def test_two_tenants_racing_for_one_server_leave_exactly_one_registration_that_everyone_agrees_on(world):
    server = "https://contested.hostile.example.com"
    attempts = {"mallory": rtc("race", NS_A, server=server), "victor": rtc("race", NS_B, TENANT_B, server=server)}
    results = {}
    threads = [threading.Thread(target=lambda u=u, m=m: results.update({u: world.create(u, m)}))
               for u, m in attempts.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(r.returncode == 0 for r in results.values())

    def settled():
        reasons = {ns: world.condition(ns, "race", "ArgoClusterRegistered").get("reason", "") for ns in (NS_A, NS_B)}
        assert sorted(reasons.values()) == ["Conflict", "Registered"], reasons
        return reasons
    reasons = eventually(settled, timeout=60, message="one winner, one loser")
    winner_ns = next(ns for ns, r in reasons.items() if r == "Registered")
    # The first claim wins: the older manifest (ties broken by namespace/name), whoever reconciled first.
    first = min((world.rtc(ns, "race")["metadata"]["creationTimestamp"], ns) for ns in (NS_A, NS_B))[1]
    assert winner_ns == first
    loser_ns = NS_B if winner_ns == NS_A else NS_A
    assert world.argocd_secret(loser_ns, "race") is None and world.broker_target(loser_ns, "race") is None
    servers = [s for s in k.CoreV1Api(world.api).list_namespaced_secret(
        "argocd", label_selector="argocd.argoproj.io/secret-type=cluster").items
        if base64.b64decode(s.data["server"]).decode() == server]
    assert len(servers) == 1
    # The guardrails agree with the operator about whose cluster it is.
    winner, loser = ("mallory", "victor") if winner_ns == NS_A else ("victor", "mallory")
    project = {NS_A: TENANT_A, NS_B: TENANT_B}
    eventually(lambda: world.create(winner, application("race-app", winner_ns, project[winner_ns],
                                                        {"server": server})).returncode == 0,
               timeout=30, message="the winner may deploy to its server")
    refused = world.create(loser, application("race-app", loser_ns, project[loser_ns], {"server": server}))
    assert refusal_reason(refused) == "CrossTenantDestination"
    for ns in (NS_A, NS_B):
        kubectl(world.cluster, "delete", "rtc", "race", "-n", ns, "--wait=true", "--timeout=30s")


def test_moving_a_manifest_to_the_tenants_other_namespace_moves_its_registration(world, untouched):
    assert world.create("mallory", rtc("mover", NS_A, server="https://mover.hostile.example.com")).returncode == 0
    world.wait(NS_A, "mover", "ArgoClusterRegistered", "True")
    # While the first one holds the server, a copy elsewhere loses; once it is gone, the copy takes over.
    assert world.create("mallory", rtc("mover", NS_A2, server="https://mover.hostile.example.com")).returncode == 0
    world.wait(NS_A2, "mover", "ArgoClusterRegistered", "False", "Conflict")
    assert f"RemoteTenantCluster {NS_A}/mover" in world.condition(NS_A2, "mover", "ArgoClusterRegistered")["message"]
    kubectl(world.cluster, "delete", "rtc", "mover", "-n", NS_A, "--wait=true", "--timeout=30s")
    world.wait(NS_A2, "mover", "ArgoClusterRegistered", "True")
    assert world.broker_target(NS_A2, "mover")["spec"]["audience"] == f"keyless:{NS_A2}:mover"
    assert world.argocd_secret(NS_A, "mover") is None
    kubectl(world.cluster, "delete", "rtc", "mover", "-n", NS_A2, "--wait=true", "--timeout=30s")


def test_a_relabelled_namespace_stops_serving_its_manifests_until_labelled_back(world, untouched):
    assert world.create("mallory", rtc("relabel", NS_A2)).returncode == 0
    world.wait(NS_A2, "relabel", "BrokerTargetRegistered", "True")
    kubectl(world.cluster, "label", "namespace", NS_A2, f"keyless.dev/tenant={TENANT_C}", "--overwrite")
    try:
        world.wait(NS_A2, "relabel", "Ready", "False", "NamespaceNotOwned")
        eventually(lambda: world.argocd_secret(NS_A2, "relabel") is None and
                   world.broker_target(NS_A2, "relabel") is None, message="its Secret and BrokerTarget withdrawn")
        eventually(lambda: NS_A2 not in (world.app_project(TENANT_A) or {"spec": {}})["spec"].get("sourceNamespaces", []),
                   message="tenant-ha's project no longer accepts Applications from the namespace")
        # The guardrails follow: the namespace's Applications are now judged as tenant-hc's.
        app = application("after-relabel", NS_A2, TENANT_A, {"server": "https://relabel.hostile-a2.example.com"})
        eventually(lambda: refusal_reason(world.create("mallory", app)) == "ProjectOfAnotherTenant",
                   message="tenant-ha's project refused in a tenant-hc namespace")
    finally:
        kubectl(world.cluster, "label", "namespace", NS_A2, f"keyless.dev/tenant={TENANT_A}", "--overwrite")
    world.wait(NS_A2, "relabel", "BrokerTargetRegistered", "True")
    assert world.argocd_secret(NS_A2, "relabel") is not None
    kubectl(world.cluster, "delete", "rtc", "relabel", "-n", NS_A2, "--wait=true", "--timeout=30s")

