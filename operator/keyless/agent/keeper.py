"""Keeps one fresh ExecCredential file per broker target: the agent's core loop.

One task lists the targets (and removes the files of targets that went away); one task per target
refreshes its token at about half its lifetime; one timer per file removes it just before its stated
expiry if no refresh has replaced it. The timers do not depend on the broker answering, so a
credential that has expired is never left for Argo CD to read, however the broker misbehaves.

At fleet size (thousands of targets in one agent) the broker must see a steady stream, never a burst:
at most MAX_CONCURRENT_REFRESHES requests are in flight at once, each target's first refresh in this
process (or its first after failures) lands anywhere in one refresh period
(exec_credential.spread_refresh_delay_seconds) and later ones keep that phase, and files adopted after
a restart are renewed spread over the first half of the time they have left.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..backoff import backoff_delay_seconds
from ..brokerclient.aio import BrokerClient
from ..brokerclient.reply import BrokerError, BrokerRefused, BrokerUnavailable, TargetInfo
from . import files
from .exec_credential import (build_exec_credential, real_expiry, refresh_delay_seconds, spread_refresh_delay_seconds,
                              stated_expiry)
from .metrics import AgentMetrics

log = logging.getLogger(__name__)

# A file is removed this long before its stated expiry, so no reader ever sees a credential at or
# past that time, even with a little event-loop lag.
REMOVE_LEAD_SECONDS = 1.0
DEFAULT_LIFETIME_SECONDS = 60.0
# Token requests in flight at once: thousands of targets due together queue here rather than open
# connections (and time out) in the broker client.
MAX_CONCURRENT_REFRESHES = 8


def backoff_cap_seconds(lifetime: float) -> float:
    """Retries must come often enough to renew within the time a credential has left (a tenth of
    the lifetime, between 1 and 10 s)."""
    return max(1.0, min(10.0, lifetime / 10))


@dataclass
class TargetState:
    name: str
    lifetime: float
    expires_at: float | None = None      # stated expiry (epoch s) of the file on disk, None: no file
    refresh_at: float = 0.0              # epoch s
    failures: int = 0
    minted: bool = False                 # a token was minted for it by this process
    task: asyncio.Task | None = field(default=None, repr=False)
    expiry_timer: asyncio.TimerHandle | None = field(default=None, repr=False)


class CredentialKeeper:
    def __init__(self, broker: BrokerClient, directory: Path, api_version: str, metrics: AgentMetrics, *,
                 targets_poll_seconds: float = 15.0, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.time):
        self._broker = broker
        self._dir = directory
        self._api_version = api_version
        self._metrics = metrics
        self._poll = max(0.2, targets_poll_seconds)
        self._rng = rng or random.Random()
        self._clock = clock
        self._states: dict[str, TargetState] = {}
        self._targets_listed = False
        self._broker_down_since: float | None = None
        self._resync = asyncio.Event()
        self._sync_task: asyncio.Task | None = None
        self._in_flight = asyncio.Semaphore(MAX_CONCURRENT_REFRESHES)
        metrics.bind(self)

    # ---- what health and metrics read ------------------------------------------------------------
    def readiness(self) -> tuple[bool, str]:
        if not self._targets_listed:
            return False, "the broker has not listed this agent's targets yet"
        now = self._clock()
        missing = sorted(s.name for s in self._states.values() if s.expires_at is None or s.expires_at <= now)
        outage = ""
        if self._broker_down_since is not None:
            outage = f"; broker unavailable for {now - self._broker_down_since:.0f}s"
        if missing:
            shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
            return False, f"{len(missing)} of {len(self._states)} targets have no valid credential: {shown}{outage}"
        # Still-valid credentials keep Argo CD working through a broker outage: stay ready, say so.
        return True, f"ok: {len(self._states)} credentials valid{outage}"

    def alive(self) -> bool:
        return self._sync_task is None or not self._sync_task.done()

    def target_count(self) -> int:
        return len(self._states)

    def min_remaining_seconds(self) -> float:
        """Seconds until the soonest-expiring credential expires (0 for a target without one)."""
        now = self._clock()
        remaining = [max(0.0, (s.expires_at or now) - now) for s in self._states.values()]
        return min(remaining) if remaining else float("inf")

    def min_remaining_ratio(self) -> float:
        """The smallest share of its lifetime any credential has left (0 without one; 1 with no targets)."""
        now = self._clock()
        ratios = [max(0.0, (s.expires_at or now) - now) / s.lifetime if s.lifetime > 0 else 0.0
                  for s in self._states.values()]
        return min(1.0, min(ratios)) if ratios else 1.0

    # ---- lifecycle -----------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        self._adopt_existing_files()
        self._sync_task = asyncio.create_task(self._sync_targets_forever(), name="keyless-agent-targets")
        stopper = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({self._sync_task, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if self._sync_task.done() and not self._sync_task.cancelled() and self._sync_task.exception():
                raise self._sync_task.exception()
        finally:
            stopper.cancel()
            await self.close()

    async def close(self) -> None:
        tasks = [t for t in [self._sync_task, *(s.task for s in self._states.values())] if t]
        for task in tasks:
            task.cancel()
        for state in self._states.values():
            if state.expiry_timer:
                state.expiry_timer.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- files left from an earlier run --------------------------------------------------------
    def _adopt_existing_files(self) -> None:
        """Files that survive an agent restart keep serving until the first target list (the broker
        may be down right now); expired or unreadable ones go at once."""
        now = self._clock()
        for target, found in files.existing_credentials(self._dir).items():
            if found is None or found[0].timestamp() - REMOVE_LEAD_SECONDS <= now:
                files.remove_credential(self._dir, target)
                log.info("removed stale credential file for target %s", target)
                continue
            expiry, api_version = found
            # It keeps serving up to its expiry; renewed once the broker lists the target: at once in
            # another apiVersion, else anywhere in the first half of the time it has left, so a
            # restarted agent with thousands of files does not renew them all in one burst.
            left = expiry.timestamp() - REMOVE_LEAD_SECONDS - now
            refresh_at = now if api_version != self._api_version else now + self._rng.uniform(0.0, left / 2)
            state = TargetState(target, DEFAULT_LIFETIME_SECONDS, expires_at=expiry.timestamp(), refresh_at=refresh_at)
            self._states[target] = state
            self._arm_expiry(state)

    # ---- the target list -----------------------------------------------------------------------
    async def _sync_targets_forever(self) -> None:
        failures = 0
        while True:
            self._resync.clear()
            try:
                targets = await self._broker.list_targets()
                if self._would_remove(targets):
                    targets = await self._confirmed_list()
            except BrokerError as e:
                failures += 1
                self._record_broker_outcome(e)
                self._metrics.target_list_failures.labels(reason=e.reason).inc()
                delay = backoff_delay_seconds(failures, self._rng.random(), cap=self._poll)
                if failures == 1 or failures % 10 == 0:
                    log.warning("listing targets failed (%s, attempt %d); retrying in %.1fs", e, failures, delay)
            else:
                failures = 0
                self._record_broker_outcome(None)
                self._apply_targets(targets)
                delay = self._poll
            try:
                await asyncio.wait_for(self._resync.wait(), delay)
            except TimeoutError:
                pass

    def _would_remove(self, targets: list[TargetInfo]) -> bool:
        listed = {t.name for t in targets}
        return any(name not in listed for name in self._states)

    async def _confirmed_list(self) -> list[TargetInfo]:
        """Removing a file takes a valid credential away from Argo CD, so a list that drops targets is
        trusted only if the broker said it was ready *before* listing: a broker that has just restarted
        and not yet loaded its registry would otherwise look as if every target were gone."""
        if not await self._broker.ready():
            raise BrokerUnavailable("the broker is not ready; not removing any credential on its word")
        return await self._broker.list_targets()

    def _apply_targets(self, targets: list[TargetInfo]) -> None:
        wanted: dict[str, TargetInfo] = {}
        for target in targets:
            if files.is_safe_target_name(target.name):
                wanted[target.name] = target
            else:
                log.warning("ignoring target with a name unusable as a file name: %r", target.name[:100])
        for name in [n for n in self._states if n not in wanted]:
            self._forget(name)
        now = self._clock()
        for name, target in wanted.items():
            state = self._states.get(name)
            if state is None:
                state = self._states[name] = TargetState(name, target.token_ttl_seconds, refresh_at=now)
                log.info("new target %s (token lifetime %ss)", name, int(target.token_ttl_seconds))
            state.lifetime = target.token_ttl_seconds
            if state.task is None:
                state.task = asyncio.create_task(self._keep_fresh(state), name=f"keyless-agent-{name}")
        self._targets_listed = True

    def _forget(self, name: str) -> None:
        state = self._states.pop(name)
        if state.task:
            state.task.cancel()
        if state.expiry_timer:
            state.expiry_timer.cancel()
        if files.remove_credential(self._dir, name):
            self._metrics.files_removed.labels(reason="target_removed").inc()
        log.info("target %s is no longer available to this agent; its credential file is removed", name)

    # ---- one target ----------------------------------------------------------------------------
    async def _keep_fresh(self, state: TargetState) -> None:
        while True:
            delay = state.refresh_at - self._clock()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                await self._refresh(state)
            except Exception:  # a bug must not silently end this target's refreshes
                log.exception("unexpected error refreshing target %s", state.name)
                self._metrics.refresh_failures.labels(reason="internal").inc()
                state.refresh_at = self._clock() + backoff_cap_seconds(state.lifetime)

    async def _refresh(self, state: TargetState) -> None:
        try:
            async with self._in_flight:
                minted = await self._broker.mint(state.name)
        except BrokerError as e:
            self._record_broker_outcome(e)
            state.failures += 1
            self._metrics.refresh_failures.labels(reason=e.reason).inc()
            delay = backoff_delay_seconds(state.failures, self._rng.random(), cap=backoff_cap_seconds(state.lifetime))
            if isinstance(e, BrokerUnavailable) and e.retry_after:
                delay = max(delay, e.retry_after)  # a rate-limited broker said when
            state.refresh_at = self._clock() + delay
            if isinstance(e, BrokerRefused) and e.status in (403, 404):
                # Probably removed: the target list decides (a broker still warming up may say 404).
                self._resync.set()
            if state.failures == 1 or state.failures % 10 == 0:
                log.warning("refreshing target %s failed (%s, attempt %d); retrying in %.1fs",
                            state.name, e, state.failures, delay)
            return
        self._record_broker_outcome(None)
        expiry = stated_expiry(real_expiry(minted.requested_at, minted.expires_in, minted.broker_expiration),
                               minted.expires_in)
        if expiry.timestamp() - REMOVE_LEAD_SECONDS <= self._clock():
            state.failures += 1
            self._metrics.refresh_failures.labels(reason="too_short").inc()
            state.refresh_at = self._clock() + backoff_cap_seconds(state.lifetime)
            log.warning("token for target %s expires too soon to be useful; retrying", state.name)
            return
        try:
            files.write_credential(self._dir, state.name,
                                   build_exec_credential(minted.token, expiry, self._api_version))
        except OSError as e:
            state.failures += 1
            self._metrics.refresh_failures.labels(reason="write").inc()
            state.refresh_at = self._clock() + backoff_cap_seconds(state.lifetime)
            log.error("cannot write the credential file for target %s: %s", state.name, e.strerror)
            return
        state.expires_at = expiry.timestamp()
        if state.failures:
            log.info("target %s refreshed after %d failed attempts", state.name, state.failures)
        # Its first token in this process, or its first after failures (an outage ends for every target
        # at once): spread over one refresh period; after that, every half lifetime keeps its phase.
        delay = (refresh_delay_seconds(minted.expires_in, self._rng.uniform(-1.0, 1.0))
                 if state.minted and not state.failures
                 else spread_refresh_delay_seconds(minted.expires_in, self._rng.random()))
        state.failures = 0
        state.minted = True
        state.refresh_at = minted.requested_at.timestamp() + delay
        self._metrics.refreshes.inc()
        self._arm_expiry(state)

    def _arm_expiry(self, state: TargetState) -> None:
        if state.expiry_timer:
            state.expiry_timer.cancel()
        assert state.expires_at is not None
        delay = max(0.0, state.expires_at - REMOVE_LEAD_SECONDS - self._clock())
        state.expiry_timer = asyncio.get_running_loop().call_later(delay, self._expire, state.name, state.expires_at)

    def _expire(self, name: str, expires_at: float) -> None:
        state = self._states.get(name)
        if state is None or state.expires_at != expires_at:
            return  # refreshed or forgotten meanwhile
        files.remove_credential(self._dir, name)
        state.expires_at = None
        state.expiry_timer = None
        self._metrics.files_removed.labels(reason="expired").inc()
        log.warning("credential for target %s reached its expiry before a refresh succeeded; file removed", name)

    def _record_broker_outcome(self, error: BrokerError | None) -> None:
        if error is None or isinstance(error, BrokerRefused):
            self._metrics.broker_up.set(1)
            self._broker_down_since = None
        elif isinstance(error, BrokerUnavailable):
            self._metrics.broker_up.set(0)
            if self._broker_down_since is None:
                self._broker_down_since = self._clock()
