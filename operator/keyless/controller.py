"""Drives reconciles: on every watch event, on a resync timer (drift repair), and on retry."""
from __future__ import annotations

import asyncio
import copy
import logging
import random

from .model import names
from .reconcile import metrics
from .reconcile.cluster import reconcile
from .reconcile.context import Context

log = logging.getLogger(__name__)


def _older(candidate: dict, held: dict) -> bool:
    """True if `candidate` is an older version of the same object than `held`.

    resourceVersions are opaque strings, but etcd-backed servers issue increasing integers; when
    they are not integers we never drop an event.
    """
    a, b = candidate["metadata"], held["metadata"]
    if a.get("uid") != b.get("uid"):
        return False
    try:
        return int(a.get("resourceVersion", "")) < int(b.get("resourceVersion", ""))
    except ValueError:
        return False


class Controller:
    def __init__(self, ctx: Context, concurrency: int = 32):
        self.ctx = ctx
        self.latest: dict[str, dict] = {}
        self._done_generation: dict[str, tuple[str, int]] = {}
        self._retries: dict[str, asyncio.TimerHandle] = {}
        self._limit = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task] = set()

    @staticmethod
    def ref(raw: dict) -> str:
        return names.owner_ref(raw["metadata"]["namespace"], raw["metadata"]["name"])

    def needs_reconcile(self, raw: dict) -> bool:
        """False for events that only echo our own writes (status, finalizer) on a generation we
        already reconciled; the periodic resync still repairs drift for those."""
        meta = raw["metadata"]
        if meta.get("deletionTimestamp"):
            return True
        return self._done_generation.get(self.ref(raw)) != (meta.get("uid"), meta.get("generation"))

    def observe(self, event_type: str, raw: dict) -> dict | None:
        """Records the newest copy of an object; returns it unless the object is gone."""
        ref = self.ref(raw)
        if event_type == "DELETED":
            self.latest.pop(ref, None)
            self._done_generation.pop(ref, None)
            self.ctx.registry.remove(ref)
            metrics.forget(ref)
            handle = self._retries.pop(ref, None)
            if handle:
                handle.cancel()
            return None
        held = self.latest.get(ref)
        if held is not None and _older(raw, held):
            # An event for a version we already moved past (e.g. our own finalizer patch arriving
            # after our status write): keep the newer copy, or we would redo finished work.
            return held
        self.latest[ref] = copy.deepcopy(raw)
        return self.latest[ref]

    async def handle(self, ref: str) -> None:
        raw = self.latest.get(ref)
        if raw is None:
            return
        async with self._limit:
            try:
                outcome = await reconcile(self.ctx, raw)
            except Exception as e:  # never let one object break the loop; retry with backoff
                log.error("reconcile of %s failed unexpectedly: %s: %s", ref, e.__class__.__name__, e)
                self._schedule_retry(ref)
                return
        if outcome.retry:
            self._schedule_retry(ref)
        else:
            meta = raw["metadata"]
            self._done_generation[ref] = (meta.get("uid"), meta.get("generation"))

    def _schedule_retry(self, ref: str) -> None:
        if ref in self._retries:
            return
        delay = self.ctx.settings.retry_seconds * (1 + random.random())

        def fire() -> None:
            self._retries.pop(ref, None)
            self._spawn(self.handle(ref))

        self._retries[ref] = asyncio.get_running_loop().call_later(delay, fire)

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def resync_forever(self) -> None:
        """Re-reconciles everything periodically: repairs drift such as an edited Argo CD Secret."""
        while True:
            await asyncio.sleep(self.ctx.settings.resync_seconds)
            refs = list(self.latest)
            await asyncio.gather(*(self.handle(ref) for ref in refs), return_exceptions=True)
