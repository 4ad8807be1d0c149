"""Unit tests of the tenant guardrail policy, directory and webhook configuration rendering (pure).

The manifests here (ADVERSARIAL, ALLOWED, MUTATIONS) are also sent through the real API server by
test_webhooks_admission.py.
"""
from __future__ import annotations

import asyncio
import base64
import copy
import functools
import ssl
from dataclasses import dataclass, field
from types import SimpleNamespace

import kopf
import pytest

from keyless.envtest import pki
from keyless.webhooks import configuration, handlers, policy, serving
from keyless.webhooks.directory import TenantDirectory, cluster_from_remote_tenant_cluster, normalize_server
from keyless.webhooks.serving import ReloadingWebhookServer
from keyless.webhooks.watch import DirectoryKeeper

A_DEV = "https://a-dev.tenant-a.example.com"
A_PROD = "https://a-prod.tenant-a.example.com"
B_DEV = "https://b-dev.tenant-b.example.com"
C_ONE = "https://c-one.tenant-c.example.com"
PLATFORM = "https://platform-tools.example.com"  # not a tenant cluster
IN_CLUSTER = "https://kubernetes.default.svc"
REPO = "https://git.example.com/apps.git"
TENANT = "keyless.dev/tenant"


def remote_tenant_cluster(name: str, tenant: str, server: str, labels: dict, project: str | None = None,
                          cluster_name: str | None = None) -> dict:
    argocd: dict = {"namespace": "argocd", "labels": labels}
    if project:
        argocd["project"] = project
    if cluster_name:
        argocd["clusterName"] = cluster_name
    return {
        "apiVersion": "keyless.dev/v1alpha1", "kind": "RemoteTenantCluster",
        "metadata": {"name": name, "namespace": "keyless-system"},
        "spec": {"tenant": tenant, "server": server, "caData": base64.b64encode(b"not-a-real-ca").decode(),
                 "argocd": argocd, "access": {"clusterRole": "cluster-admin"}, "proxy": {"mode": "External"}},
    }


REMOTE_TENANT_CLUSTERS = [
    remote_tenant_cluster("a-dev", "tenant-a", A_DEV, {"environment": "development"}),
    remote_tenant_cluster("a-prod", "tenant-a", A_PROD, {"environment": "production"}),
    remote_tenant_cluster("b-dev", "tenant-b", B_DEV, {"environment": "development"}),
    # A custom project and Argo CD cluster name.
    remote_tenant_cluster("c-one", "tenant-c", C_ONE, {}, project="team-c", cluster_name="tenant-c-one"),
]


def application(name: str, project: str, destination: dict, labels: dict | None = None) -> dict:
    metadata: dict = {"name": name, "namespace": "argocd"}
    if labels:
        metadata["labels"] = labels
    return {"apiVersion": "argoproj.io/v1alpha1", "kind": "Application", "metadata": metadata,
            "spec": {"project": project, "destination": destination,
                     "source": {"repoURL": REPO, "path": "guestbook", "targetRevision": "HEAD"}}}


def template(project: str, destination: dict) -> dict:
    return {"metadata": {"name": "{{name}}-guestbook"},
            "spec": {"project": project, "destination": {"namespace": "guestbook", **destination},
                     "source": {"repoURL": REPO, "path": "guestbook", "targetRevision": "HEAD"}}}


def application_set(name: str, generators: list, project: str = "tenant-a",
                    destination: dict | None = None, **spec) -> dict:
    destination = {"server": "{{server}}"} if destination is None else destination
    return {"apiVersion": "argoproj.io/v1alpha1", "kind": "ApplicationSet",
            "metadata": {"name": name, "namespace": "argocd"},
            "spec": {"generators": generators, "template": template(project, destination), **spec}}


def clusters(selector: dict, **extra) -> dict:
    return {"clusters": {"selector": selector, **extra}}


PINNED_A = {"matchLabels": {TENANT: "tenant-a"}}


@dataclass
class Case:
    name: str
    manifest: dict
    reason: str = "Allowed"
    old: dict | None = None  # for updates: what is stored before
    user: str = "alice"  # alice is in tenant-a's team, bob in tenant-b's
    notes: str = ""
    extra: dict = field(default_factory=dict)


