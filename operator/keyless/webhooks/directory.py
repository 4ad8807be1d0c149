"""Who owns what: tenant namespaces, tenant projects and tenant clusters (pure, no I/O).

Built from the namespaces' `keyless.dev/tenant` labels and the RemoteTenantCluster specs, with the
same claim rules as the operator (`model.claims`): a manifest counts only in a namespace of its own
tenant, and a cluster name or server belongs to the manifest that claimed it first. So a manifest
that claims another tenant's server, name or project neither reaches that cluster nor makes the
guardrails refuse the rightful tenant's Applications.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

from keyless.model import names
from keyless.model.claims import Claim, ClaimIndex, claim_of, namespace_problem, normalize_server
from keyless.model.names import LABEL_TENANT
from keyless.model.spec import SpecError, parse
from keyless.settings import DEFAULT_ARGOCD_NAMESPACE


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


@dataclass(frozen=True)
class Registration:
    """What one RemoteTenantCluster would register, and what it claims."""

    cluster: TenantCluster
    claim: Claim


def registration_of(body: Mapping) -> Registration | None:
    """The registration of one RemoteTenantCluster, or None when the operator would refuse its spec
    (it then registers nothing). The defaults are the operator's: the same parser."""
    try:
        parsed = parse(body)
    except SpecError:
        return None
    labels = {str(k): str(v) for k, v in parsed.argocd.labels.items()}
    labels[LABEL_TENANT] = parsed.tenant  # the operator's label wins, as on the real Secret
    cluster = TenantCluster(tenant=parsed.tenant, project=parsed.argocd.project, name=parsed.argocd.cluster_name,
                            server=parsed.server.rstrip("/"), labels=labels,
                            argocd_namespace=parsed.argocd.namespace, source=parsed.ref)
    return Registration(cluster, claim_of(parsed))


class TenantDirectory:
    """An immutable snapshot: which tenant owns each namespace, project and cluster."""

    def __init__(self, clusters: Iterable[TenantCluster] = (), *, ready: bool = True,
                 namespace_tenants: Mapping[str, str] | None = None,
                 control_namespaces: Iterable[str] = (DEFAULT_ARGOCD_NAMESPACE,),
                 known_tenants: Iterable[str] = ()):
        self.clusters: tuple[TenantCluster, ...] = tuple(
            sorted(clusters, key=lambda c: (c.tenant, c.name, c.server)))
        # False until namespaces and RemoteTenantClusters are listed: the policy then refuses
        # tenant-relevant requests instead of judging them against an empty directory.
        self.ready = ready
        self.namespace_tenants: dict[str, str] = dict(namespace_tenants or {})
        self.control_namespaces = frozenset(control_namespaces)
        self._tenants_by_project: dict[str, set[str]] = {}
        self._tenants_by_server: dict[str, set[str]] = {}
        self._tenants_by_name: dict[str, set[str]] = {}
        self._clusters_by_tenant: dict[str, list[TenantCluster]] = {}
        self._namespaces_by_tenant: dict[str, list[str]] = {}
        for namespace, tenant in sorted(self.namespace_tenants.items()):
            self._namespaces_by_tenant.setdefault(tenant, []).append(namespace)
        # Tenants anyone has named (a namespace label, a manifest): their project names are theirs.
        self._known_tenants = {*self._namespaces_by_tenant, *known_tenants, *(c.tenant for c in self.clusters)}
        for cluster in self.clusters:
            self._tenants_by_project.setdefault(cluster.project, set()).add(cluster.tenant)
            self._tenants_by_server.setdefault(normalize_server(cluster.server), set()).add(cluster.tenant)
            self._tenants_by_name.setdefault(cluster.name, set()).add(cluster.tenant)
            self._clusters_by_tenant.setdefault(cluster.tenant, []).append(cluster)

    @classmethod
    def from_registrations(cls, registrations: Iterable[Registration | None], *,
                           namespace_tenants: Mapping[str, str], ready: bool = True,
                           control_namespaces: Iterable[str] = (DEFAULT_ARGOCD_NAMESPACE,)) -> "TenantDirectory":
        """Only the manifests that count (own-tenant namespace) and hold what they claim."""
        registrations = [r for r in registrations if r is not None]
        counting = [r for r in registrations if namespace_problem(
            r.claim.namespace, r.claim.tenant, namespace_tenants.get(r.claim.namespace)) is None]
        index = ClaimIndex(r.claim for r in counting)
        return cls((r.cluster for r in counting if index.conflict(r.claim) is None), ready=ready,
                   namespace_tenants=namespace_tenants, control_namespaces=control_namespaces,
                   known_tenants={r.claim.tenant for r in registrations})

    @classmethod
    def from_remote_tenant_clusters(cls, bodies: Iterable[Mapping], *, namespace_tenants: Mapping[str, str],
                                    ready: bool = True,
                                    control_namespaces: Iterable[str] = (DEFAULT_ARGOCD_NAMESPACE,)) -> "TenantDirectory":
        return cls.from_registrations((registration_of(b) for b in bodies), namespace_tenants=namespace_tenants,
                                      ready=ready, control_namespaces=control_namespaces)

    # ---- namespaces -----------------------------------------------------------------------------
    def tenant_of_namespace(self, namespace: str) -> str | None:
        return self.namespace_tenants.get(namespace)

    def namespaces_of(self, tenant: str) -> list[str]:
        return list(self._namespaces_by_tenant.get(tenant, ()))

    def is_control_namespace(self, namespace: str) -> bool:
        return namespace in self.control_namespaces

    # ---- projects and clusters ------------------------------------------------------------------
    def tenant_of_project(self, project: str) -> str | None:
        """The tenant a project belongs to: the one whose clusters it scopes or, before it has any,
        the tenant its name says (`<tenant>` or `<tenant>.<x>`) if such a tenant is known."""
        claimed = self._tenants_by_project.get(project)
        if claimed:
            return next(iter(claimed))  # manifests name only their own tenant's projects (CEL + parser)
        by_name = names.tenant_of_project_name(project)
        return by_name if by_name in self._known_tenants else None

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
