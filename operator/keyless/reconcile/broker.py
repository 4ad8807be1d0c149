"""Reconcile step BrokerTargetRegistered: the cluster's target in the Keyless broker (or OpenUnison)."""
from __future__ import annotations

from ..kube.apply import OwnershipConflict, apply_if_changed, delete_if_owned
from ..model import conditions as c
from ..model import names
from ..model.spec import RemoteTenantCluster
from ..render.broker_target import render_target
from .context import Context, Flow, StepResult


async def reconcile_broker_target(ctx: Context, cluster: RemoteTenantCluster, flow: Flow) -> StepResult:
    kind = c.BROKER_TARGET_REGISTERED
    target = render_target(cluster, ctx.settings)
    try:
        outcome = await apply_if_changed(ctx.kube, target, names.FIELD_MANAGER_OPERATOR, owner=cluster.ref)
    except OwnershipConflict as e:
        return StepResult(c.Condition(kind, c.FALSE, "Conflict", f"{e}; Keyless never overwrites it"))
    meta = target["metadata"]
    where = f"{target['kind']} {meta['namespace']}/{meta['name']}"
    changes = () if outcome == "unchanged" else (f"{outcome.capitalize()} {where}",)
    return StepResult(c.Condition(kind, c.TRUE, "Registered",
                                  f"{where} mints tokens for audience {cluster.access.audience}"), changes)


async def cleanup_broker_target(ctx: Context, cluster: RemoteTenantCluster) -> list[str]:
    target = render_target(cluster, ctx.settings)
    meta = target["metadata"]
    if await delete_if_owned(ctx.kube, target["apiVersion"], target["kind"], meta["namespace"], meta["name"],
                             cluster.ref):
        return [f"Deleted {target['kind']} {meta['namespace']}/{meta['name']}"]
    return []