# ---- manifests a tenant-a user must not get through -------------------------------------------
ADVERSARIAL: list[Case] = [
    Case("app-other-tenant-server", application("app-other-tenant-server", "tenant-a", {"server": B_DEV}),
         "CrossTenantDestination"),
    Case("app-other-tenant-name", application("app-other-tenant-name", "tenant-a", {"name": "b-dev"}),
         "CrossTenantDestination"),
    Case("app-own-server-other-name",
         application("app-own-server-other-name", "tenant-a", {"server": A_DEV, "name": "b-dev"}),
         "CrossTenantDestination", notes="name and server both set: each must be the tenant's"),
    Case("app-in-cluster-from-tenant-project",
         application("app-in-cluster-from-tenant-project", "tenant-a", {"server": IN_CLUSTER}),
         "UnregisteredDestination", notes="the control plane itself"),
    Case("app-default-project-to-tenant-name",
         application("app-default-project-to-tenant-name", "default", {"name": "b-dev"}),
         "TenantClusterFromForeignProject"),
    Case("app-default-project-server-spelling",
         application("app-default-project-server-spelling", "default",
                     {"server": "HTTPS://B-DEV.Tenant-B.example.com:443/"}),
         "TenantClusterFromForeignProject", notes="case, default port and trailing slash variants"),
    Case("app-update-moves-to-other-tenant",
         application("app-update-moves-to-other-tenant", "tenant-b", {"server": B_DEV}),
         "ProjectChangeAcrossTenants",
         old=application("app-update-moves-to-other-tenant", "tenant-a", {"server": A_DEV})),
    Case("app-update-moves-to-default-project",
         application("app-update-moves-to-default-project", "default", {"server": A_DEV}),
         "ProjectChangeAcrossTenants",
         old=application("app-update-moves-to-default-project", "tenant-a", {"server": A_DEV})),
    Case("appset-selector-other-tenant",
         application_set("appset-selector-other-tenant", [clusters({"matchLabels": {TENANT: "tenant-b"}})]),
         "ClusterGeneratorNotPinned"),
    Case("appset-selector-empty", application_set("appset-selector-empty", [clusters({})]),
         "ClusterGeneratorNotPinned", notes="an empty selector selects every cluster"),
    Case("appset-selector-environment-only",
         application_set("appset-selector-environment-only",
                         [clusters({"matchLabels": {"environment": "development"}})]),
         "ClusterGeneratorNotPinned", notes="tenant-b also has a development cluster"),
    Case("appset-selector-tenant-key-spelling",
         application_set("appset-selector-tenant-key-spelling",
                         [clusters({"matchLabels": {"Keyless.dev/tenant": "tenant-a", "environment": "development"}})]),
         "ClusterGeneratorNotPinned"),
    Case("appset-expressions-in-two-tenants",
         application_set("appset-expressions-in-two-tenants", [clusters({"matchExpressions": [
             {"key": TENANT, "operator": "In", "values": ["tenant-a", "tenant-b"]}]})]),
         "ClusterGeneratorNotPinned"),
    Case("appset-expressions-notin-other",
         application_set("appset-expressions-notin-other", [clusters({"matchExpressions": [
             {"key": TENANT, "operator": "NotIn", "values": ["tenant-b"]}]})]),
         "ClusterGeneratorNotPinned", notes="NotIn also matches every other tenant"),
    Case("appset-expressions-exists",
         application_set("appset-expressions-exists", [clusters({"matchExpressions": [
             {"key": TENANT, "operator": "Exists"}]})]),
         "ClusterGeneratorNotPinned"),
    Case("appset-selector-templated-tenant-in-matrix",
         application_set("appset-selector-templated-tenant-in-matrix", [{"matrix": {"generators": [
             {"git": {"repoURL": REPO, "revision": "HEAD", "directories": [{"path": "tenants/*"}]}},
             clusters({"matchLabels": {TENANT: "{{path.basename}}"}}),
         ]}}]), "ClusterGeneratorNotPinned"),
    Case("appset-templated-project",
         application_set("appset-templated-project", [clusters(PINNED_A)],
                         project="{{metadata.labels.keyless.dev/tenant}}"),
         "TemplatedProject"),
    Case("appset-gotemplate-project-index",
         application_set("appset-gotemplate-project-index", [clusters(PINNED_A)],
                         project='{{ index .metadata.labels "keyless.dev/tenant" }}',
                         destination={"server": "{{ .server }}"}, goTemplate=True),
         "TemplatedProject"),
    Case("appset-gotemplate-project-constant",
         application_set("appset-gotemplate-project-constant", [clusters(PINNED_A)],
                         project='{{- "tenant-b" -}}', destination={"server": "{{ .server }}"}, goTemplate=True),
         "TemplatedProject", notes="a goTemplate expression that is constant, but not tenant-a"),
    Case("appset-gotemplate-project-printf",
         application_set("appset-gotemplate-project-printf",
                         [clusters(PINNED_A, values={"suffix": "a"})],
                         project='{{ printf "tenant-%s" .values.suffix }}',
                         destination={"server": "{{ .server }}"}, goTemplate=True),
         "TemplatedProject"),
    Case("appset-generator-template-other-project",
         application_set("appset-generator-template-other-project", [clusters(
             PINNED_A, template=template("tenant-b", {"server": "{{server}}"}))]),
         "MixedProjects", notes="a per-generator template overrides spec.template"),
    Case("appset-templatepatch-project",
         application_set("appset-templatepatch-project", [clusters(PINNED_A)],
                         destination={"server": "{{ .server }}"}, goTemplate=True,
                         templatePatch='{{ if true }}spec: {project: tenant-b}{{ end }}'),
         "TemplatedTemplatePatch"),
    Case("appset-templatepatch-literal-destination",
         application_set("appset-templatepatch-literal-destination", [clusters(PINNED_A)],
                         templatePatch=f"spec:\n  destination:\n    server: {B_DEV}\n"),
         "CrossTenantDestination"),
    Case("appset-list-other-tenant-server",
         application_set("appset-list-other-tenant-server",
                         [{"list": {"elements": [{"name": "x", "server": B_DEV}]}}]),
         "CrossTenantDestination"),
    Case("appset-destination-from-values",
         application_set("appset-destination-from-values", [clusters(PINNED_A, values={"target": B_DEV})],
                         destination={"server": "{{values.target}}"}),
         "TemplatedDestination"),
    Case("appset-destination-name-from-label",
         application_set("appset-destination-name-from-label", [clusters(PINNED_A)],
                         destination={"name": "{{metadata.labels.environment}}"}),
         "TemplatedDestination"),
    Case("appset-matrix-git-files-feeds-server",
         application_set("appset-matrix-git-files-feeds-server", [{"matrix": {"generators": [
             {"git": {"repoURL": REPO, "revision": "HEAD", "files": [{"path": "clusters/*.json"}]}},
             {"list": {"elements": [{"env": "dev"}]}},
         ]}}]), "UncheckableGenerator", notes="git files can define a server parameter"),
    Case("appset-merge-list-overrides-server",
         application_set("appset-merge-list-overrides-server", [{"merge": {"mergeKeys": ["name"], "generators": [
             clusters(PINNED_A),
             {"list": {"elements": [{"name": "a-dev", "server": B_DEV}]}},
         ]}}]), "CrossTenantDestination"),
    Case("appset-literal-other-tenant-name",
         application_set("appset-literal-other-tenant-name", [clusters(PINNED_A)], destination={"name": "b-dev"}),
         "CrossTenantDestination"),
    Case("appset-default-project-reaches-tenants",
         application_set("appset-default-project-reaches-tenants",
                         [clusters({"matchLabels": {"environment": "development"}})], project="default"),
         "ClusterGeneratorReachesTenants"),
    Case("appset-cluster-decision-resource",
         application_set("appset-cluster-decision-resource", [{"clusterDecisionResource": {
             "configMapRef": "placement", "name": "tenant-a-placement", "requeueAfterSeconds": 60}}]),
         "UncheckableGenerator"),
    Case("appset-update-moves-to-other-tenant",
         application_set("appset-update-moves-to-other-tenant",
                         [clusters({"matchLabels": {TENANT: "tenant-b"}})], project="tenant-b"),
         "ProjectChangeAcrossTenants",
         old=application_set("appset-update-moves-to-other-tenant", [clusters(PINNED_A)])),
]

