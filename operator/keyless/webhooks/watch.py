"""Keeps the tenant directory current: list + watch of RemoteTenantClusters in all namespaces.

Only the specs of RemoteTenantClusters are read (nothing the operator derives from them), so the
guardrails work before, and independently of, the operator's reconciliation. Until the first full
listing the directory is not ready and the policy refuses tenant requests (fail closed).
"""
from __future__ import annotations

import asyncio
import logging
import random

from keyless.kube.client import Kube, KubeError, resource_path
from keyless.model.names import API_VERSION

from .directory import TenantCluster, TenantDirectory, cluster_from_remote_tenant_cluster

log = logging.getLogger(__name__)

REMOTE_TENANT_CLUSTERS = resource_path(API_VERSION, "RemoteTenantCluster")


class DirectoryKeeper:
    """Owns the current `TenantDirectory` snapshot; `run()` keeps it in step with the cluster."""

    def __init__(self, kube: Kube | None = None):
        self.kube = kube
        self._entries: dict[str, TenantCluster] = {}
        self.directory = TenantDirectory(ready=False)
        self.synced = asyncio.Event()
        self._task: asyncio.Task | None = None

    # ---- pure updates (also used by tests) ----------------------------------------------------
    def replace_all(self, bodies: list[dict]) -> None:
        self._entries = {}
        for body in bodies:
            self._put(body)
        self._publish(ready=True)

    def apply_event(self, event_type: str, body: dict) -> None:
        if event_type == "DELETED":
            self._entries.pop(_key(body), None)
        else:
            self._put(body)
        self._publish(ready=self.directory.ready)

    def _put(self, body: dict) -> None:
        entry = cluster_from_remote_tenant_cluster(body)
        if entry is None:
            self._entries.pop(_key(body), None)
        else:
            self._entries[_key(body)] = entry

    def _publish(self, ready: bool) -> None:
        # A fresh immutable snapshot per change: readers never see a half-updated directory.
        self.directory = TenantDirectory(self._entries.values(), ready=ready)

    # ---- the watch loop ----------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="keyless-tenant-directory")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        if self.kube is not None:
            await self.kube.close()

    async def _relist(self) -> str:
        listing = await self.kube.list(REMOTE_TENANT_CLUSTERS)
        self.replace_all(listing.get("items") or [])
        if not self.synced.is_set():
            log.info("Tenant directory synced: %d cluster(s).", len(self.directory))
        self.synced.set()
        return listing["metadata"]["resourceVersion"]

    async def _run(self) -> None:
        delay = 0.5
        while True:
            try:
                version = await self._relist()
                delay = 0.5
                while True:  # each watch ends after its timeout; resume from the last version
                    async for event in self.kube.watch(REMOTE_TENANT_CLUSTERS, version):
                        kind, body = event.get("type"), event.get("object") or {}
                        if kind == "ERROR":  # e.g. 410 Gone: re-list
                            raise KubeError(body.get("code", 500), body.get("reason", ""), body.get("message", ""))
                        version = (body.get("metadata") or {}).get("resourceVersion", version)
                        if kind in ("ADDED", "MODIFIED", "DELETED"):
                            self.apply_event(kind, body)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("RemoteTenantCluster watch ended (%s); re-listing in %.1fs.", e, delay)
                await asyncio.sleep(delay * (1 + random.random() / 2))
                delay = min(delay * 2, 30.0)


def _key(body: dict) -> str:
    metadata = body.get("metadata") or {}
    return f"{metadata.get('namespace', '')}/{metadata.get('name', '')}"
