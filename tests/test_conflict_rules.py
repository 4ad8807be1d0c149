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


def test_the_claims_view_kept_up_to_date_one_change_at_a_time_equals_one_built_from_scratch():
    """The operator no longer rebuilds its view of who holds what for every new manifest (O(N^2) over a
    fleet): it applies each change. After every step of a random history of creates, edits, deletions
    and deletions in progress, with colliding servers, names and audiences, across tenants, namespaces
    and projects, the kept view must judge exactly as a fresh one: the same holders, holding manifests,
    conflicts and AppProject members."""
    import random

    from keyless.reconcile.conflicts import ClaimsView
    from keyless.reconcile.context import ClusterRegistry

    rng = random.Random(14)
    tenants = {"team-a": "team-a", "team-b": "team-b", "team-c": "team-c"}  # team-x: nobody's namespace
    registry = ClusterRegistry()
    kept = ClaimsView((), tenants.get)

    def random_manifest(name: str) -> dict:
        namespace = rng.choice(["team-a", "team-b", "team-c", "team-x"])
        m = manifest(name, namespace, f"2026-01-0{rng.randint(1, 3)}T00:00:00Z",
                     tenant=namespace if rng.random() < 0.9 else "team-b",
                     server=f"https://s{rng.randint(0, 6)}.example.com" + rng.choice(["", "/", ":443"]))
        tenant = m["spec"]["tenant"]
        m["spec"]["argocd"] = {"clusterName": f"c{rng.randint(0, 6)}", "project": rng.choice([tenant, f"{tenant}.prod"])}
        if rng.random() < 0.3:
            m["spec"]["access"]["audience"] = f"keyless:{namespace}:aud{rng.randint(0, 2)}"
        return m

    parsed = conflicts = 0
    for step in range(600):
        name = f"m{rng.randint(0, 25)}"
        ref = f"{rng.choice(['team-a', 'team-b', 'team-c', 'team-x'])}/{name}"
        action = rng.random()
        if action < 0.6:
            try:
                cluster = parse(random_manifest(name))
            except SpecError:
                continue
            registry.put(cluster)
            parsed += 1
        elif action < 0.8 and registry.clusters:
            registry.mark_deleting(rng.choice(sorted(registry.clusters)))
        elif registry.clusters:
            registry.remove(rng.choice(sorted(registry.clusters)) if action < 0.95 else ref)
        for changed in list(registry.changed):
            kept.update(changed, registry.live_one(changed))
        registry.changed.clear()

        fresh = ClaimsView(registry.live(), tenants.get)
        assert {k: v.ref for k, v in kept.index.holders.items()} == {k: v.ref for k, v in fresh.index.holders.items()}, step
        assert sorted(kept.holding) == sorted(fresh.holding), step
        assert sorted(kept.clusters) == sorted(fresh.clusters), step
        for cluster in registry.clusters.values():
            assert kept.conflict(cluster) == fresh.conflict(cluster), (step, cluster.ref)
            conflicts += fresh.conflict(cluster) is not None
            key = (cluster.argocd.namespace, cluster.argocd.project, cluster.tenant)
            assert sorted(c.ref for c in kept.members(*key)) == sorted(c.ref for c in fresh.members(*key)), step
    assert parsed > 300 and conflicts > 1000, (parsed, conflicts)  # the history did collide


def test_the_secret_index_finds_the_same_conflict_as_a_scan_of_every_secret():
    """find_secret_conflict is given only the Secrets sharing the cluster's server or name (SecretIndex)
    instead of all of them: it must reach the same verdict, message included, as with all of them."""
    import random

    from keyless.reconcile.conflicts import SecretIndex, find_secret_conflict
    from keyless.reconcile.context import ArgoClusterSecret

    rng = random.Random(7)
    for _ in range(300):
        secrets = [ArgoClusterSecret(name=f"s{i}", cluster_name=f"c{rng.randint(0, 5)}",
                                     server=f"https://s{rng.randint(0, 5)}.example.com" + rng.choice(["", "/"]),
                                     owner=rng.choice([None, "team-a/m1", "team-b/m2"]),
                                     adopt_by=rng.choice([None, None, "team-a/m1"]))
                   for i in range(rng.randint(0, 12))]
        m = manifest("m1", "team-a", "2026-01-01T00:00:00Z", server=f"https://s{rng.randint(0, 5)}.example.com")
        m["spec"]["argocd"] = {"clusterName": f"c{rng.randint(0, 5)}"}
        cluster = parse(m)
        own = rng.choice(["s0", "s1", "keyless-team-a-m1"])
        index = SecretIndex(secrets)
        assert find_secret_conflict(cluster, own, index.sharing_server_or_name(cluster)) == \
            find_secret_conflict(cluster, own, secrets)
        assert [s.name for s in index.owned_by(cluster.ref)] == [s.name for s in secrets if s.owner == cluster.ref]


def test_the_secret_index_kept_one_change_at_a_time_answers_as_one_built_from_scratch():
    """The operator updates the index as the informer hears each Secret come, change and go (a rebuild per
    created Secret made 5,000 manifests cost O(N^2)): after any history it answers exactly as an index
    built from the informer's items, order included."""
    import random

    from keyless.reconcile.conflicts import SecretIndex
    from keyless.reconcile.context import ArgoClusterSecret

    rng = random.Random(11)
    owners = [None, "team-a/m1", "team-b/m2", "team-a/m3"]
    probes = [parse(manifest(f"m{i}", "team-a", "2026-01-01T00:00:00Z", server=f"https://s{i}.example.com"))
              for i in range(6)]
    for round_ in range(60):
        items: dict[str, ArgoClusterSecret] = {}  # what the informer holds, in its order
        index = SecretIndex()
        for step in range(rng.randint(1, 80)):
            name = f"s{rng.randint(0, 15)}"
            if rng.random() < 0.3:
                items.pop(name, None)
                index.update(name, None)
            else:
                secret = ArgoClusterSecret(name=name, cluster_name=f"c{rng.randint(0, 5)}",
                                           server=f"https://s{rng.randint(0, 5)}.example.com" + rng.choice(["", "/"]),
                                           owner=rng.choice(owners), adopt_by=rng.choice([None, None, "team-a/m1"]))
                items[name] = secret  # a changed Secret keeps its place in the dict, a new one goes last
                index.update(name, secret)
            fresh = SecretIndex(items.values())
            for cluster in probes:
                where = (round_, step, cluster.ref)
                assert index.sharing_server_or_name(cluster) == fresh.sharing_server_or_name(cluster), where
                assert index.owned_by(cluster.ref) == fresh.owned_by(cluster.ref), where
                assert index.marked_for(cluster.ref) == fresh.marked_for(cluster.ref), where
            for owner in owners[1:]:
                assert index.owned_by(owner) == [s for s in items.values() if s.owner == owner]
