"""The target registry: BrokerTarget objects in the broker namespace, kept current by list+watch."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from ..kube.client import Kube, resource_path
from ..kube.watch import list_and_watch
from ..model.names import API_VERSION

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
        self._audience_counts: dict[str, int] | None = None

    def get(self, name: str) -> Target | None:
        return self.targets.get(name)

    def shares_audience(self, target: Target) -> bool:
        """True when another target names the same audience. The operator never writes such a pair;
        if one appears anyway, neither is served: a token for one would be accepted by the other."""
        if self._audience_counts is None:
            counts: dict[str, int] = {}
            for each in self.targets.values():
                counts[each.audience] = counts.get(each.audience, 0) + 1
            self._audience_counts = counts
        return self._audience_counts.get(target.audience, 0) > 1

    def _put(self, obj: dict) -> None:
        self._audience_counts = None
        target = Target.from_object(obj)
        name = (obj.get("metadata") or {}).get("name")
        if target is None:
            log.warning("BrokerTarget %s/%s is incomplete; not serving it", self.namespace, name)
            self.targets.pop(name, None)
        else:
            self.targets[name] = target

    def _sync(self, items: list[dict]) -> None:
        self.targets = {}
        self._audience_counts = None
        for obj in items:
            self._put(obj)
        log.info("%d broker targets loaded", len(self.targets))
        self.synced.set()

    def _event(self, kind: str, obj: dict) -> None:
        if kind == "DELETED":
            self._audience_counts = None
            self.targets.pop((obj.get("metadata") or {}).get("name"), None)
        else:
            self._put(obj)

    async def run(self) -> None:
        path = resource_path(API_VERSION, "BrokerTarget", self.namespace)
        await list_and_watch(self.kube, path, self._sync, self._event, what="BrokerTargets")
