"""List + watch one collection and keep a projection of each object in memory.

Projections keep memory small (e.g. only the name/server of Argo CD cluster Secrets, never their
data). Watch errors and expiry (410) lead to a re-list with backoff; the loop never gives up.
"""
from __future__ import annotations

import asyncio
import logging
import random
from typing import Any, Callable

from .client import Kube, KubeError

log = logging.getLogger(__name__)


class Informer:
    def __init__(self, kube: Kube, path: str, project: Callable[[dict], Any], *,
                 label_selector: str | None = None, on_change: Callable[[str, Any], None] | None = None,
                 name: str = "informer"):
        self.kube = kube
        self.path = path
        self.project = project
        self.label_selector = label_selector
        self.on_change = on_change
        self.name = name
        self.items: dict[str, Any] = {}
        self.synced = asyncio.Event()
        self._task: asyncio.Task | None = None

    @staticmethod
    def key(obj: dict) -> str:
        meta = obj["metadata"]
        return f"{meta.get('namespace', '')}/{meta['name']}"

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass

    async def _relist(self) -> str:
        listing = await self.kube.list(self.path, label_selector=self.label_selector)
        fresh = {self.key(o): self.project(o) for o in listing.get("items", [])}
        for gone in set(self.items) - set(fresh):
            self.items.pop(gone)
            self._notify(gone, None)
        for key, value in fresh.items():
            if self.items.get(key) != value:
                self.items[key] = value
                self._notify(key, value)
        self.synced.set()
        return listing["metadata"]["resourceVersion"]

    def _notify(self, key: str, value: Any) -> None:
        if self.on_change:
            try:
                self.on_change(key, value)
            except Exception:  # a listener bug must not stop the informer
                log.exception("%s: change listener failed", self.name)

    async def _run(self) -> None:
        delay = 0.5
        while True:
            try:
                version = await self._relist()
                delay = 0.5
                while True:
                    async for event in self.kube.watch(self.path, version, self.label_selector):
                        kind, obj = event.get("type"), event.get("object") or {}
                        if kind == "ERROR":
                            raise KubeError(obj.get("code", 500), obj.get("reason", ""), obj.get("message", ""))
                        version = obj.get("metadata", {}).get("resourceVersion", version)
                        if kind == "BOOKMARK":
                            continue
                        key = self.key(obj)
                        if kind == "DELETED":
                            if self.items.pop(key, None) is not None:
                                self._notify(key, None)
                        else:
                            value = self.project(obj)
                            if self.items.get(key) != value:
                                self.items[key] = value
                                self._notify(key, value)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.info("%s: watch ended (%s); re-listing in %.1fs", self.name, e, delay)
                await asyncio.sleep(delay * (1 + random.random() / 2))
                delay = min(delay * 2, 30)
