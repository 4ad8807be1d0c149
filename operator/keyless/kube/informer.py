"""An in-memory projection of one collection, kept current by kube.watch.list_and_watch.

Projections keep memory small (e.g. only the name/server of Argo CD cluster Secrets, never their
data). `on_change(key, value)`, and every listener added with `subscribe`, hears every change (value
None: gone); a listener bug never stops it.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from .client import Kube
from .watch import list_and_watch

log = logging.getLogger(__name__)


class Informer:
    def __init__(self, kube: Kube, path: str, project: Callable[[dict], Any], *,
                 label_selector: str | None = None, on_change: Callable[[str, Any], None] | None = None,
                 name: str = "informer"):
        self.kube = kube
        self.path = path
        self.project = project
        self.label_selector = label_selector
        self._listeners: list[Callable[[str, Any], None]] = [on_change] if on_change else []
        self.name = name
        self.items: dict[str, Any] = {}
        self.synced = asyncio.Event()
        self._task: asyncio.Task | None = None

    @staticmethod
    def key(obj: dict) -> str:
        meta = obj["metadata"]
        return f"{meta.get('namespace', '')}/{meta['name']}"

    def start(self) -> None:
        self._task = asyncio.create_task(
            list_and_watch(self.kube, self.path, self._sync, self._event, label_selector=self.label_selector,
                           what=self.name), name=self.name)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass

    def _sync(self, items: list[dict]) -> None:
        fresh = {self.key(o): self.project(o) for o in items}
        for gone in set(self.items) - set(fresh):
            self.discard(gone)
        for key, value in fresh.items():
            self._set(key, value)
        self.synced.set()

    def _event(self, kind: str, obj: dict) -> None:
        key = self.key(obj)
        if kind == "DELETED":
            self.discard(key)
        else:
            self._set(key, self.project(obj))

    def subscribe(self, listener: Callable[[str, Any], None]) -> None:
        """`listener(key, value)` hears every later change (e.g. an index kept beside `items`)."""
        self._listeners.append(listener)

    def discard(self, key: str) -> None:
        """Forgets an item (e.g. one we just deleted, before the watch says so)."""
        if self.items.pop(key, None) is not None:
            self._notify(key, None)

    def _set(self, key: str, value: Any) -> None:
        if self.items.get(key) != value:
            self.items[key] = value
            self._notify(key, value)

    def _notify(self, key: str, value: Any) -> None:
        for listener in self._listeners:
            try:
                listener(key, value)
            except Exception:  # a listener bug must not stop the informer
                log.exception("%s: change listener failed", self.name)
