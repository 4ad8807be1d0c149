"""Prometheus metrics of the operator: reconciles and tenant clusters by condition."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECONCILES = Counter("keyless_reconcile_total", "RemoteTenantCluster reconciles by outcome reason", ["reason"])
RECONCILE_SECONDS = Histogram("keyless_reconcile_duration_seconds", "Time per reconcile",
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
TENANT_CLUSTERS = Gauge("keyless_tenant_clusters", "RemoteTenantClusters by condition type and status",
                        ["condition", "status"])

_latest: dict[str, dict[str, str]] = {}


def observe_reconcile(reason: str, seconds: float) -> None:
    RECONCILES.labels(reason=reason).inc()
    RECONCILE_SECONDS.observe(seconds)


def _refresh() -> None:
    counts: dict[tuple[str, str], int] = {}
    for conditions in _latest.values():
        for kind, status in conditions.items():
            counts[(kind, status)] = counts.get((kind, status), 0) + 1
    TENANT_CLUSTERS.clear()
    for (kind, status), n in counts.items():
        TENANT_CLUSTERS.labels(condition=kind, status=status).set(n)


def observe_conditions(ref: str, conditions) -> None:
    _latest[ref] = {x.type: x.status for x in conditions}
    _refresh()


def forget(ref: str) -> None:
    if _latest.pop(ref, None) is not None:
        _refresh()
