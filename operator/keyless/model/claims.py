"""Who may claim what across RemoteTenantClusters: tenant namespaces, Argo CD names, servers and
audiences (pure, no I/O; the operator and the admission webhooks both decide with these rules).

- A tenant owns namespaces: the `keyless.dev/tenant` label on the Namespace, which only platform
  admins may write. A manifest counts only in a namespace of its own tenant; anywhere else it
  claims nothing and nothing is derived from it.
- An Argo CD cluster name or server (per Argo CD namespace) and a token audience belong to the
  manifest that claimed it first. Those fields are immutable (CEL), so the first claim is the oldest
  manifest that counts (creationTimestamp, then namespace/name so every replica agrees). A later
  claim, from any tenant, never takes a value over.
- Audiences cannot even collide across tenants: every audience starts with `keyless:<namespace>:`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable
from urllib.parse import urlsplit, urlunsplit

from . import names


@dataclass(frozen=True)
class Claim:
    """What one manifest claims, with the defaults resolved."""

    ref: str  # namespace/name of the RemoteTenantCluster
    namespace: str
    tenant: str
    created: str  # creationTimestamp (RFC 3339 in UTC sorts as text)
    argocd_namespace: str
    cluster_name: str
    server: str
    audience: str

    @property
    def seniority(self) -> tuple[str, str]:
        return (self.created, self.ref)

    def keys(self) -> tuple[tuple[str, ...], ...]:
        return (("audience", self.audience),
                ("name", self.argocd_namespace, self.cluster_name),
                ("server", self.argocd_namespace, normalize_server(self.server)))


def claim_of(cluster) -> Claim:
    """The claim of a parsed `model.spec.RemoteTenantCluster`."""
    return Claim(ref=cluster.ref, namespace=cluster.namespace, tenant=cluster.tenant,
                 created=cluster.creation_timestamp, argocd_namespace=cluster.argocd.namespace,
                 cluster_name=cluster.argocd.cluster_name, server=cluster.server, audience=cluster.access.audience)


def normalize_server(server: str) -> str:
    """A comparison key for server URLs: lower-case scheme and host, no default port, no trailing '/'.

    Argo CD itself matches the exact URL (minus trailing slashes); comparing more generously here
    means a spelling variant of a registered server is still that server.
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


def namespace_problem(namespace: str, tenant: str, namespace_tenant: str | None) -> str | None:
    """Why a manifest of `tenant` may not live in `namespace` (None: it may)."""
    if namespace_tenant is None:
        return (f"namespace {namespace} belongs to no tenant (it has no {names.LABEL_TENANT} label); a platform "
                f"admin must run `kubectl label namespace {namespace} {names.LABEL_TENANT}={tenant}` if tenant "
                f"{tenant} owns it, otherwise create the manifest in one of tenant {tenant}'s namespaces")
    if namespace_tenant != tenant:
        return (f"namespace {namespace} belongs to tenant {namespace_tenant}, not {tenant}: spec.tenant must be "
                f"{namespace_tenant} here; a cluster of tenant {tenant} belongs in one of tenant {tenant}'s namespaces")
    return None


def ownership_problems(namespace: str, tenant: str, audience: str, project: str) -> list[str]:
    """What a manifest claims that its namespace and tenant do not own (besides the namespace itself)."""
    problems = []
    if not audience.startswith(names.audience_prefix(namespace)):
        problems.append(f"spec.access.audience must start with {names.audience_prefix(namespace)} (the manifest's "
                        f"namespace), so it can never name another tenant's cluster; remove it to get "
                        f"{names.audience_prefix(namespace)}<name>")
    if not names.project_of_tenant(project, tenant):
        problems.append(f"spec.argocd.project must be {tenant} or start with {tenant}. (e.g. {tenant}.prod): a "
                        f"project of another name may belong to another tenant")
    return problems


_WHAT = {"audience": ("token audience", "create a new RemoteTenantCluster without spec.access.audience"),
         "name": ("Argo CD cluster name", "create a new RemoteTenantCluster with another spec.argocd.clusterName"),
         "server": ("server", "Argo CD identifies clusters by server URL, so each may be registered once")}


class ClaimIndex:
    """The holder (first claimant) of every value among the manifests that count."""

    def __init__(self, claims: Iterable[Claim]):
        self.holders: dict[tuple[str, ...], Claim] = {}
        for claim in claims:
            for key in claim.keys():
                holder = self.holders.get(key)
                if holder is None or claim.seniority < holder.seniority:
                    self.holders[key] = claim

    def conflict(self, claim: Claim) -> str | None:
        """A message when a value this manifest claims is held by another manifest."""
        for key in claim.keys():
            holder = self.holders.get(key)
            if holder is None or holder.ref == claim.ref:
                continue
            what, fix = _WHAT[key[0]]
            value = key[-1] if key[0] != "server" else claim.server
            # Another tenant's manifest is not named: its namespace and name are that tenant's business.
            who = (f"RemoteTenantCluster {holder.ref}, which claimed it first" if holder.tenant == claim.tenant
                   else "a RemoteTenantCluster of another tenant, which claimed it first (a platform admin can "
                        "find it with kubectl get rtc -A)")
            return f"{what} {value!r} is already held by {who}; {fix}"
        return None
