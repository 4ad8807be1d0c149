"""Drives reconciles: on every watch event, on a resync timer (drift repair), and on retry.

Why Keyless drives its own loop instead of kopf's per-object handlers (@kopf.on.create/update/resume,
timers, kopf.TemporaryError): kopf keeps its handler progress and the last-handled configuration in
annotations and status of the object, so every handled change, retry and timer tick is a write, and
a manifest synced by Argo CD would show kopf's annotations as drift. Keyless wants a steady state to
cost reads only (tests/test_operator_control_plane.py proves zero writes in a quiet minute with 50
manifests) and the manifest to stay exactly as its author wrote it. So kopf only delivers the raw
watch events (handlers.py); this module keeps the newest copy of each object in memory, skips echoes
of its own writes, reconciles on new generations, repairs drift on a timer, and decides retries:
transient failures back off exponentially with jitter, permanent ones (reconcile/errors.py) wait for
the manifest to change or a slow back-off.
"""
from __future__ import annotations

import asyncio
import copy
import logging
import random

from .backoff import backoff_delay_seconds
from .model import names
from .model.spec import SpecError, parse
from .reconcile import metrics
from .reconcile.cluster import Outcome, reconcile
from .reconcile.context import Context
from .reconcile.errors import Retry

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
        self._retries: dict[str, tuple[float, asyncio.TimerHandle]] = {}  # ref -> (when, timer)
        self._failures: dict[str, int] = {}  # consecutive transient failures
        self._quiet_until: dict[str, float] = {}  # after a permanent failure: no resync before this
        self._reported: dict[str, tuple] = {}  # ref -> the failing outcome last logged at INFO
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
            self._failures.pop(ref, None)
            self._quiet_until.pop(ref, None)
            self._reported.pop(ref, None)
            self.ctx.registry.remove(ref)
            metrics.forget(ref)
            retry = self._retries.pop(ref, None)
            if retry:
                retry[1].cancel()
            return None
        held = self.latest.get(ref)
        if held is not None and _older(raw, held):
            # An event for a version we already moved past (e.g. our own finalizer patch arriving
            # after our status write): keep the newer copy, or we would redo finished work.
            return held
        self.latest[ref] = copy.deepcopy(raw)
        if not raw["metadata"].get("deletionTimestamp"):
            # Known to the claims before its reconcile, as the start-up listing seeds them: what a
            # manifest holds does not depend on when its turn comes, and under a burst the first
            # reconcile of a tenant writes its AppProject with every cluster the watch has delivered,
            # not one destination per write.
            try:
                self.ctx.registry.put(parse(self.latest[ref]))
            except SpecError:
                pass  # reported as InvalidSpec by its reconcile
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
                self._after(ref, Outcome("Error", Retry.TRANSIENT))
                return
        meta = raw["metadata"]
        self._done_generation[ref] = (meta.get("uid"), meta.get("generation"))
        self._report(ref, outcome)
        self._after(ref, outcome)

    def _report(self, ref: str, outcome: Outcome) -> None:
        """One INFO line per reconcile that changed something, or that failed differently from the last
        failure reported for this manifest; a failure repeated by resyncs or retries only at DEBUG."""
        failed = outcome.status == "False" or outcome.retry is not Retry.NONE
        key = (outcome.condition, outcome.status, outcome.reason, outcome.message)
        if outcome.changed or (failed and self._reported.get(ref) != key):
            level = logging.INFO
        else:
            level = logging.DEBUG
        if failed:
            self._reported[ref] = key
        else:
            self._reported.pop(ref, None)
        if not log.isEnabledFor(level):
            return
        what = "changed" if outcome.changed else "failing" if failed else "unchanged"
        condition = f"{outcome.condition}={outcome.status}" if outcome.condition else "-"
        retry = "" if outcome.retry is Retry.NONE else f" (retry: {outcome.retry.name.lower()})"
        log.log(level, "%s %s: %s reason=%s%s: %s", ref, what, condition, outcome.reason, retry,
                outcome.message or "-")

    def spawn_handle(self, ref: str) -> None:
        """Reconciles `ref` soon, outside the caller (e.g. when its namespace changed owner)."""
        self._spawn(self.handle(ref))

    def _after(self, ref: str, outcome: Outcome) -> None:
        """Decides when `ref` is reconciled again after this outcome."""
        settings = self.ctx.settings
        if outcome.retry is Retry.NONE:
            self._failures.pop(ref, None)
            self._quiet_until.pop(ref, None)
            return
        if outcome.retry is Retry.PERMANENT:
            self._failures.pop(ref, None)
            delay = settings.permanent_retry_seconds
            self._quiet_until[ref] = asyncio.get_running_loop().time() + delay
        else:
            self._failures[ref] = failures = self._failures.get(ref, 0) + 1
            self._quiet_until.pop(ref, None)
            delay = backoff_delay_seconds(failures, random.random(), base=settings.retry_seconds,
                                          cap=settings.max_retry_seconds)
        metrics.observe_retry(outcome.retry.name.lower())
        self._schedule(ref, delay)

    def _schedule(self, ref: str, delay: float) -> None:
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        pending = self._retries.get(ref)
        if pending is not None:
            if pending[0] <= when:
                return  # an earlier retry is already due
            pending[1].cancel()

        def fire() -> None:
            self._retries.pop(ref, None)
            self._spawn(self.handle(ref))

        self._retries[ref] = (when, loop.call_at(when, fire))

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def resync_forever(self) -> None:
        """Re-reconciles everything periodically: repairs drift such as an edited Argo CD Secret. A
        manifest that failed permanently waits for its slow back-off (or a change of it) instead."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.ctx.settings.resync_seconds)
            now = loop.time()
            refs = [ref for ref in self.latest if self._quiet_until.get(ref, 0.0) <= now]
            await asyncio.gather(*(self.handle(ref) for ref in refs), return_exceptions=True)
            metrics.observe_resync()
