"""Pure conflict rules: the oldest manifest keeps a cluster name, server or token audience."""
from __future__ import annotations

from keyless.model.spec import parse
from keyless.reconcile.conflicts import find_cluster_conflict


def manifest(name: str, namespace: str, created: str, **access) -> dict:
    return {"metadata": {"name": name, "namespace": namespace, "creationTimestamp": created, "uid": name},
            "spec": {"tenant": name, "server": f"https://{name}.example.com", "caData": None,
                     "access": {"clusterRole": "view", **access}, "proxy": {"mode": "External"}}}


def test_a_younger_manifest_cannot_take_another_clusters_audience_even_across_argocd_namespaces():
    victim = parse(manifest("a", "team-a", "2026-01-01T00:00:00Z"))
    thief = parse(manifest("b", "team-b", "2026-02-01T00:00:00Z", audience=victim.access.audience))
    thief = thief.__class__(**{**thief.__dict__, "argocd": thief.argocd.__class__(
        **{**thief.argocd.__dict__, "namespace": "argocd-2"})})
    message = find_cluster_conflict(thief, [victim, thief])
    assert message and "token audience" in message and "team-a/a" in message
    assert find_cluster_conflict(victim, [victim, thief]) is None


def test_distinct_manifests_do_not_conflict():
    one = parse(manifest("a", "ns", "2026-01-01T00:00:00Z"))
    two = parse(manifest("b", "ns", "2026-01-02T00:00:00Z"))
    assert find_cluster_conflict(two, [one, two]) is None
