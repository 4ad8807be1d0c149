"""Status conditions per the Kubernetes API conventions; Ready summarises the step conditions."""
from __future__ import annotations

import datetime
from dataclasses import dataclass

READY = "Ready"
ARGO_CLUSTER_REGISTERED = "ArgoClusterRegistered"
APP_PROJECT_READY = "AppProjectReady"
BROKER_TARGET_REGISTERED = "BrokerTargetRegistered"
PROXY_READY = "ProxyReady"
TOKEN_VERIFIED = "TokenVerified"

CLUSTER_PROFILE_PUBLISHED = "ClusterProfilePublished"

# The order in which a human should read (and fix) them.
STEP_CONDITIONS = (ARGO_CLUSTER_REGISTERED, APP_PROJECT_READY, BROKER_TARGET_REGISTERED, PROXY_READY, TOKEN_VERIFIED)
# Steps of optional features (operator flags): reported, and part of Ready, only when the feature is on.
OPTIONAL_CONDITIONS = (CLUSTER_PROFILE_PUBLISHED,)
REPORTED_CONDITIONS = STEP_CONDITIONS + OPTIONAL_CONDITIONS

TRUE, FALSE, UNKNOWN = "True", "False", "Unknown"


@dataclass(frozen=True)
class Condition:
    type: str
    status: str
    reason: str
    message: str = ""

    @property
    def is_true(self) -> bool:
        return self.status == TRUE


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def summarize(steps: dict[str, Condition]) -> Condition:
    """Ready is True only when every step is True; otherwise it carries the first failing step's reason."""
    for kind in REPORTED_CONDITIONS:
        condition = steps.get(kind)
        if condition is None:
            continue
        if not condition.is_true:
            return Condition(READY, FALSE, condition.reason, f"{kind}: {condition.message}")
    return Condition(READY, TRUE, "Reconciled", "Argo CD can reach the tenant cluster with short-lived tokens")


def merge(existing: list[dict] | None, wanted: list[Condition], generation: int) -> list[dict]:
    """New conditions list; a condition whose status did not change keeps its lastTransitionTime."""
    previous = {c.get("type"): c for c in existing or []}
    merged = []
    stamp = now_rfc3339()
    for condition in wanted:
        old = previous.get(condition.type)
        transition = stamp
        if old and old.get("status") == condition.status and old.get("lastTransitionTime"):
            transition = old["lastTransitionTime"]
        merged.append({
            "type": condition.type,
            "status": condition.status,
            "reason": condition.reason,
            "message": condition.message,
            "lastTransitionTime": transition,
            "observedGeneration": generation,
        })
    return merged


def changed(existing: list[dict] | None, merged: list[dict]) -> bool:
    def key(conditions):
        return sorted((c.get("type"), c.get("status"), c.get("reason"), c.get("message"),
                       c.get("observedGeneration")) for c in conditions or [])
    return key(existing) != key(merged)
