"""Who owns what: tenant projects and tenant clusters, built only from RemoteTenantCluster specs.

Pure (no I/O). The directory answers the questions the admission policy asks: which tenant owns
this Argo CD project, this destination server, this destination name; which clusters (with the
labels the operator puts on their Argo CD cluster Secrets) a tenant has.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping
from urllib.parse import urlsplit, urlunsplit

from keyless.model.names import LABEL_TENANT

DEFAULT_ARGOCD_NAMESPACE = "argocd"


@dataclass(frozen=True)
class TenantCluster:
    """One registered tenant cluster, as Argo CD sees it."""

    tenant: str
    project: str
    name: str  # Argo CD's cluster name (spec.argocd.clusterName, default metadata.name)
    server: str
    # Labels on the Argo CD cluster Secret: the admin's spec.argocd.labels plus keyless.dev/tenant.
    labels: Mapping[str, str] = field(default_factory=dict)
    argocd_namespace: str = DEFAULT_ARGOCD_NAMESPACE
    source: str = ""  # namespace/name of the RemoteTenantCluster


def cluster_from_remote_tenant_cluster(body: Mapping) -> TenantCluster | None:
    """The directory entry for one RemoteTenantCluster, or None when its spec is unusable.

    Applies the CRD's defaults (clusterName = metadata.name, project = tenant) so the directory
    agrees with what the operator writes into Argo CD.
    """
    metadata = body.get("metadata") or {}
    spec = body.get("spec") or {}
    tenant, server = spec.get("tenant"), spec.get("server")
    if not isinstance(tenant, str) or not tenant or not isinstance(server, str) or not server:
        return None
    argocd = spec.get("argocd") or {}
    user_labels = argocd.get("labels") or {}
    labels = {str(k): str(v) for k, v in user_labels.items()}
    labels[LABEL_TENANT] = tenant  # the operator's label wins, as on the real Secret
    return TenantCluster(
        tenant=tenant,
        project=argocd.get("project") or tenant,
        name=argocd.get("clusterName") or metadata.get("name", ""),
        server=server.rstrip("/"),
        labels=labels,
        argocd_namespace=argocd.get("namespace") or DEFAULT_ARGOCD_NAMESPACE,
        source=f"{metadata.get('namespace', '')}/{metadata.get('name', '')}",
    )


def normalize_server(server: str) -> str:
    """A comparison key for server URLs: lower-case scheme and host, no default port, no trailing '/'.

    Argo CD itself matches the exact URL (minus trailing slashes); normalising more generously here
    means spelling variants of a tenant's URL are still recognised as that tenant's cluster.
    """
    text = server.strip()
    try:
        parts = urlsplit(text)
    except ValueError:
        return text.rstrip("/").lower()
    if not parts.scheme or not parts.netloc:
        return text.rstrip("/").lower()
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host if port is None or (scheme, port) in (("https", 443), ("http", 80)) else f"{host}:{port}"
    return urlunsplit((scheme, netloc, parts.path.rstrip("/"), parts.query, ""))


class TenantDirectory:
    """An immutable snapshot of all tenant clusters; cheap lookups for the admission policy."""

    def __init__(self, clusters: Iterable[TenantCluster] = (), *, ready: bool = True):
        self.clusters: tuple[TenantCluster, ...] = tuple(
            sorted(clusters, key=lambda c: (c.tenant, c.name, c.server)))
        # False until the first full listing of RemoteTenantClusters: the policy then refuses
        # tenant-relevant requests instead of judging them against an empty directory.
        self.ready = ready
        self._tenants_by_project: dict[str, set[str]] = {}
        self._tenants_by_server: dict[str, set[str]] = {}
        self._tenants_by_name: dict[str, set[str]] = {}
        self._clusters_by_tenant: dict[str, list[TenantCluster]] = {}
        for cluster in self.clusters:
            self._tenants_by_project.setdefault(cluster.project, set()).add(cluster.tenant)
            self._tenants_by_server.setdefault(normalize_server(cluster.server), set()).add(cluster.tenant)
            self._tenants_by_name.setdefault(cluster.name, set()).add(cluster.tenant)
            self._clusters_by_tenant.setdefault(cluster.tenant, []).append(cluster)

    @classmethod
    def from_remote_tenant_clusters(cls, bodies: Iterable[Mapping], *, ready: bool = True) -> "TenantDirectory":
        entries = (cluster_from_remote_tenant_cluster(b) for b in bodies)
        return cls((e for e in entries if e is not None), ready=ready)

    def tenants_of_project(self, project: str) -> frozenset[str]:
        return frozenset(self._tenants_by_project.get(project, ()))

    def tenants_of_server(self, server: str) -> frozenset[str]:
        return frozenset(self._tenants_by_server.get(normalize_server(server), ()))

    def tenants_of_name(self, name: str) -> frozenset[str]:
        return frozenset(self._tenants_by_name.get(name, ()))

    def clusters_of(self, tenant: str) -> tuple[TenantCluster, ...]:
        return tuple(self._clusters_by_tenant.get(tenant, ()))

    def projects_of(self, tenant: str) -> list[str]:
        return sorted({c.project for c in self.clusters_of(tenant)})

    def __len__(self) -> int:
        return len(self.clusters)
