"""Which manifests count, and whether one of them holds what another claims (pure).

The rules themselves live in `model.claims`, shared with the admission webhooks so that both judge
a tenant cluster the same way; this module applies them to parsed manifests and live Secrets.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from ..model import names
from ..model.claims import Claim, ClaimIndex, claim_of, namespace_problem, normalize_server
from ..model.spec import RemoteTenantCluster


def counting(clusters: Iterable[RemoteTenantCluster],
             namespace_tenant: Callable[[str], str | None]) -> list[RemoteTenantCluster]:
    """The manifests that live in a namespace of their own tenant: only those claim anything."""
    return [c for c in clusters if namespace_problem(c.namespace, c.tenant, namespace_tenant(c.namespace)) is None]


class _Holding:
    """`ref in view.holding`: the manifest counts and holds every value it claims (judged when asked)."""

    def __init__(self, view: "ClaimsView"):
        self._view = view

    def __contains__(self, ref: object) -> bool:
        claim = self._view.claims.get(ref)  # type: ignore[arg-type]
        return claim is not None and self._view.index.conflict(claim) is None

    def __iter__(self):
        return (ref for ref in list(self._view.claims) if ref in self)


class ClaimsView:
    """Every manifest that counts, what each claims and which of them hold all their claims.

    Kept up to date one manifest at a time (`update`): rebuilding it for every new manifest made a fleet
    of N manifests cost O(N^2) (5,000 took minutes of CPU). Holders are the same as `ClaimIndex` gives
    for the same manifests: per value, the most senior claimant (oldest, then by name)."""

    def __init__(self, clusters: Iterable[RemoteTenantCluster], namespace_tenant: Callable[[str], str | None]):
        self._namespace_tenant = namespace_tenant
        self.clusters: dict[str, RemoteTenantCluster] = {}
        self.claims: dict[str, Claim] = {}
        self.index = ClaimIndex(())
        self._claimants: dict[tuple[str, ...], dict[str, Claim]] = {}
        self._projects: dict[tuple[str, str, str], dict[str, RemoteTenantCluster]] = {}
        self.holding = _Holding(self)
        for cluster in counting(clusters, namespace_tenant):
            self._add(cluster)

    @property
    def counting(self) -> list[RemoteTenantCluster]:
        return list(self.clusters.values())

    def update(self, ref: str, cluster: RemoteTenantCluster | None) -> None:
        """`ref` changed: its new parsed manifest, or None when it is gone or being deleted."""
        self._remove(ref)
        if cluster is not None and counting([cluster], self._namespace_tenant):
            self._add(cluster)

    def members(self, argocd_namespace: str, project: str, tenant: str) -> list[RemoteTenantCluster]:
        """The counting manifests of one tenant's AppProject that hold all their claims."""
        return [c for ref, c in self._projects.get((argocd_namespace, project, tenant), {}).items()
                if ref in self.holding]

    def conflict(self, cluster: RemoteTenantCluster) -> str | None:
        """A message if another counting manifest claimed this cluster's name, server or audience first."""
        return self.index.conflict(self.claims.get(cluster.ref) or claim_of(cluster))

    def _add(self, cluster: RemoteTenantCluster) -> None:
        claim = claim_of(cluster)
        self.clusters[cluster.ref], self.claims[cluster.ref] = cluster, claim
        holders = self.index.holders
        for key in claim.keys():
            self._claimants.setdefault(key, {})[cluster.ref] = claim
            holder = holders.get(key)
            if holder is None or claim.seniority < holder.seniority:
                holders[key] = claim
        project = (cluster.argocd.namespace, cluster.argocd.project, cluster.tenant)
        self._projects.setdefault(project, {})[cluster.ref] = cluster

    def _remove(self, ref: str) -> None:
        claim, cluster = self.claims.pop(ref, None), self.clusters.pop(ref, None)
        if claim is None or cluster is None:
            return
        holders = self.index.holders
        for key in claim.keys():
            claimants = self._claimants.get(key, {})
            claimants.pop(ref, None)
            if not claimants:
                self._claimants.pop(key, None)
                holders.pop(key, None)
            elif holders[key].ref == ref:
                holders[key] = min(claimants.values(), key=lambda c: c.seniority)
        project = (cluster.argocd.namespace, cluster.argocd.project, cluster.tenant)
        members = self._projects.get(project, {})
        members.pop(ref, None)
        if not members:
            self._projects.pop(project, None)


