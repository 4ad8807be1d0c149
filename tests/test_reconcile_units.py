"""Pure pieces of the operator, without a cluster: condition merging, the claim ordering, compare-before-write,
the error classification and back-off, the status builder and the step table's own consistency."""
from __future__ import annotations

import dataclasses
import itertools

import pytest

from keyless.backoff import backoff_delay_seconds
from keyless.kube import KubeError
from keyless.kube.apply import contains
from keyless.model import conditions as c
from keyless.model.claims import Claim, ClaimIndex
from keyless.reconcile import steps
from keyless.reconcile.context import Flow
from keyless.reconcile.errors import Retry, classify
from keyless.reconcile.status import ClusterStatus
from keyless.settings import OperatorSettings


# ---- conditions.merge ---------------------------------------------------------------------------------------
def stored(kind: str, status: str, reason: str = "R", since: str = "2026-01-01T00:00:00Z", generation: int = 1) -> dict:
    return {"type": kind, "status": status, "reason": reason, "message": "", "lastTransitionTime": since,
            "observedGeneration": generation}


def test_merge_keeps_the_transition_time_while_the_status_stays_and_stamps_a_new_one_when_it_flips():
    old = [stored("ProxyReady", "True"), stored("TokenVerified", "False")]
    merged = {m["type"]: m for m in c.merge(old, [c.Condition("ProxyReady", "True", "OtherReason", "new text"),
                                                   c.Condition("TokenVerified", "True", "Verified")], 2)}
    # Same status, other reason and message: still the same since when it became True.
    assert merged["ProxyReady"]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert merged["ProxyReady"]["reason"] == "OtherReason" and merged["ProxyReady"]["message"] == "new text"
    assert merged["TokenVerified"]["lastTransitionTime"] != "2026-01-01T00:00:00Z"
    assert {m["observedGeneration"] for m in merged.values()} == {2}


def test_merge_drops_conditions_no_longer_wanted_and_adds_new_ones_in_the_wanted_order():
    merged = c.merge([stored("ClusterProfilePublished", "True")],
                     [c.Condition("Ready", "False", "X"), c.Condition("ArgoClusterRegistered", "True", "Registered")], 1)
    assert [m["type"] for m in merged] == ["Ready", "ArgoClusterRegistered"]
    assert all(m["lastTransitionTime"] for m in merged)


def test_a_merge_that_changes_nothing_is_not_a_change_and_one_that_moves_the_generation_is():
    old = c.merge(None, [c.Condition("Ready", "True", "Reconciled")], 3)
    assert not c.changed(old, c.merge(old, [c.Condition("Ready", "True", "Reconciled")], 3))
    assert c.changed(old, c.merge(old, [c.Condition("Ready", "True", "Reconciled")], 4))


# ---- the claim ordering ---------------------------------------------------------------------------------------
def claim(ref: str, created: str, name: str = "dev", server: str = "https://a.example.com", tenant: str = "t") -> Claim:
    namespace = ref.split("/")[0]
    return Claim(ref=ref, namespace=namespace, tenant=tenant, created=created, argocd_namespace="argocd",
                 cluster_name=name, server=server, audience=f"keyless:{namespace}:{ref.split('/')[1]}")


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_the_oldest_claim_holds_whatever_order_the_manifests_arrive_in(order):
    claims = [claim("a/one", "2026-01-01T00:00:00Z"), claim("b/two", "2026-01-02T00:00:00Z"),
              claim("c/three", "2026-01-03T00:00:00Z", tenant="other")]
    index = ClaimIndex([claims[i] for i in order])
    assert index.conflict(claims[0]) is None
    assert "RemoteTenantCluster a/one" in index.conflict(claims[1])
    # Another tenant's later claim loses too, without learning whose cluster it is.
    third = index.conflict(claims[2])
    assert "another tenant" in third and "a/one" not in third


def test_equal_timestamps_are_ordered_by_reference_so_every_replica_agrees():
    same = "2026-01-01T00:00:00Z"
    first, second = claim("a/x", same), claim("b/x", same)
    for index in (ClaimIndex([first, second]), ClaimIndex([second, first])):
        assert index.conflict(first) is None and index.conflict(second)


def test_a_claim_is_held_key_by_key_and_server_spellings_are_one_server():
    holder = claim("a/one", "2026-01-01T00:00:00Z", name="dev", server="https://a.example.com")
    other_name_same_server = claim("b/two", "2026-01-02T00:00:00Z", name="prod", server="HTTPS://A.example.com:443/")
    unrelated = claim("c/three", "2026-01-03T00:00:00Z", name="stage", server="https://c.example.com")
    index = ClaimIndex([unrelated, other_name_same_server, holder])
    assert "server" in index.conflict(other_name_same_server)
    assert index.conflict(unrelated) is None


