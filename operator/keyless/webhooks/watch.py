"""Keeps the tenant directory current: list + watch of Namespaces (their tenant label) and of
RemoteTenantClusters in all namespaces.

Only specs and labels are read (nothing the operator derives), so the guardrails work before, and
independently of, the operator's reconciliation, with the same claim rules. Until both are listed
the directory is not ready and the policy refuses tenant requests (fail closed).
"""
from __future__ import annotations

from typing import Iterable

from keyless.kube.client import Kube, resource_path
from keyless.kube.informer import Informer
from keyless.model.names import API_VERSION, LABEL_TENANT

from .directory import DEFAULT_ARGOCD_NAMESPACE, TenantDirectory, registration_of

REMOTE_TENANT_CLUSTERS = resource_path(API_VERSION, "RemoteTenantCluster")
NAMESPACES = resource_path("v1", "Namespace")


def _namespace_tenant(obj: dict) -> str | None:
    return (obj["metadata"].get("labels") or {}).get(LABEL_TENANT)


class DirectoryKeeper:
    """Owns the current `TenantDirectory` snapshot, rebuilt lazily after a watch saw a change."""

    def __init__(self, kube: Kube, control_namespaces: Iterable[str] = (DEFAULT_ARGOCD_NAMESPACE,)):
        self.kube = kube
        self.control_namespaces = tuple(control_namespaces)
        self.informer = Informer(kube, REMOTE_TENANT_CLUSTERS, registration_of,
                                 on_change=self._changed, name="keyless-tenant-directory")
        self.namespaces = Informer(kube, NAMESPACES, _namespace_tenant, on_change=self._changed,
                                   name="keyless-namespace-tenants")
        self._snapshot = TenantDirectory(ready=False, control_namespaces=self.control_namespaces)
        self._stale = False

    def _changed(self, key: str, value) -> None:
        # A full re-list notifies once per object: rebuild on the next read, not on every change.
        self._stale = True

    @property
    def directory(self) -> TenantDirectory:
        ready = self.informer.synced.is_set() and self.namespaces.synced.is_set()
        if self._stale or ready != self._snapshot.ready:
            self._stale = False
            # An immutable snapshot: a review in progress never sees a half-updated directory.
            tenants = {key.lstrip("/"): tenant for key, tenant in self.namespaces.items.items() if tenant}
            self._snapshot = TenantDirectory.from_registrations(
                self.informer.items.values(), namespace_tenants=tenants, ready=ready,
                control_namespaces=self.control_namespaces)
        return self._snapshot

    def start(self) -> None:
        self.namespaces.start()
        self.informer.start()

    async def stop(self) -> None:
        await self.informer.stop()
        await self.namespaces.stop()
        await self.kube.close()
