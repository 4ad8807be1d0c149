"""Prometheus metrics of one broker instance (its own registry, so tests can run several)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class BrokerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.mints = Counter("keyless_broker_tokens_minted", "Tokens issued, by target.", ["target"],
                             registry=self.registry)
        self.denials = Counter("keyless_broker_denials", "Refused token requests, by reason.", ["reason"],
                               registry=self.registry)
        self.latency = Histogram("keyless_broker_request_duration_seconds",
                                 "Time to answer a token request (granted or refused).",
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
                                 registry=self.registry)
        self.key_age = Gauge("keyless_broker_signing_key_age_seconds", "Age of the key that signs now.",
                             registry=self.registry)
        self.keys_published = Gauge("keyless_broker_published_keys", "Keys in the JWKS.", registry=self.registry)
        self.key_writer = Gauge("keyless_broker_key_writer", "1 when this replica holds the key writer Lease.",
                                registry=self.registry)
        self.reviews = Counter("keyless_broker_token_reviews", "TokenReviews sent to the API server.",
                               registry=self.registry)
        self.targets = Gauge("keyless_broker_targets", "Broker targets known.", registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