# ---- apply.contains (compare before write) -----------------------------------------------------------------------
def test_contains_ignores_what_the_server_adds_but_not_what_differs():
    desired = {"metadata": {"name": "x", "labels": {"a": "1"}}, "data": {"k": "v"}}
    live = {"metadata": {"name": "x", "labels": {"a": "1", "added-by-someone": "z"}, "uid": "u",
                         "resourceVersion": "7"}, "data": {"k": "v"}, "type": "Opaque"}
    assert contains(live, desired)
    assert not contains({**live, "data": {"k": "edited"}}, desired)
    assert not contains({"metadata": live["metadata"]}, desired)  # a field we want is missing


def test_contains_compares_lists_element_by_element_and_whole():
    desired = {"rules": [{"verbs": ["get"]}, {"verbs": ["list"]}]}
    assert contains({"rules": [{"verbs": ["get"], "extra": 1}, {"verbs": ["list"]}]}, desired)
    assert not contains({"rules": [{"verbs": ["list"]}, {"verbs": ["get"]}]}, desired)  # order matters
    assert not contains({"rules": [{"verbs": ["get"]}]}, desired)  # a shorter list is drift
    assert not contains({"rules": [*desired["rules"], {"verbs": ["watch"]}]}, desired)  # so is a longer one
    assert not contains({"rules": "get,list"}, desired)
    assert contains("x", "x") and not contains("x", "y") and not contains(None, "x")


# ---- errors: permanent vs transient ----------------------------------------------------------------------------
@pytest.mark.parametrize("status, reason", [(400, "BadRequest"), (403, "Forbidden"), (422, "Invalid"),
                                            (413, "RequestEntityTooLarge")])
def test_a_request_the_api_refused_as_it_is_is_permanent_and_keeps_the_apis_words(status, reason):
    failure = classify(KubeError(status, reason, "admission webhook said: spec.audience is refused"), 600)
    assert failure.retry is Retry.PERMANENT
    assert failure.reason == reason
    assert "spec.audience is refused" in failure.message and f"HTTP {status}" in failure.message
    assert "600 s" in failure.message


@pytest.mark.parametrize("error", [KubeError(401, "Unauthorized", ""), KubeError(404, "NotFound", "namespace x"),
                                   KubeError(409, "Conflict", ""), KubeError(429, "TooManyRequests", ""),
                                   KubeError(500, "InternalError", ""), KubeError(503, "", ""),
                                   ConnectionRefusedError(), TimeoutError()])
def test_everything_else_is_transient(error):
    failure = classify(error, 600)
    assert failure.retry is Retry.TRANSIENT and failure.reason == "APIError"


def test_a_transient_failure_outranks_a_permanent_one_in_the_same_reconcile():
    assert max(Retry.NONE, Retry.PERMANENT, Retry.TRANSIENT) is Retry.TRANSIENT
    assert max(Retry.NONE, Retry.PERMANENT) is Retry.PERMANENT


def test_backoff_doubles_up_to_its_cap_and_is_jittered_within_the_upper_half():
    ceilings = [backoff_delay_seconds(n, 1.0, base=5, cap=300) for n in range(1, 10)]
    assert ceilings == [5, 10, 20, 40, 80, 160, 300, 300, 300]
    for n in range(1, 10):
        low, high = backoff_delay_seconds(n, 0.0, base=5, cap=300), backoff_delay_seconds(n, 1.0, base=5, cap=300)
        assert low == high / 2
        assert low < backoff_delay_seconds(n, 0.5, base=5, cap=300) < high


# ---- the status builder --------------------------------------------------------------------------------------
def test_status_is_written_only_when_it_changed_and_ready_names_the_first_failing_step():
    steps_ = {"ArgoClusterRegistered": c.Condition("ArgoClusterRegistered", "True", "Registered"),
              "TokenVerified": c.Condition("TokenVerified", "False", "TokenRejected", "no")}
    status = ClusterStatus.of(2, steps_)
    status.add_step_fields({"authenticationConfiguration": "doc"})
    patch = status.patch({})
    assert patch["observedGeneration"] == 2 and patch["authenticationConfiguration"] == "doc"
    assert [x["type"] for x in patch["conditions"]] == ["Ready", "ArgoClusterRegistered", "TokenVerified"]
    assert patch["conditions"][0]["reason"] == "TokenRejected"
    assert status.patch(patch) is None  # the same status again: nothing to write
    with pytest.raises(ValueError, match="unknown status fields"):
        status.add_step_fields({"token": "x"})


