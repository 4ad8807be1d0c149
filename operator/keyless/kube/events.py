"""Kubernetes Events for a RemoteTenantCluster: what changed, and what the user should fix."""
from __future__ import annotations

import datetime
import logging
import uuid

from .client import API_ERRORS, Kube, resource_path

log = logging.getLogger(__name__)


class EventRecorder:
    def __init__(self, kube: Kube, component: str = "keyless-operator"):
        self.kube = kube
        self.component = component

    async def record(self, involved: dict, event_type: str, reason: str, message: str) -> None:
        """Posts an Event; failures are logged, never raised (an event must not break a reconcile)."""
        meta = involved["metadata"]
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name'][:200]}.{uuid.uuid4().hex[:12]}", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": involved["apiVersion"], "kind": involved["kind"], "name": meta["name"],
                "namespace": meta["namespace"], "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": event_type,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": self.component},
            "reportingComponent": self.component,
            "reportingInstance": self.component,
            "firstTimestamp": now[:19] + "Z",
            "lastTimestamp": now[:19] + "Z",
            "count": 1,
        }
        try:
            await self.kube.create(resource_path("v1", "Event", meta["namespace"]), body)
        except API_ERRORS as e:
            log.warning("could not post event %s for %s/%s: %s", reason, meta["namespace"], meta["name"], e)
