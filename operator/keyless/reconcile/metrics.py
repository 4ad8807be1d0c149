"""Prometheus metrics of the operator (all named keyless_operator_*): reconciles, resyncs, retries, and tenant
clusters by condition and readiness."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from ..model.conditions import READY

RECONCILES = Counter("keyless_operator_reconciles_total", "RemoteTenantCluster reconciles by outcome reason", ["reason"])
RECONCILE_SECONDS = Histogram("keyless_operator_reconcile_duration_seconds", "Time per reconcile",
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
RESYNCS = Counter("keyless_operator_resyncs_total", "Completed resync rounds (every manifest reconciled again)")
RETRIES = Counter("keyless_operator_reconcile_retries_total",
                  "Reconciles scheduled again after a failure, by kind (transient: backing off; permanent: "
                  "waiting for a change of the manifest or the slow back-off)", ["kind"])
TENANT_CLUSTERS = Gauge("keyless_operator_tenant_clusters", "RemoteTenantClusters by condition type and status",
                        ["condition", "status"])
# One series per cluster and condition, valued 1, carrying the current status (as cert-manager's
# certificate_ready_status does): what an alert names a cluster by. Labels avoid `namespace`/`name`,
# which Prometheus gives the scraped Pod.
CLUSTER_CONDITION = Gauge("keyless_operator_cluster_condition",
                          "The current status of each RemoteTenantCluster condition (value 1)",
                          ["cluster_namespace", "cluster_name", "condition", "status"])

# One series per cluster: 1 while its Ready condition is True, else 0 (the per-cluster readiness to alert on
# and to graph; keyless_operator_cluster_condition has every condition). Same label names as above.
CLUSTER_READY = Gauge("keyless_operator_cluster_ready",
                      "1 when the RemoteTenantCluster's Ready condition is True, else 0",
                      ["cluster_namespace", "cluster_name"])

_latest: dict[str, dict[str, str]] = {}
_counts: dict[tuple[str, str], int] = {}  # (condition, status) -> manifests, as TENANT_CLUSTERS shows


def observe_reconcile(reason: str, seconds: float) -> None:
    RECONCILES.labels(reason=reason).inc()
    RECONCILE_SECONDS.observe(seconds)


def observe_resync() -> None:
    RESYNCS.inc()


def observe_retry(kind: str) -> None:
    RETRIES.labels(kind=kind).inc()


def _count(old: dict[str, str], new: dict[str, str]) -> None:
    """TENANT_CLUSTERS moved by one manifest's change (a recount of every manifest per change cost O(N));
    a (condition, status) no manifest has any more disappears, as after a recount."""
    for kind, status in old.items():
        if new.get(kind) != status:
            left = _counts[(kind, status)] = _counts.get((kind, status), 0) - 1
            if left <= 0:
                del _counts[(kind, status)]
                try:
                    TENANT_CLUSTERS.remove(kind, status)
                except KeyError:
                    pass
            else:
                TENANT_CLUSTERS.labels(condition=kind, status=status).set(left)
    for kind, status in new.items():
        if old.get(kind) != status:
            _counts[(kind, status)] = _counts.get((kind, status), 0) + 1
            TENANT_CLUSTERS.labels(condition=kind, status=status).set(_counts[(kind, status)])


def _set_cluster_series(ref: str, old: dict[str, str], new: dict[str, str]) -> None:
    namespace, _, name = ref.partition("/")
    for kind, status in old.items():
        if new.get(kind) != status:
            try:
                CLUSTER_CONDITION.remove(namespace, name, kind, status)
            except KeyError:
                pass
    for kind, status in new.items():
        CLUSTER_CONDITION.labels(namespace, name, kind, status).set(1)
    if new:
        CLUSTER_READY.labels(namespace, name).set(1 if new.get(READY) == "True" else 0)
    else:
        try:
            CLUSTER_READY.remove(namespace, name)
        except KeyError:
            pass


def observe_conditions(ref: str, conditions) -> None:
    new = {x.type: x.status for x in conditions}
    old = _latest.get(ref, {})
    _latest[ref] = new
    if old != new:
        _set_cluster_series(ref, old, new)
        _count(old, new)


def forget(ref: str) -> None:
    old = _latest.pop(ref, None)
    if old is not None:
        _set_cluster_series(ref, old, {})
        _count(old, {})