# ---- what tenants may still do ------------------------------------------------------------------
ALLOWED: list[Case] = [
    Case("own-app-by-server", application("own-app-by-server", "tenant-a", {"server": A_DEV})),
    Case("own-app-by-name", application("own-app-by-name", "tenant-a", {"name": "a-prod", "namespace": "x"})),
    Case("own-app-custom-project", application("own-app-custom-project", "team-c", {"name": "tenant-c-one"}),
         user="carla"),
    Case("platform-app-default-project",
         application("platform-app-default-project", "default", {"server": PLATFORM})),
    Case("own-appset-pinned-labels",
         application_set("own-appset-pinned-labels",
                         [clusters({"matchLabels": {TENANT: "tenant-a", "environment": "production"}})])),
    Case("own-appset-pinned-expression-gotemplate",
         application_set("own-appset-pinned-expression-gotemplate", [clusters({"matchExpressions": [
             {"key": TENANT, "operator": "In", "values": ["tenant-a"]},
             {"key": "environment", "operator": "NotIn", "values": ["production"]}]})],
             destination={"name": "{{ .name }}"}, goTemplate=True)),
    Case("own-appset-list", application_set("own-appset-list", [{"list": {"elements": [
        {"name": "a-dev", "server": A_DEV}, {"name": "a-prod", "server": A_PROD}]}}])),
    Case("own-appset-matrix-git-directories", application_set("own-appset-matrix-git-directories", [{"matrix": {
        "generators": [{"git": {"repoURL": REPO, "revision": "HEAD", "directories": [{"path": "apps/*"}]}},
                       clusters(PINNED_A)]}}])),
    Case("own-appset-literal-destination-git-files", application_set(
        "own-appset-literal-destination-git-files",
        [{"git": {"repoURL": REPO, "revision": "HEAD", "files": [{"path": "apps/*.json"}]}}],
        destination={"server": A_PROD})),
    Case("own-app-update-keeps-tenant", application("own-app-update-keeps-tenant", "tenant-a", {"server": A_PROD}),
         old=application("own-app-update-keeps-tenant", "tenant-a", {"server": A_DEV})),
]

