"""Unit tests of the tenant guardrail policy, directory and webhook configuration rendering (pure), with the
manifests of guardrails_cases.py (also sent through the real API server by test_webhooks_admission.py)."""
from __future__ import annotations

import asyncio
import copy
import functools
import ssl
from types import SimpleNamespace

import kopf
import pytest

from keyless import pki
from keyless.model.claims import normalize_server
from keyless.webhooks import configuration, handlers, policy, serving
from keyless.webhooks.directory import TenantDirectory, registration_of
from keyless.webhooks.keys import fold
from keyless.webhooks.serving import ReloadingWebhookServer
from keyless.webhooks.watch import DirectoryKeeper

from .guardrails_cases import (A_DEV, A_PROD, ADVERSARIAL, ADVERSARIAL_POLICY_ONLY, ALLOWED, AMBIGUOUS_DESTINATION, B_DEV,
                               KELVIN, LONG_S, MUTATIONS, NAMESPACE_TENANTS, REMOTE_TENANT_CLUSTERS, TENANT, Case,
                               application, remote_tenant_cluster)


def build_directory(bodies=REMOTE_TENANT_CLUSTERS, namespace_tenants=NAMESPACE_TENANTS) -> TenantDirectory:
    return TenantDirectory.from_remote_tenant_clusters(bodies, namespace_tenants=namespace_tenants)


@pytest.fixture(scope="module")
def directory() -> TenantDirectory:
    return build_directory()


def review(case: Case, directory: TenantDirectory) -> policy.Decision:
    if case.manifest["kind"] == "Application":
        return policy.review_application(case.manifest, directory, old=case.old)
    return policy.review_application_set(case.manifest, directory, old=case.old)


def test_the_adversarial_set_is_large_and_distinct():
    names = [c.name for c in ADVERSARIAL]
    assert len(names) == len(set(names)) >= 15
    assert len({c.reason for c in ADVERSARIAL}) >= 10


@pytest.mark.parametrize("case", ADVERSARIAL + ADVERSARIAL_POLICY_ONLY, ids=lambda c: c.name)
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
    app = application("x", "tenant-b", {}, namespace="tenant-b")
    del app["spec"]["destination"]
    assert policy.default_destination_patch(app, directory) == [
        {"op": "add", "path": "/spec/destination", "value": {"server": B_DEV}}]


def test_no_mutation_when_ambiguous_and_the_validator_lists_the_choices(directory):
    assert policy.default_destination_patch(AMBIGUOUS_DESTINATION.manifest, directory) == []
    decision = policy.review_application(AMBIGUOUS_DESTINATION.manifest, directory)
    assert decision.reason == "NoDestination" and A_DEV in decision.message and A_PROD in decision.message


def test_no_mutation_for_applications_that_have_a_destination_or_no_tenant(directory):
    assert policy.default_destination_patch(application("x", "tenant-b", {"name": "b-dev"}, namespace="tenant-b"),
                                            directory) == []
    assert policy.default_destination_patch(application("x", "default", {"namespace": "n"}), directory) == []


def test_no_mutation_from_another_tenants_namespace_or_with_keys_argo_cd_reads_differently(directory):
    # tenant-b's project from tenant-a's namespace: nothing is filled in (the validator refuses it).
    assert policy.default_destination_patch(application("x", "tenant-b", {"namespace": "n"}), directory) == []
    bare = application("x", "tenant-b", {"namespace": "n"}, namespace="tenant-b")
    bare["spec"]["Destination"] = bare["spec"].pop("destination")
    assert policy.default_destination_patch(bare, directory) == []


