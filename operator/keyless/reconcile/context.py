"""What every reconcile step may use: the API client, settings, events and the in-memory views."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ..kube import Kube
from ..kube.events import EventRecorder
from ..kube.informer import Informer
from ..model.conditions import Condition
from ..model.spec import RemoteTenantCluster
from ..settings import OperatorSettings


@dataclass(frozen=True)
class StepResult:
    condition: Condition
    changes: tuple[str, ...] = ()  # human-readable "Created X" lines, each becomes a Normal event
    status: dict | None = None  # extra status fields this step reports (e.g. Direct mode's config)


@dataclass
class ArgoClusterSecret:
    """The projection of an Argo CD cluster Secret we keep in memory (never its config)."""

    name: str
    cluster_name: str
    server: str
    owner: str | None


class ClusterRegistry:
    """Every RemoteTenantCluster this operator knows, parsed; used for cross-object rules."""

    def __init__(self) -> None:
        self.clusters: dict[str, RemoteTenantCluster] = {}
        self.deleting: set[str] = set()

    def put(self, cluster: RemoteTenantCluster) -> None:
        self.clusters[cluster.ref] = cluster

    def remove(self, ref: str) -> None:
        self.clusters.pop(ref, None)
        self.deleting.discard(ref)

    def live(self):
        return (c for ref, c in self.clusters.items() if ref not in self.deleting)


@dataclass
class Context:
    kube: Kube
    settings: OperatorSettings
    events: EventRecorder
    registry: ClusterRegistry = field(default_factory=ClusterRegistry)
    argo_secrets: dict[str, Informer] = field(default_factory=dict)
    verifier: object | None = None  # reconcile.verify.Verifier
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    def lock(self, key: str) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    def forget_lock(self, key: str) -> None:
        self._locks.pop(key, None)