# ---- mutation: (case, the server the Application must end up with, or None: no patch) ---------
MUTATIONS: list[tuple[Case, str | None]] = [
    (Case("mutate-by-environment", application("mutate-by-environment", "tenant-a", {"namespace": "guestbook"},
                                               labels={"environment": "production"})), A_PROD),
    (Case("mutate-single-cluster-tenant", application("mutate-single-cluster-tenant", "tenant-b",
                                                      {"namespace": "guestbook"}), user="bob"), B_DEV),
]
AMBIGUOUS_DESTINATION = Case(
    "mutate-ambiguous", application("mutate-ambiguous", "tenant-a", {"namespace": "guestbook"}), "NoDestination")


@pytest.fixture(scope="module")
def directory() -> TenantDirectory:
    return TenantDirectory.from_remote_tenant_clusters(REMOTE_TENANT_CLUSTERS)


def review(case: Case, directory: TenantDirectory) -> policy.Decision:
    if case.manifest["kind"] == "Application":
        return policy.review_application(case.manifest, directory, old=case.old)
    return policy.review_application_set(case.manifest, directory, old=case.old)


def test_the_adversarial_set_is_large_and_distinct():
    names = [c.name for c in ADVERSARIAL]
    assert len(names) == len(set(names)) >= 15
    assert len({c.reason for c in ADVERSARIAL}) >= 10


@pytest.mark.parametrize("case", ADVERSARIAL, ids=lambda c: c.name)
def test_adversarial_manifest_is_refused_with_its_reason(case, directory):
    decision = review(case, directory)
    assert not decision.allowed
    assert decision.reason == case.reason, decision.message


@pytest.mark.parametrize("case", ALLOWED, ids=lambda c: c.name)
def test_tenant_may_use_own_clusters(case, directory):
    decision = review(case, directory)
    assert decision.allowed, decision.message


def test_refusal_says_which_clusters_are_allowed_instead(directory):
    decision = review(ADVERSARIAL[0], directory)
    assert "tenant-b" in decision.message
    assert A_DEV in decision.message and A_PROD in decision.message and B_DEV not in decision.message.split(
        "may deploy to:")[1]


def test_unpinned_cluster_generator_message_shows_the_selector_to_add(directory):
    case = next(c for c in ADVERSARIAL if c.name == "appset-selector-empty")
    assert "matchLabels {keyless.dev/tenant: tenant-a}" in review(case, directory).message


@pytest.mark.parametrize("case,server", MUTATIONS, ids=lambda v: getattr(v, "name", ""))
def test_destinationless_application_gets_its_tenants_only_cluster(case, server, directory):
    ops = policy.default_destination_patch(case.manifest, directory)
    assert ops == [{"op": "add", "path": "/spec/destination/server", "value": server}]
    patched = copy.deepcopy(case.manifest)
    patched["spec"]["destination"]["server"] = server
    assert policy.review_application(patched, directory).allowed


def test_mutation_adds_the_whole_destination_when_missing(directory):
    app = application("x", "tenant-b", {})
    del app["spec"]["destination"]
    assert policy.default_destination_patch(app, directory) == [
        {"op": "add", "path": "/spec/destination", "value": {"server": B_DEV}}]


