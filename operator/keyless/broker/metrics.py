"""Prometheus metrics of one broker instance (its own registry, so tests can run several)."""
from __future__ import annotations

import bisect

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import HistogramMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class BrokerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.mints = Counter("keyless_broker_tokens_minted", "Tokens issued, by target.", ["target"],
                             registry=self.registry)
        self.denials = Counter("keyless_broker_denials", "Refused token requests, by reason.", ["reason"],
                               registry=self.registry)
        self.latency = FastHistogram("keyless_broker_request_duration_seconds",
                                     "Time to answer a token request (granted or refused).",
                                     (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.registry.register(self.latency)
        self.key_age = Gauge("keyless_broker_signing_key_age_seconds", "Age of the key that signs now.",
                             registry=self.registry)
        self.keys_published = Gauge("keyless_broker_published_keys", "Keys in the JWKS.", registry=self.registry)
        self.key_writer = Gauge("keyless_broker_key_writer", "1 when this replica holds the key writer Lease.",
                                registry=self.registry)
        self.reviews = Counter("keyless_broker_token_reviews", "TokenReviews sent to the API server.",
                               registry=self.registry)
        self.targets = Gauge("keyless_broker_targets", "Broker targets known.", registry=self.registry)
        self.responses = Counter("keyless_broker_token_responses",
                                 "Answers to token and target-list requests (/v1/..., /api/...), by HTTP status "
                                 "code: what callers got, probes excluded.", ["code"], registry=self.registry)
        self.key_rotation = Gauge("keyless_broker_key_rotation_seconds",
                                  "Configured key rotation period (--key-rotation-seconds).", registry=self.registry)
        self._by_code: dict[int, object] = {}

    def count_response(self, status: int) -> None:
        counter = self._by_code.get(status)
        if counter is None:
            counter = self._by_code[status] = self.responses.labels(str(status))
        counter.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class FastHistogram:
    """A label-less histogram for the mint path: prometheus_client's takes a lock and several calls per
    observation, which is measurable at thousands of tokens per second. Single event loop: no lock."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]):
        self.name, self.documentation = name, documentation
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def collect(self):
        family = HistogramMetricFamily(self.name, self.documentation)
        cumulative, running = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts):
            running += count
            cumulative.append((bound, running))
        family.add_metric([], cumulative, self.sum)
        yield family

    def describe(self):
        return [HistogramMetricFamily(self.name, self.documentation)]
