"""What every reconcile step may use: the API client, settings, events and the in-memory views (Context),
what one step hands to the next within a reconcile (Flow), and what a step returns (StepResult)."""
from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass, field

from ..brokerclient.aio import BrokerClient
from ..kube import Kube
from ..kube.events import EventRecorder
from ..kube.informer import Informer
from ..model import names
from ..model.conditions import Condition
from ..model.spec import RemoteTenantCluster
from ..settings import OperatorSettings
from .conflicts import ClaimsView, SecretIndex
from .errors import Retry
from .verifier import Verifier


@dataclass(frozen=True)
class StepResult:
    condition: Condition
    changes: tuple[str, ...] = ()  # human-readable "Created X" lines, each becomes a Normal event
    status: dict | None = None  # extra status fields this step reports (status.STEP_FIELDS)
    retry: Retry = Retry.NONE  # a failure the step reported itself, and when to try again
    # Set when nothing after this step can be reconciled: the message says until when.
    blocks: str | None = None
    # Set when the manifest may not serve at all (it lost a claim): what it derived is withdrawn.
    withdraw: bool = False


@dataclass
class Flow:
    """What earlier steps hand to later ones within one reconcile of one manifest; nothing else is shared."""

    # The CA Argo CD trusts for spec.server: spec.caData, or in Managed mode without it, the per-cluster
    # proxy CA the operator keeps (set by ArgoClusterRegistered; read by TokenVerified and ClusterProfile).
    ca_pem: bytes | None
    # Managed mode: the per-cluster CA and the proxy's serving certificate (proxy_pki.ensure keeps it here,
    # so the CA Secret is read once per reconcile).
    proxy_pki: dict[str, bytes] | None = None
    # TokenVerified found the whole chain working (read by the bootstrap removal and the adoption).
    verified: bool = False
    # Argo CD cluster Secrets marked keyless.dev/adopt-by for this manifest, still serving the cluster with
    # their own credential: ArgoClusterRegistered leaves them alone, the adoption takes them over once verified.
    adopting: tuple[str, ...] = ()
    # The conditions of the steps so far, by type (an amending step reads the one it amends).
    conditions: dict[str, Condition] = field(default_factory=dict)


@dataclass
class ArgoClusterSecret:
    """The projection of an Argo CD cluster Secret we keep in memory (never its config)."""

    name: str
    cluster_name: str
    server: str
    owner: str | None
    # keyless.dev/adopt-by on a Secret Keyless does not own: the manifest that may take it over.
    adopt_by: str | None = None

    @classmethod
    def of(cls, obj: dict) -> "ArgoClusterSecret":
        """What the operator keeps of a cluster Secret: name, server, owner, adopt-by; never its config."""
        data = obj.get("data") or {}

        def field(key: str) -> str:
            try:
                return base64.b64decode(data.get(key) or "").decode()
            except (ValueError, UnicodeDecodeError):
                return ""

        meta = obj["metadata"]
        annotations = meta.get("annotations") or {}
        owner = annotations.get(names.ANNOTATION_OWNER)
        if (meta.get("labels") or {}).get(names.LABEL_MANAGED_BY) != names.MANAGED_BY:
            owner = None
        adopt_by = annotations.get(names.ANNOTATION_ADOPT_BY) if owner is None else None
        return cls(name=meta["name"], cluster_name=field("name"), server=field("server"), owner=owner,
                   adopt_by=adopt_by)


class ClusterRegistry:
    """Every RemoteTenantCluster this operator knows, parsed; used for cross-object rules."""

    def __init__(self) -> None:
        self.clusters: dict[str, RemoteTenantCluster] = {}
        self.deleting: set[str] = set()
        self.version = 0  # changes whenever what the manifests claim may have changed

        self.changed: set[str] = set()  # refs changed since the claims view last caught up

    def put(self, cluster: RemoteTenantCluster) -> None:
        if self.clusters.get(cluster.ref) != cluster:
            self.version += 1
            self.changed.add(cluster.ref)
        self.clusters[cluster.ref] = cluster

    def mark_deleting(self, ref: str) -> None:
        if ref not in self.deleting:
            self.deleting.add(ref)
            self.version += 1
            self.changed.add(ref)

    def remove(self, ref: str) -> None:
        if ref in self.clusters or ref in self.deleting:
            self.version += 1
            self.changed.add(ref)
        self.clusters.pop(ref, None)
        self.deleting.discard(ref)

    def live_one(self, ref: str) -> RemoteTenantCluster | None:
        return None if ref in self.deleting else self.clusters.get(ref)

    def live(self):
        return (c for ref, c in self.clusters.items() if ref not in self.deleting)


@dataclass
class Context:
    kube: Kube
    settings: OperatorSettings
    events: EventRecorder
    verifier: Verifier
    # The operator's own client of the broker (verification, and the proxy path to a tenant); None
    # without --broker-url/--broker-token-file.
    broker: BrokerClient | None = None
    # The broker's CA (--broker-ca-file), read once at start-up: the tenant side trusts it.
    broker_ca_pem: bytes | None = None
    registry: ClusterRegistry = field(default_factory=ClusterRegistry)
    argo_secrets: dict[str, Informer] = field(default_factory=dict)
    # Namespace name -> its keyless.dev/tenant label (None: no tenant). Until it has listed, no
    # manifest counts as owned, so nothing is derived or removed on a guess.
    namespaces: Informer | None = None
    namespaces_version: int = 0  # bumped when a namespace's tenant changes
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    _claims: tuple[int, ClaimsView] | None = None
    _secret_indexes: dict[str, SecretIndex] = field(default_factory=dict)

    def claims(self) -> ClaimsView:
        """Who counts and who holds what: rebuilt after namespace tenants changed, else brought up to date
        with the manifests that changed since (one at a time, not a rebuild per new manifest)."""
        registry = self.registry
        if self._claims is None or self._claims[0] != self.namespaces_version:
            registry.changed.clear()
            self._claims = (self.namespaces_version, ClaimsView(registry.live(), self.namespace_tenant))
        elif registry.changed:
            view = self._claims[1]
            for ref in list(registry.changed):
                view.update(ref, registry.live_one(ref))
            registry.changed.clear()
        return self._claims[1]

    def argo_secret_index(self, namespace: str) -> SecretIndex | None:
        """The index of an Argo CD namespace's cluster Secrets (None: that namespace is not watched)."""
        informer = self.argo_secrets.get(namespace)
        if informer is None:
            return None
        index = self._secret_indexes.get(namespace)
        if index is None:
            index = self._secret_indexes[namespace] = SecretIndex(informer.items.values())
            informer.subscribe(lambda key, secret: index.update(key.rpartition("/")[2], secret))
        return index

    def namespace_tenant(self, namespace: str) -> str | None:
        if self.namespaces is None:
            return None
        return self.namespaces.items.get(f"/{namespace}")

    def tenant_namespaces(self, tenant: str) -> list[str]:
        if self.namespaces is None:
            return []
        return sorted(key[1:] for key, owner in self.namespaces.items.items() if owner == tenant)

    def lock(self, key: str) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    def forget_lock(self, key: str) -> None:
        self._locks.pop(key, None)
