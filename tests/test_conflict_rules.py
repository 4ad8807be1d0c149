"""Pure claim rules: a manifest counts only in its tenant's namespace, and the first claim of a cluster
name, server or token audience keeps it, whoever the later claimant is."""
from __future__ import annotations

import pytest

from keyless.model.claims import ClaimIndex, claim_of, namespace_problem
from keyless.model.spec import SpecError, parse
from keyless.reconcile.conflicts import counting


def find_cluster_conflict(cluster, manifests) -> str | None:
    """What the operator's index says about `cluster` among `manifests` (all of which count)."""
    return ClaimIndex(claim_of(m) for m in manifests).conflict(claim_of(cluster))


def manifest(name: str, namespace: str, created: str, tenant: str | None = None, server: str | None = None,
             **access) -> dict:
    return {"metadata": {"name": name, "namespace": namespace, "creationTimestamp": created, "uid": name},
            "spec": {"tenant": tenant or namespace, "server": server or f"https://{name}.example.com",
                     "access": {"clusterRole": "view", **access}, "proxy": {"mode": "External"}}}


def test_an_audience_of_another_namespace_cannot_even_be_named():
    victim = parse(manifest("a", "team-a", "2026-02-01T00:00:00Z"))
    with pytest.raises(SpecError, match="must start with keyless:team-b:"):
        parse(manifest("b", "team-b", "2026-01-01T00:00:00Z", audience=victim.access.audience))


def test_within_a_namespace_the_first_claim_of_an_audience_keeps_it():
    first = parse(manifest("a", "team-a", "2026-01-01T00:00:00Z", audience="keyless:team-a:shared"))
    later = parse(manifest("b", "team-a", "2026-02-01T00:00:00Z", audience="keyless:team-a:shared"))
    message = find_cluster_conflict(later, [first, later])
    assert message and "token audience" in message and "team-a/a" in message
    assert find_cluster_conflict(first, [first, later]) is None


def test_another_tenants_later_claim_of_a_server_loses_and_is_not_told_whose_it_is():
    holder = parse(manifest("b-dev", "team-b", "2026-01-01T00:00:00Z", server="https://b.example.com"))
    thief = parse(manifest("x", "team-a", "2026-03-01T00:00:00Z", server="HTTPS://B.example.com:443"))
    message = find_cluster_conflict(thief, [holder, thief])
    assert message and "another tenant" in message and "team-b" not in message
    assert find_cluster_conflict(holder, [holder, thief]) is None


def test_the_holder_of_a_name_is_the_oldest_claim_and_ties_are_broken_by_reference():
    same_second = "2026-01-01T00:00:00Z"
    one = claim_of(parse(manifest("one", "team-a", same_second)))
    two = claim_of(parse(manifest("one", "team-b", same_second)))  # same default cluster name "one"
    index = ClaimIndex([two, one])
    assert index.conflict(one) is None and "cluster name 'one'" in index.conflict(two)


def test_only_manifests_in_their_tenants_namespace_count():
    owned = parse(manifest("a", "team-a", "2026-01-01T00:00:00Z"))
    squatter = parse(manifest("b", "team-a", "2026-01-01T00:00:00Z", tenant="team-b"))
    tenants = {"team-a": "team-a"}
    assert [c.ref for c in counting([owned, squatter], tenants.get)] == ["team-a/a"]
    assert "belongs to tenant team-a, not team-b" in namespace_problem("team-a", "team-b", "team-a")
    assert "kubectl label namespace scratch keyless.dev/tenant=team-a" in namespace_problem("scratch", "team-a", None)
    assert namespace_problem("team-a", "team-a", "team-a") is None


def test_a_project_is_the_tenants_own_name_or_its_name_and_a_dot():
    assert parse(manifest("a", "team-a", "2026-01-01T00:00:00Z")).argocd.project == "team-a"
    body = manifest("a", "team-a", "2026-01-01T00:00:00Z")
    body["spec"]["argocd"] = {"project": "team-a.prod"}
    assert parse(body).argocd.project == "team-a.prod"
    for foreign in ("team-b", "team-a-prod", "team-ab"):
        body["spec"]["argocd"] = {"project": foreign}
        with pytest.raises(SpecError, match="spec.argocd.project must be team-a"):
            parse(body)


def test_distinct_manifests_do_not_conflict():
    one = parse(manifest("a", "ns", "2026-01-01T00:00:00Z"))
    two = parse(manifest("b", "ns", "2026-01-02T00:00:00Z"))
    assert find_cluster_conflict(two, [one, two]) is None
