"""The agent's Prometheus metrics (its own registry, so tests and several agents never collide)."""
from __future__ import annotations

from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge


class _Keeper(Protocol):
    def target_count(self) -> int: ...
    def min_remaining_seconds(self) -> float: ...
    def min_remaining_ratio(self) -> float: ...


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.refreshes = Counter("keyless_agent_refreshes", "Credential files written with a new token.",
                                 registry=self.registry)
        self.refresh_failures = Counter("keyless_agent_refresh_failures",
                                        "Token refreshes that failed, by reason.", ["reason"], registry=self.registry)
        self.target_list_failures = Counter("keyless_agent_target_list_failures",
                                            "Failed attempts to list this agent's targets, by reason.", ["reason"],
                                            registry=self.registry)
        self.files_removed = Counter("keyless_agent_credential_files_removed",
                                     "Credential files removed: target_removed, or expired before a refresh "
                                     "succeeded.", ["reason"], registry=self.registry)
        self.broker_up = Gauge("keyless_agent_broker_up", "1 when the broker answered the last request.",
                               registry=self.registry)
        self.targets = Gauge("keyless_agent_targets", "Targets this agent keeps a credential for.",
                             registry=self.registry)
        self.min_remaining = Gauge("keyless_agent_credential_min_remaining_seconds",
                                   "Seconds until the soonest-expiring credential expires (0: a target has none).",
                                   registry=self.registry)
        self.min_remaining_ratio = Gauge(
            "keyless_agent_credential_min_remaining_ratio",
            "Smallest share of its lifetime any credential has left (0: a target has none; 1: no targets). "
            "At least ~0.2 while refreshes succeed (they come at about half the lifetime).",
            registry=self.registry)
        for reason in ("unavailable", "unauthorized", "forbidden", "not_found"):
            self.refresh_failures.labels(reason=reason)
        for reason in ("target_removed", "expired"):
            self.files_removed.labels(reason=reason)

    def bind(self, keeper: _Keeper) -> None:
        self.targets.set_function(keeper.target_count)
        self.min_remaining.set_function(keeper.min_remaining_seconds)
        self.min_remaining_ratio.set_function(keeper.min_remaining_ratio)