def test_no_mutation_when_ambiguous_and_the_validator_lists_the_choices(directory):
    assert policy.default_destination_patch(AMBIGUOUS_DESTINATION.manifest, directory) == []
    decision = policy.review_application(AMBIGUOUS_DESTINATION.manifest, directory)
    assert decision.reason == "NoDestination" and A_DEV in decision.message and A_PROD in decision.message


def test_no_mutation_for_applications_that_have_a_destination_or_no_tenant(directory):
    assert policy.default_destination_patch(application("x", "tenant-b", {"name": "b-dev"}), directory) == []
    assert policy.default_destination_patch(application("x", "default", {"namespace": "n"}), directory) == []


def test_admins_and_argocd_controllers_are_exempt_and_tenants_are_not():
    exemptions = policy.Exemptions.build(admin_users=["root@example.com"], admin_groups=["platform-admins"])
    assert exemptions.exempts({"username": "root@example.com", "groups": []})
    assert exemptions.exempts({"username": "someone", "groups": ["system:authenticated", "platform-admins"]})
    for account in ("argocd-application-controller", "argocd-applicationset-controller", "argocd-server"):
        assert exemptions.exempts({"username": f"system:serviceaccount:argocd:{account}"})
    assert not exemptions.exempts({"username": "alice", "groups": ["tenant-a-devs", "system:authenticated"]})
    assert not exemptions.exempts({"username": "system:serviceaccount:tenant-a:argocd-server"})
    assert not exemptions.exempts(None)


def test_project_claimed_by_two_tenants_is_refused():
    directory = TenantDirectory.from_remote_tenant_clusters(REMOTE_TENANT_CLUSTERS + [
        remote_tenant_cluster("rogue", "tenant-b", "https://rogue.example.com", {}, project="tenant-a")])
    decision = policy.review_application(application("x", "tenant-a", {"server": A_DEV}), directory)
    assert decision.reason == "ProjectClaimedByTenants"


def test_directory_applies_the_crd_defaults_and_the_tenant_label():
    entry = cluster_from_remote_tenant_cluster(REMOTE_TENANT_CLUSTERS[0])
    assert (entry.name, entry.project, entry.server) == ("a-dev", "tenant-a", A_DEV)
    assert entry.labels == {"environment": "development", TENANT: "tenant-a"}
    assert normalize_server("HTTPS://Host.Example.com:443/path/") == "https://host.example.com/path"
    assert normalize_server("https://host:8443") != normalize_server("https://host")


class FakeKube:
    """Just enough of keyless.kube.Kube for the informer: one listing, then queued watch events."""

    def __init__(self, items: list[dict]):
        self.items = items
        self.events: asyncio.Queue = asyncio.Queue()

    async def list(self, path, label_selector=None, field_selector=None) -> dict:
        return {"items": self.items, "metadata": {"resourceVersion": "1"}}

    async def watch(self, path, resource_version=None, label_selector=None, timeout_seconds=300):
        while True:
            yield await self.events.get()

    async def close(self) -> None:
        pass


async def _settle(condition, rounds: int = 1000) -> bool:
    for _ in range(rounds):  # let the informer task run; no wall-clock deadline
        if condition():
            return True
        await asyncio.sleep(0)
    return condition()


def test_directory_keeper_is_not_ready_until_listed_then_follows_watch_events():
    async def scenario():
        kube = FakeKube(REMOTE_TENANT_CLUSTERS[:1])
        keeper = DirectoryKeeper(kube)
        assert not keeper.directory.ready
        keeper.start()
        await keeper.informer.synced.wait()
        assert keeper.directory.ready and keeper.directory.tenants_of_server(A_DEV) == {"tenant-a"}
        await kube.events.put({"type": "ADDED", "object": REMOTE_TENANT_CLUSTERS[2]})
        assert await _settle(lambda: keeper.directory.tenants_of_name("b-dev") == {"tenant-b"})
        await kube.events.put({"type": "DELETED", "object": REMOTE_TENANT_CLUSTERS[2]})
        assert await _settle(lambda: not keeper.directory.tenants_of_name("b-dev"))
        await keeper.stop()

    asyncio.run(scenario())


def _install(directory: TenantDirectory) -> None:
    handlers.use_guardrails(handlers.Guardrails(
        keeper=SimpleNamespace(directory=directory),
        exemptions=policy.Exemptions.build(admin_groups=["platform-admins"])))