def test_admins_and_argocd_controllers_are_exempt_and_tenants_are_not():
    exemptions = policy.Exemptions.build(admin_users=["root@example.com"], admin_groups=["platform-admins"])
    assert exemptions.exempts({"username": "root@example.com", "groups": []})
    assert exemptions.exempts({"username": "someone", "groups": ["system:authenticated", "platform-admins"]})
    for account in ("argocd-application-controller", "argocd-applicationset-controller", "argocd-server"):
        assert exemptions.exempts({"username": f"system:serviceaccount:argocd:{account}"})
    assert not exemptions.exempts({"username": "alice", "groups": ["tenant-a-devs", "system:authenticated"]})
    assert not exemptions.exempts({"username": "system:serviceaccount:tenant-a:argocd-server"})
    assert not exemptions.exempts(None)


def test_claims_of_another_tenants_project_server_or_name_change_nothing_for_that_tenant():
    """Finding 2's denial of service: a manifest of tenant-a naming tenant-b's project, server or
    cluster name (in tenant-a's namespace, or claiming to be tenant-b there) counts for nobody."""
    rogues = [
        remote_tenant_cluster("rogue-project", "tenant-a", "https://rogue.example.com", {}, project="tenant-b"),
        remote_tenant_cluster("rogue-server", "tenant-a", B_DEV, {}),
        remote_tenant_cluster("rogue-name", "tenant-a", "https://rogue-2.example.com", {}, cluster_name="b-dev"),
        remote_tenant_cluster("rogue-tenant", "tenant-b", "https://rogue-3.example.com", {}) | {
            "metadata": {"name": "rogue-tenant", "namespace": "tenant-a", "creationTimestamp": "2025-01-01T00:00:00Z"}},
    ]
    for rogue in rogues[1:3]:
        rogue["metadata"]["creationTimestamp"] = "2026-06-01T00:00:00Z"  # claimed after tenant-b did
    directory = build_directory(REMOTE_TENANT_CLUSTERS + rogues)
    for case in ALLOWED:
        assert review(case, directory).allowed, case.name
    for case, server in MUTATIONS:
        assert policy.default_destination_patch(case.manifest, directory)[0]["value"] == server, case.name
    assert directory.tenants_of_server(B_DEV) == {"tenant-b"} and directory.tenants_of_name("b-dev") == {"tenant-b"}
    assert directory.tenant_of_project("tenant-b") == "tenant-b"
    assert {c.source for c in directory.clusters_of("tenant-b")} == {"tenant-b/b-dev"}


def test_a_namespace_relabelled_to_another_tenant_takes_its_clusters_and_apps_along():
    moved = build_directory(namespace_tenants={**NAMESPACE_TENANTS, "tenant-a": "tenant-c"})
    assert not moved.clusters_of("tenant-a")  # its manifests now name the wrong tenant
    assert review(ALLOWED[0], moved).reason == "ProjectOfAnotherTenant"


def test_directory_applies_the_crd_defaults_and_the_tenant_label():
    entry = registration_of(REMOTE_TENANT_CLUSTERS[0]).cluster
    assert (entry.name, entry.project, entry.server) == ("a-dev", "tenant-a", A_DEV)
    assert entry.labels == {"environment": "development", TENANT: "tenant-a"}
    assert normalize_server("HTTPS://Host.Example.com:443/path/") == "https://host.example.com/path"
    assert normalize_server("https://host:8443") != normalize_server("https://host")


@pytest.mark.parametrize("variant", ["Spec", "SPEC", "sPeC", f"{LONG_S}pec", f"{LONG_S.upper()}PEC"])
def test_keys_fold_like_go_encoding_json(variant):
    assert fold(variant) == fold("spec")


def test_kelvin_sign_and_dotted_i_fold_to_ascii_but_other_letters_do_not():
    assert fold(f"{KELVIN}ey") == fold("key") and fold("\u0130mage") == fold("image") == fold("\u0131mage")
    assert fold("\u0455pec") != fold("spec")  # Cyrillic dze looks like s but is another letter


