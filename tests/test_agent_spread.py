"""The agent at fleet size: thousands of targets reach the broker as a flat stream, never a burst. Pure
scheduling checks (a stand-in broker client in process, no clock waits); the real figures come from
bench/bench_agent_scale.py."""
from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from datetime import datetime, timedelta, timezone

from keyless.agent import files
from keyless.agent.exec_credential import (build_exec_credential, refresh_delay_seconds,
                                           spread_refresh_delay_seconds, stated_expiry)
from keyless.agent.keeper import MAX_CONCURRENT_REFRESHES, CredentialKeeper, TargetState
from keyless.agent.metrics import AgentMetrics
from keyless.brokerclient.reply import MintedToken

V1 = "client.authentication.k8s.io/v1"
V1BETA1 = "client.authentication.k8s.io/v1beta1"


def _mints_per_bin(first_delay, targets: int, lifetime: float, periods: int, rng: random.Random) -> Counter:
    """Simulates `targets` minted together at 0 and refreshed ever after (first refresh `first_delay`,
    then every half lifetime with the agent's jitter); counts mints per tenth of a refresh period,
    from the second period on."""
    period = lifetime / 2
    width = period / 10
    bins: Counter = Counter()
    for _ in range(targets):
        at = first_delay(rng)
        while at < (periods + 1) * period:
            if at >= period:
                bins[int((at - period) // width)] += 1
            at += refresh_delay_seconds(lifetime, rng.uniform(-1.0, 1.0))
    return bins


def test_targets_minted_together_refresh_as_a_flat_stream_where_half_life_refreshes_alone_come_back_as_bursts():
    rng = random.Random(7)
    lifetime, targets, periods = 60.0, 5000, 6
    spread = _mints_per_bin(lambda r: spread_refresh_delay_seconds(lifetime, r.random()), targets, lifetime,
                            periods, rng)
    flat = targets / 10  # mints per bin when each target refreshes once per period, evenly
    assert max(spread.values()) < 1.25 * flat and min(spread.values()) > 0.75 * flat
    # Without the spread every target's first refresh comes at half the lifetime too: one burst per period.
    bursty = _mints_per_bin(lambda r: refresh_delay_seconds(lifetime, r.uniform(-1.0, 1.0)), targets, lifetime,
                            periods, rng)
    assert max(bursty.values()) > 4 * flat


def test_the_first_refresh_lands_within_one_period_and_well_before_the_stated_expiry():
    for lifetime in (30.0, 60.0, 300.0, 3600.0):
        earliest, latest = spread_refresh_delay_seconds(lifetime, 0.0), spread_refresh_delay_seconds(lifetime, 1.0)
        assert latest - earliest == lifetime / 2
        expiry = stated_expiry(datetime(2030, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=lifetime), lifetime)
        assert 0 < earliest and datetime(2030, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=latest) < expiry


class StandInBroker:
    """The broker client's shape, answering in process; counts requests in flight at once."""

    def __init__(self, lifetime: float = 60.0):
        self.lifetime = lifetime
        self.in_flight = 0
        self.most_in_flight = 0
        self.release = asyncio.Event()

    async def mint(self, target: str) -> MintedToken:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.release.wait()
        finally:
            self.in_flight -= 1
        now = datetime.now(timezone.utc)
        return MintedToken("header.payload.signature", now, self.lifetime, now + timedelta(seconds=self.lifetime))


def _keeper(tmp_path, broker, seed: int = 1) -> CredentialKeeper:
    return CredentialKeeper(broker, tmp_path, V1, AgentMetrics(), rng=random.Random(seed))


def test_no_more_than_a_few_token_requests_are_in_flight_however_many_targets_are_due(tmp_path):
    async def scenario():
        broker = StandInBroker()
        keeper = _keeper(tmp_path, broker)
        states = [TargetState(f"ns.c{i}", 60.0) for i in range(200)]
        refreshes = [asyncio.create_task(keeper._refresh(s)) for s in states]
        await asyncio.sleep(0.05)
        assert broker.in_flight == MAX_CONCURRENT_REFRESHES
        broker.release.set()
        await asyncio.gather(*refreshes)
        assert broker.most_in_flight == MAX_CONCURRENT_REFRESHES
        for s in states:
            if s.expiry_timer:
                s.expiry_timer.cancel()
        return states

    states = asyncio.run(scenario())
    assert all(s.expires_at is not None for s in states)
    assert len(list(tmp_path.glob("*.json"))) == 200


def test_first_refresh_is_spread_over_a_period_and_later_ones_come_at_about_half_the_lifetime(tmp_path):
    async def scenario():
        broker = StandInBroker(lifetime=60.0)
        broker.release.set()
        keeper = _keeper(tmp_path, broker)
        states = [TargetState(f"ns.c{i}", 60.0) for i in range(300)]
        first = []
        for s in states:
            before = datetime.now(timezone.utc).timestamp()
            await keeper._refresh(s)
            first.append(s.refresh_at - before)
        later = []
        for s in states[:50]:
            before = datetime.now(timezone.utc).timestamp()
            await keeper._refresh(s)
            later.append(s.refresh_at - before)
        after_outage = []
        for s in states[50:150]:
            s.failures = 3  # e.g. the broker was down: every target recovers at the same moment
            before = datetime.now(timezone.utc).timestamp()
            await keeper._refresh(s)
            after_outage.append(s.refresh_at - before)
        for s in states:
            s.expiry_timer.cancel()
        return first, later, after_outage

    first, later, after_outage = asyncio.run(scenario())
    assert max(after_outage) - min(after_outage) > 20  # spread again, not back in lock-step
    assert 5.9 < min(first) and max(first) < 36.1  # a tenth to six tenths of the lifetime
    assert max(first) - min(first) > 25            # spread over (nearly) the whole period
    assert all(28.7 < d < 31.3 for d in later)     # half the lifetime, +/- a fiftieth: the phase stays


def test_files_adopted_after_a_restart_are_renewed_spread_over_half_their_time_left_or_at_once_in_another_api_version(
        tmp_path):
    now = datetime.now(timezone.utc)
    for i in range(100):
        expiry = (now + timedelta(seconds=40)).replace(microsecond=0)
        version = V1BETA1 if i == 0 else V1
        files.write_credential(tmp_path, f"ns.c{i}", build_exec_credential("header.payload.signature", expiry, version))

    async def scenario():
        keeper = _keeper(tmp_path, StandInBroker())
        started = datetime.now(timezone.utc).timestamp()
        keeper._adopt_existing_files()
        states = dict(keeper._states)
        for s in states.values():
            s.expiry_timer.cancel()
        return {name: s.refresh_at - started for name, s in states.items()}

    delays = asyncio.run(scenario())
    assert len(delays) == 100
    assert delays.pop("ns.c0") < 0.5  # v1beta1 file while the agent writes v1: renewed first
    assert all(0 <= d < 20 for d in delays.values())  # within half of the ~39 s left
    assert max(delays.values()) - min(delays.values()) > 10
    assert json.loads((tmp_path / "ns.c1.json").read_text())["apiVersion"] == V1