# ---- the step table --------------------------------------------------------------------------------------------
def test_each_condition_has_exactly_one_owning_step_and_amendments_come_after_their_owner():
    owners = [s.condition for s in steps.STEPS if s.condition is not None]
    assert len(owners) == len(set(owners))
    assert set(owners) == set(c.REPORTED_CONDITIONS)
    for index, step in enumerate(steps.STEPS):
        if step.amends is not None:
            assert step.condition is None
            assert step.amends in [s.condition for s in steps.STEPS[:index]]


def test_what_a_step_needs_is_given_by_an_earlier_step_or_the_context():
    flow_fields = {f.name for f in dataclasses.fields(Flow)}
    context_fields = {"broker_ca_pem"}
    given: set[str] = set(context_fields)
    for step in steps.STEPS:
        assert set(step.gives) <= flow_fields, step.name
        for need in step.needs:
            assert need in given or need in step.gives, f"{step.name} needs {need} before anything gives it"
        given |= set(step.gives)


def test_optional_steps_run_only_when_their_feature_is_on():
    assert c.CLUSTER_PROFILE_PUBLISHED not in [s.condition for s in steps.active(OperatorSettings())]
    assert c.CLUSTER_PROFILE_PUBLISHED in [s.condition for s in steps.active(OperatorSettings(cluster_profiles=True))]


# ---- proxy CA rotation: the previous CA comes only from this manifest's own Argo CD Secret -----------------
def test_a_rotation_keeps_as_previous_ca_only_what_this_manifests_own_argocd_secret_trusts():
    """Argo CD Secret names can collide across tenants (`a-b`/`c` and `a`/`b-c` share keyless-a-b-c). A
    rotation must not pick up the CA of a Secret another manifest owns: only the owner annotation decides."""
    import asyncio
    import base64
    import json
    from types import SimpleNamespace

    from keyless.model.spec import parse
    from keyless.pki import new_ca
    from keyless.reconcile.proxy_pki import _registered_ca

    cluster = parse({"metadata": {"name": "b-c", "namespace": "a", "creationTimestamp": "2026-01-01T00:00:00Z",
                                  "uid": "u"},
                     "spec": {"tenant": "a", "server": "https://proxy.a.example.com",
                              "access": {"clusterRole": "view"}, "proxy": {"mode": "Managed"},
                              "bootstrap": {"kubeconfigSecretRef": {"name": "boot"}}}})
    pem = new_ca("someone")[0].cert_pem
    config = base64.b64encode(json.dumps({"tlsClientConfig": {"caData": base64.b64encode(pem).decode()}}).encode())

    def secret(owner: str) -> dict:
        return {"metadata": {"annotations": {"keyless.dev/owner": owner}}, "data": {"config": config.decode()}}

    class Kube:
        def __init__(self, live):
            self.live = live

        async def get(self, path):
            return self.live

    def previous(live):
        return asyncio.run(_registered_ca(SimpleNamespace(kube=Kube(live)), cluster))

    assert previous(secret(cluster.ref)) == pem
    assert previous(secret("a-b/c")) is None  # the colliding name of another manifest
    assert previous(None) is None


def test_tenant_cluster_counts_kept_per_change_equal_a_recount_of_every_manifest():
    """keyless_operator_tenant_clusters moves by each manifest's change (a recount per change was O(N) at
    5,000 manifests): after any history of changes and deletions it shows exactly a recount, and a
    (condition, status) no manifest has is gone from the exposition."""
    import random

    from keyless.reconcile import metrics

    rng = random.Random(5)
    refs = [f"bench-metrics/m{i}" for i in range(12)]
    kinds = [c.READY, c.ARGO_CLUSTER_REGISTERED, c.TOKEN_VERIFIED]
    try:
        for _ in range(400):
            ref = rng.choice(refs)
            if rng.random() < 0.2:
                metrics.forget(ref)
            else:
                metrics.observe_conditions(ref, [c.Condition(kind, rng.choice([c.TRUE, c.FALSE, c.UNKNOWN]), "R", "m")
                                                 for kind in rng.sample(kinds, rng.randint(0, 3))])
            recount: dict[tuple[str, str], int] = {}
            for conditions in metrics._latest.values():
                for kind, status in conditions.items():
                    recount[(kind, status)] = recount.get((kind, status), 0) + 1
            shown = {(s.labels["condition"], s.labels["status"]): s.value
                     for family in metrics.TENANT_CLUSTERS.collect() for s in family.samples}
            assert shown == recount
    finally:
        for ref in refs:
            metrics.forget(ref)