def test_handlers_refuse_tenant_requests_until_the_directory_is_synced():
    _install(TenantDirectory(ready=False))
    app = application("x", "tenant-b", {"server": A_DEV})
    with pytest.raises(kopf.AdmissionError) as refused:
        asyncio.run(handlers.validate_application(body=app, old=None, userinfo={"username": "bob"}))
    assert refused.value.code == 503 and "retry" in str(refused.value)
    # Admins are not blocked by an unsynced directory.
    asyncio.run(handlers.validate_application(body=app, old=None,
                                              userinfo={"username": "carol", "groups": ["platform-admins"]}))


def test_handlers_refuse_with_reason_and_exempt_admins(directory):
    _install(directory)
    case = next(c for c in ADVERSARIAL if c.name == "appset-gotemplate-project-index")
    with pytest.raises(kopf.AdmissionError) as refused:
        asyncio.run(handlers.validate_application_set(body=case.manifest, old=None, userinfo={"username": "alice"}))
    assert refused.value.code == 403 and str(refused.value).startswith("TemplatedProject: ")
    asyncio.run(handlers.validate_application_set(
        body=case.manifest, old=None,
        userinfo={"username": "system:serviceaccount:argocd:argocd-applicationset-controller"}))


def test_certificate_reload_keeps_serving_the_old_pair_until_the_new_one_matches(tmp_path):
    ca, _ = pki.new_ca("reload-test")
    first = pki.issue_certificate(ca, "first", server=True, ip_addresses=("127.0.0.1",))
    second = pki.issue_certificate(ca, "second", server=True, ip_addresses=("127.0.0.1",))
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(first.cert_pem)
    key.write_bytes(first.key_pem)
    server = ReloadingWebhookServer(addr="127.0.0.1", port=1, certfile=cert, pkeyfile=key)
    context = server.build_context()
    digest = serving._digest([cert, key])
    key.write_bytes(second.key_pem)  # half-way through an update: new key, old certificate
    assert server._reload_if_changed(context, digest) == digest and server.reloads == 0
    assert _served_certificate(context) == ssl.PEM_cert_to_DER_cert(first.cert_pem.decode())
    cert.write_bytes(second.cert_pem)
    assert server._reload_if_changed(context, digest) != digest and server.reloads == 1
    assert _served_certificate(context) == ssl.PEM_cert_to_DER_cert(second.cert_pem.decode())


def _served_certificate(server_context: ssl.SSLContext) -> bytes:
    """A TLS handshake in memory against the server context; returns the certificate it presented."""
    client_context = ssl.create_default_context()
    client_context.check_hostname, client_context.verify_mode = False, ssl.CERT_NONE
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context.wrap_bio(to_client, to_server)
    server = server_context.wrap_bio(to_server, to_client, server_side=True)
    done = set()
    for _ in range(10):
        for name, side in (("client", client), ("server", server)):
            if name in done:
                continue
            try:
                side.do_handshake()
                done.add(name)
            except ssl.SSLWantReadError:
                pass
        if done == {"client", "server"}:
            break
    return client.getpeercert(binary_form=True)


def test_rendered_configurations_are_scoped_and_fail_closed():
    exemptions = policy.Exemptions.build(admin_groups=["system:masters", "platform-admins"])
    client = functools.partial(configuration.url_client_config, "https://127.0.0.1:9443", b"CA")
    validating = configuration.render_validating_webhook_configuration(client, exemptions=exemptions)
    mutating = configuration.render_mutating_webhook_configuration(client)
    for webhook in validating["webhooks"] + mutating["webhooks"]:
        assert webhook["rules"][0]["apiGroups"] == ["argoproj.io"]
        assert webhook["rules"][0]["operations"] == ["CREATE", "UPDATE"]
        assert webhook["namespaceSelector"]["matchExpressions"][0]["values"] == ["argocd"]
        assert webhook["sideEffects"] == "None" and webhook["admissionReviewVersions"] == ["v1"]
        assert webhook["timeoutSeconds"] <= 5
        assert webhook["clientConfig"]["url"].startswith("https://127.0.0.1:9443/")
    assert {w["failurePolicy"] for w in validating["webhooks"]} == {"Fail"}
    assert mutating["webhooks"][0]["failurePolicy"] == "Ignore"
    assert [w["rules"][0]["resources"] for w in validating["webhooks"]] == [["applications"], ["applicationsets"]]
    conditions = " ".join(c["expression"] for c in validating["webhooks"][0]["matchConditions"])
    assert '"system:serviceaccount:argocd:argocd-application-controller"' in conditions
    assert '"platform-admins"' in conditions
