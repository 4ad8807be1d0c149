"""The status of a RemoteTenantCluster, built by one type that knows its shape: the conditions (Ready
summarising the steps, merged per the API conventions), observedGeneration, the fields every client reads
(targetName, audience, issuer, argocdSecret) and the few fields a step reports (STEP_FIELDS). Pure."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from ..model import conditions as c
from ..model.spec import RemoteTenantCluster

# Status fields a step may report through StepResult.status (None removes the field).
STEP_FIELDS = frozenset({
    "authenticationConfiguration",  # ProxyReady, Direct mode: what the tenant API server must load
    "clusterProfile",  # ClusterProfilePublished: where the profile is
})


@dataclass
class ClusterStatus:
    observed_generation: int
    steps: dict[str, c.Condition]
    target_name: str | None = None
    audience: str | None = None
    issuer: str | None = None
    argocd_secret: str | None = None
    step_fields: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def of(cls, generation: int, steps: Mapping[str, c.Condition], cluster: RemoteTenantCluster | None = None, *,
           issuer: str | None = None, argocd_secret: str | None = None) -> "ClusterStatus":
        status = cls(generation, dict(steps))
        if cluster is not None:
            status.target_name, status.audience = cluster.target_name, cluster.access.audience
            status.issuer, status.argocd_secret = issuer, argocd_secret
        return status

    def add_step_fields(self, fields: Mapping[str, str | None] | None) -> None:
        unknown = set(fields or ()) - STEP_FIELDS
        if unknown:
            raise ValueError(f"a step reported unknown status fields {sorted(unknown)}")
        self.step_fields.update(fields or {})

    @property
    def ready(self) -> c.Condition:
        return c.summarize(self.steps)

    def conditions(self) -> list[c.Condition]:
        """Ready first, then the steps in the order a human should read (and fix) them."""
        return [self.ready, *(self.steps[k] for k in c.REPORTED_CONDITIONS if k in self.steps)]

    def patch(self, old_status: Mapping | None) -> dict | None:
        """The status to write, or None when the stored one already says all of it (steady state)."""
        old_status = old_status or {}
        merged = c.merge(old_status.get("conditions"), self.conditions(), self.observed_generation)
        status: dict = {"observedGeneration": self.observed_generation, "conditions": merged}
        for key, value in (("targetName", self.target_name), ("audience", self.audience), ("issuer", self.issuer),
                           ("argocdSecret", self.argocd_secret)):
            if value is not None:
                status[key] = value
        status.update(self.step_fields)
        extras_same = all(old_status.get(k) == v for k, v in status.items() if k != "conditions")
        if extras_same and not c.changed(old_status.get("conditions"), merged):
            return None
        return status
