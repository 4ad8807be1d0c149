"""Leader election with a coordination.k8s.io Lease: exactly one operator replica reconciles."""
from __future__ import annotations

import asyncio
import datetime
import logging
import os
import socket
import time

from .client import API_ERRORS, Kube, KubeConfig, KubeError, resource_path

log = logging.getLogger(__name__)

LEASE_SECONDS = 15
RENEW_SECONDS = 5


def _fmt(epoch: float) -> str:
    moment = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(value: str | None) -> float | None:
    if not value:
        return None
    text = value.replace("Z", "+00:00")
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


async def try_acquire(kube: Kube, namespace: str, name: str, identity: str, *,
                      lease_seconds: int = LEASE_SECONDS, now: float | None = None) -> bool:
    """One attempt to take or renew the Lease; optimistic concurrency via resourceVersion.

    Used by the operator (one active replica) and the broker (one key writer).
    """
    now = time.time() if now is None else now
    path = resource_path("coordination.k8s.io/v1", "Lease", namespace, name)
    lease = await kube.get(path)
    spec = {"holderIdentity": identity, "leaseDurationSeconds": lease_seconds, "renewTime": _fmt(now)}
    if lease is None:
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {**spec, "acquireTime": _fmt(now), "leaseTransitions": 0}}
        try:
            await kube.create(resource_path("coordination.k8s.io/v1", "Lease", namespace), body)
            return True
        except KubeError as e:
            if e.status == 409:
                return False
            raise
    current = lease.get("spec") or {}
    holder = current.get("holderIdentity")
    renewed = _parse(current.get("renewTime"))
    duration = float(current.get("leaseDurationSeconds") or lease_seconds)
    expired = renewed is None or now - renewed > duration
    if holder not in (identity, None, "") and not expired:
        return False
    if holder != identity:
        spec["acquireTime"] = _fmt(now)
        spec["leaseTransitions"] = int(current.get("leaseTransitions") or 0) + 1
    lease["spec"] = {**current, **spec}
    try:
        await kube.request("PUT", path, body=lease)
        return True
    except KubeError as e:
        if e.status == 409:
            return False
        raise


async def hold_leadership(kubeconfig: str | None, namespace: str, name: str, stop: asyncio.Event) -> asyncio.Task:
    """Waits until this replica leads, then renews in the background; on loss sets `stop`."""
    identity = f"{socket.gethostname()}-{os.getpid()}"
    kube = Kube(KubeConfig.default(kubeconfig), user_agent="keyless-operator-election")
    while True:
        try:
            if await try_acquire(kube, namespace, name, identity):
                break
        except API_ERRORS as e:
            log.warning("leader election: %s", e)
        await asyncio.sleep(RENEW_SECONDS)
    log.info("leader election: %s now leads %s/%s", identity, namespace, name)

    async def renew() -> None:
        failures_since = None
        try:
            while True:
                await asyncio.sleep(RENEW_SECONDS)
                try:
                    ok = await try_acquire(kube, namespace, name, identity)
                except API_ERRORS:
                    ok = False
                if ok:
                    failures_since = None
                    continue
                failures_since = failures_since or time.monotonic()
                if time.monotonic() - failures_since > LEASE_SECONDS - RENEW_SECONDS:
                    log.error("leader election: lost the lease; stopping so a standby can take over")
                    stop.set()
                    return
        finally:
            await kube.close()

    task = asyncio.create_task(renew())
    # Whatever ends the renewer (even a bug), this replica must stop leading.
    task.add_done_callback(lambda _: stop.set())
    return task