class FakeKube:
    """Just enough of keyless.kube.Kube for the informer: one listing, then queued watch events."""

    def __init__(self, items: list[dict], namespaces: list[dict] | None = None):
        self.items = items
        self.namespaces = namespaces or []
        self.events: asyncio.Queue = asyncio.Queue()

    async def list(self, path, label_selector=None, field_selector=None) -> dict:
        items = self.namespaces if path.endswith("/namespaces") else self.items
        return {"items": items, "metadata": {"resourceVersion": "1"}}

    async def watch(self, path, resource_version=None, label_selector=None, timeout_seconds=300, field_selector=None):
        while True:
            if path.endswith("/namespaces"):
                await asyncio.Event().wait()  # namespaces do not change in this test
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
        namespaces = [{"metadata": {"name": n, "labels": {TENANT: t}}} for n, t in NAMESPACE_TENANTS.items()]
        kube = FakeKube(REMOTE_TENANT_CLUSTERS[:1], namespaces)
        keeper = DirectoryKeeper(kube)
        assert not keeper.directory.ready
        keeper.start()
        await keeper.informer.synced.wait()
        await keeper.namespaces.synced.wait()
        assert keeper.directory.ready and keeper.directory.tenants_of_server(A_DEV) == {"tenant-a"}
        await kube.events.put({"type": "ADDED", "object": REMOTE_TENANT_CLUSTERS[2]})
        assert await _settle(lambda: keeper.directory.tenants_of_name("b-dev") == {"tenant-b"})
        await kube.events.put({"type": "DELETED", "object": REMOTE_TENANT_CLUSTERS[2]})
        assert await _settle(lambda: not keeper.directory.tenants_of_name("b-dev"))
        await keeper.stop()

    asyncio.run(scenario())


def _memo(directory: TenantDirectory) -> kopf.Memo:
    """What configure_admission leaves in kopf's memo, with a prepared directory."""
    return kopf.Memo(guardrails=handlers.Guardrails(
        keeper=SimpleNamespace(directory=directory),
        exemptions=policy.Exemptions.build(admin_groups=["platform-admins"])))


def test_handlers_refuse_tenant_requests_until_the_directory_is_synced():
    memo = _memo(TenantDirectory(ready=False))
    app = application("x", "tenant-b", {"server": A_DEV}, namespace="tenant-b")
    with pytest.raises(kopf.AdmissionError) as refused:
        asyncio.run(handlers.validate_application(body=app, old=None, userinfo={"username": "bob"}, memo=memo))
    assert refused.value.code == 503 and "retry" in str(refused.value)
    # Admins are not blocked by an unsynced directory.
    asyncio.run(handlers.validate_application(body=app, old=None, memo=memo,
                                              userinfo={"username": "carol", "groups": ["platform-admins"]}))


def test_handlers_refuse_with_reason_and_exempt_admins(directory):
    memo = _memo(directory)
    case = next(c for c in ADVERSARIAL if c.name == "appset-gotemplate-project-index")
    with pytest.raises(kopf.AdmissionError) as refused:
        asyncio.run(handlers.validate_application_set(body=case.manifest, old=None, userinfo={"username": "alice"},
                                                      memo=memo))
    assert refused.value.code == 403 and str(refused.value).startswith("TemplatedProject: ")
    asyncio.run(handlers.validate_application_set(
        body=case.manifest, old=None, memo=memo,
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
        assert "namespaceSelector" not in webhook  # apps in any namespace: every namespace is reviewed
        assert webhook["sideEffects"] == "None" and webhook["admissionReviewVersions"] == ["v1"]
        assert webhook["timeoutSeconds"] <= 5
        assert webhook["clientConfig"]["url"].startswith("https://127.0.0.1:9443/")
    assert {w["failurePolicy"] for w in validating["webhooks"]} == {"Fail"}
    assert mutating["webhooks"][0]["failurePolicy"] == "Ignore"
    assert [w["rules"][0]["resources"] for w in validating["webhooks"]] == [["applications"], ["applicationsets"]]
    conditions = " ".join(c["expression"] for c in validating["webhooks"][0]["matchConditions"])
    assert '"system:serviceaccount:argocd:argocd-application-controller"' in conditions
    assert '"platform-admins"' in conditions
