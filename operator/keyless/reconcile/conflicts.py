"""Which manifests count, and whether one of them holds what another claims (pure).

The rules themselves live in `model.claims`, shared with the admission webhooks so that both judge
a tenant cluster the same way; this module applies them to parsed manifests and live Secrets.
"""
from __future__ import annotations

from typing import Callable, Iterable

from ..model import names
from ..model.claims import ClaimIndex, claim_of, namespace_problem, normalize_server
from ..model.spec import RemoteTenantCluster


def counting(clusters: Iterable[RemoteTenantCluster],
             namespace_tenant: Callable[[str], str | None]) -> list[RemoteTenantCluster]:
    """The manifests that live in a namespace of their own tenant: only those claim anything."""
    return [c for c in clusters if namespace_problem(c.namespace, c.tenant, namespace_tenant(c.namespace)) is None]


class ClaimsView:
    """Every manifest that counts, what each claims and which of them hold all their claims: built
    once per change of the manifests or the namespaces' tenants, not on every reconcile."""

    def __init__(self, clusters: Iterable[RemoteTenantCluster], namespace_tenant: Callable[[str], str | None]):
        self.counting = counting(clusters, namespace_tenant)
        self.claims = {c.ref: claim_of(c) for c in self.counting}
        self.index = ClaimIndex(self.claims.values())
        self.holding = {ref for ref, claim in self.claims.items() if self.index.conflict(claim) is None}

    def conflict(self, cluster: RemoteTenantCluster) -> str | None:
        """A message if another counting manifest claimed this cluster's name, server or audience first."""
        return self.index.conflict(self.claims.get(cluster.ref) or claim_of(cluster))


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
