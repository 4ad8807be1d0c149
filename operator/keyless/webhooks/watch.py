"""Keeps the tenant directory current: list + watch of RemoteTenantClusters in all namespaces.

Only the specs of RemoteTenantClusters are read (nothing the operator derives from them), so the
guardrails work before, and independently of, the operator's reconciliation. Until the first full
listing the directory is not ready and the policy refuses tenant requests (fail closed).
"""
from __future__ import annotations

from keyless.kube.client import Kube, resource_path
from keyless.kube.informer import Informer
from keyless.model.names import API_VERSION

from .directory import TenantDirectory, cluster_from_remote_tenant_cluster

REMOTE_TENANT_CLUSTERS = resource_path(API_VERSION, "RemoteTenantCluster")


class DirectoryKeeper:
    """Owns the current `TenantDirectory` snapshot, rebuilt lazily after the watch saw a change."""

    def __init__(self, kube: Kube):
        self.kube = kube
        self.informer = Informer(kube, REMOTE_TENANT_CLUSTERS, cluster_from_remote_tenant_cluster,
                                 on_change=self._changed, name="keyless-tenant-directory")
        self._snapshot = TenantDirectory(ready=False)
        self._stale = False

    def _changed(self, key: str, value) -> None:
        # A full re-list notifies once per object: rebuild on the next read, not on every change.
        self._stale = True

    @property
    def directory(self) -> TenantDirectory:
        ready = self.informer.synced.is_set()
        if self._stale or ready != self._snapshot.ready:
            self._stale = False
            # An immutable snapshot: a review in progress never sees a half-updated directory.
            self._snapshot = TenantDirectory((c for c in self.informer.items.values() if c is not None),
                                             ready=ready)
        return self._snapshot

    def start(self) -> None:
        self.informer.start()

    async def stop(self) -> None:
        await self.informer.stop()
        await self.kube.close()
