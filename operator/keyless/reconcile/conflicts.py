"""Pure rules for who owns an Argo CD cluster name or server when manifests collide."""
from __future__ import annotations

from typing import Iterable

from ..model.spec import RemoteTenantCluster


def _seniority(cluster: RemoteTenantCluster) -> tuple[str, str]:
    # The oldest manifest keeps the name; ties broken by namespace/name so every replica agrees.
    return (cluster.creation_timestamp, cluster.ref)


def find_cluster_conflict(cluster: RemoteTenantCluster, others: Iterable[RemoteTenantCluster]) -> str | None:
    """A message if an older manifest already claims this cluster's Argo CD name, server or audience."""
    mine = _seniority(cluster)
    for other in others:
        if other.ref == cluster.ref or _seniority(other) > mine:
            continue
        if other.access.audience == cluster.access.audience:
            # The audience is the only thing that binds a token to one cluster: never share it.
            return (f"token audience {cluster.access.audience!r} is already used by RemoteTenantCluster "
                    f"{other.ref}; remove spec.access.audience to get a unique one")
        if other.argocd.namespace != cluster.argocd.namespace:
            continue
        if other.argocd.cluster_name == cluster.argocd.cluster_name:
            return (f"Argo CD cluster name {cluster.argocd.cluster_name!r} is already registered by "
                    f"RemoteTenantCluster {other.ref}; choose another spec.argocd.clusterName")
        if other.server.rstrip("/") == cluster.server.rstrip("/"):
            return (f"server {cluster.server} is already registered by RemoteTenantCluster {other.ref}; "
                    f"Argo CD identifies clusters by server URL, so each may be registered once")
    return None


def find_secret_conflict(cluster: RemoteTenantCluster, own_secret_name: str, secrets) -> str | None:
    """A message if a cluster Secret Keyless does not own already uses this name or server."""
    for secret in secrets:
        if secret.name == own_secret_name or secret.owner == cluster.ref:
            continue
        who = f"RemoteTenantCluster {secret.owner}" if secret.owner else "something other than Keyless"
        if secret.cluster_name == cluster.argocd.cluster_name:
            return (f"Argo CD cluster Secret {secret.name} (owned by {who}) already uses cluster name "
                    f"{cluster.argocd.cluster_name!r}; choose another spec.argocd.clusterName or remove that Secret")
        if secret.server.rstrip("/") == cluster.server.rstrip("/"):
            return (f"Argo CD cluster Secret {secret.name} (owned by {who}) already registers server "
                    f"{cluster.server}; remove that Secret or let Keyless own the cluster")
    return None