class SecretIndex:
    """The Argo CD cluster Secrets of one namespace (informer projections, keyed by name) by what reconciles
    look up: normalized server, cluster name, owner and adopt-by mark, each answer in the informer's order.
    Kept current one change at a time (`update`, as the informer hears it): scanning every Secret on every
    reconcile cost O(N) each, and so did rebuilding the index after each Secret a reconcile created."""

    def __init__(self, secrets: Iterable = ()):
        self._held: dict[str, tuple[int, Any]] = {}  # name -> (position in the informer's order, secret)
        self._next = 0
        self._buckets: dict[str, dict[str, dict[str, Any]]] = {"server": {}, "name": {}, "owner": {}, "adopt_by": {}}
        for secret in secrets:
            self.update(secret.name, secret)

    @staticmethod
    def _keys(secret) -> dict[str, str | None]:
        return {"server": normalize_server(secret.server), "name": secret.cluster_name, "owner": secret.owner,
                "adopt_by": secret.adopt_by}

    def update(self, name: str, secret) -> None:
        """The Secret named `name` is now `secret` (None: gone). A changed Secret keeps its place in the
        order, a new one goes last, as in the informer's dict."""
        held = self._held.pop(name, None)
        if held is not None:
            for bucket, key in self._keys(held[1]).items():
                if key:
                    members = self._buckets[bucket][key]
                    members.pop(name, None)
                    if not members:
                        del self._buckets[bucket][key]
        if secret is None:
            return
        if held is not None:
            position = held[0]
        else:
            position, self._next = self._next, self._next + 1
        self._held[name] = (position, secret)
        for bucket, key in self._keys(secret).items():
            if key:
                self._buckets[bucket].setdefault(key, {})[name] = secret

    def _in_order(self, *groups: dict[str, Any]) -> list:
        found = {name: secret for group in groups for name, secret in group.items()}
        return [secret for _, secret in sorted((self._held[name][0], secret) for name, secret in found.items())] \
            if len(found) > 1 else list(found.values())

    def sharing_server_or_name(self, cluster: RemoteTenantCluster) -> list:
        """The Secrets registering this cluster's server or cluster name, in the informer's order."""
        return self._in_order(self._buckets["server"].get(normalize_server(cluster.server), {}),
                              self._buckets["name"].get(cluster.argocd.cluster_name, {}))

    def owned_by(self, ref: str) -> list:
        return self._in_order(self._buckets["owner"].get(ref, {}))

    def marked_for(self, ref: str) -> list:
        """Secrets marked keyless.dev/adopt-by `ref` (only those Keyless does not own carry the mark)."""
        return self._in_order(self._buckets["adopt_by"].get(ref, {}))


def marked_for(cluster: RemoteTenantCluster, secret) -> bool:
    """An Argo CD cluster Secret Keyless does not own that an admin marked keyless.dev/adopt-by this manifest.
    Only writers of the Argo CD namespace can set the mark (tenants cannot), and it names one manifest."""
    return secret.owner is None and secret.adopt_by is not None and secret.adopt_by == cluster.ref


def adoption_problem(cluster: RemoteTenantCluster, secret) -> str | None:
    """Why a Secret marked for this manifest cannot be taken over by it (None: it can). It must register
    the same server (so a mark never moves another cluster's registration) under the same cluster name
    (Applications that name the cluster keep it)."""
    if normalize_server(secret.server) != normalize_server(cluster.server):
        return f"it registers server {secret.server!r}, not spec.server {cluster.server!r}"
    if secret.cluster_name != cluster.argocd.cluster_name:
        return (f"its cluster name {secret.cluster_name!r} is not spec.argocd.clusterName "
                f"{cluster.argocd.cluster_name!r} (Applications that name the cluster would lose it); set "
                f"spec.argocd.clusterName to {secret.cluster_name!r}")
    return None


def adoptable(cluster: RemoteTenantCluster, secret) -> bool:
    return marked_for(cluster, secret) and adoption_problem(cluster, secret) is None


def find_secret_conflict(cluster: RemoteTenantCluster, own_secret_name: str, secrets) -> str | None:
    """A message if a cluster Secret Keyless does not own already uses this name or server (a Secret
    marked for adoption by this very manifest is not in the way: it is taken over once verified)."""
    server = normalize_server(cluster.server)
    for secret in secrets:
        if secret.name == own_secret_name or secret.owner == cluster.ref or adoptable(cluster, secret):
            continue
        who = "another RemoteTenantCluster" if secret.owner else "something other than Keyless"
        if marked_for(cluster, secret) and (secret.cluster_name == cluster.argocd.cluster_name
                                            or normalize_server(secret.server) == server):
            return (f"Argo CD cluster Secret {secret.name} is marked {names.ANNOTATION_ADOPT_BY} for this "
                    f"manifest but cannot be taken over: {adoption_problem(cluster, secret)}")
        if normalize_server(secret.server) == server:
            return (f"Argo CD cluster Secret {secret.name} (owned by {who}) already registers server "
                    f"{cluster.server}; remove that Secret or let Keyless own the cluster"
                    + ("" if secret.owner else f" (an admin annotates it {names.ANNOTATION_ADOPT_BY}="
                                               f"{cluster.ref}: it is taken over without downtime once the chain "
                                               f"is verified)"))
        if secret.cluster_name == cluster.argocd.cluster_name:
            return (f"Argo CD cluster Secret {secret.name} (owned by {who}) already uses cluster name "
                    f"{cluster.argocd.cluster_name!r}; choose another spec.argocd.clusterName or remove that Secret")
    return None
