"""The target registry: BrokerTarget objects in the broker namespace, kept current by list+watch."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from ..kube.client import Kube, resource_path
from ..model.names import API_VERSION
from . import watch

log = logging.getLogger("keyless.broker.targets")


@dataclass(frozen=True)
class Target:
    name: str
    audience: str
    username: str
    allowed_callers: frozenset[str]
    ttl_seconds: int
    groups: tuple[str, ...] = ()

    @classmethod
    def from_object(cls, obj: dict) -> "Target | None":
        """None for an object the broker cannot serve safely (the CRD should already refuse those)."""
        spec = obj.get("spec") or {}
        name = (obj.get("metadata") or {}).get("name")
        audience, username = spec.get("audience"), spec.get("username")
        ttl = spec.get("tokenTTLSeconds")
        if not (isinstance(name, str) and isinstance(audience, str) and audience
                and isinstance(username, str) and username and isinstance(ttl, int) and ttl > 0):
            return None
        callers = [c for c in spec.get("allowedCallers") or [] if isinstance(c, str)]
        groups = [g for g in spec.get("groups") or [] if isinstance(g, str)]
        return cls(name, audience, username, frozenset(callers), ttl, tuple(groups))


class TargetRegistry:
    def __init__(self, kube: Kube | None, namespace: str):
        self.kube = kube
        self.namespace = namespace
        self.targets: dict[str, Target] = {}
        self.synced = asyncio.Event()

    def get(self, name: str) -> Target | None:
        return self.targets.get(name)

    def _put(self, obj: dict) -> None:
        target = Target.from_object(obj)
        name = (obj.get("metadata") or {}).get("name")
        if target is None:
            log.warning("BrokerTarget %s/%s is incomplete; not serving it", self.namespace, name)
            self.targets.pop(name, None)
        else:
            self.targets[name] = target

    def _sync(self, items: list[dict]) -> None:
        self.targets = {}
        for obj in items:
            self._put(obj)
        log.info("%d broker targets loaded", len(self.targets))
        self.synced.set()

    def _event(self, kind: str, obj: dict) -> None:
        if kind == "DELETED":
            self.targets.pop((obj.get("metadata") or {}).get("name"), None)
        else:
            self._put(obj)

    async def run(self) -> None:
        path = resource_path(API_VERSION, "BrokerTarget", self.namespace)
        await watch.list_and_watch(self.kube, path, self._sync, self._event, what="BrokerTargets")
