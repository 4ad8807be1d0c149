"""Reconcile step BrokerTargetRegistered: the cluster's target in the Keyless broker (or OpenUnison)."""
from __future__ import annotations

from ..kube.apply import OwnershipConflict, apply_if_changed, delete_if_owned
from ..model import conditions as c
from ..model import names
from ..model.spec import BrokerKind, RemoteTenantCluster
from ..render import broker_target as render
from .context import Context, StepResult


def desired_target(ctx: Context, cluster: RemoteTenantCluster) -> dict:
    return desired_target_for(ctx.settings, cluster)


def desired_target_for(settings, cluster: RemoteTenantCluster) -> dict:
    labels = cluster.ownership_labels()
    annotations = cluster.ownership_annotations()
    if cluster.broker_kind is BrokerKind.OPENUNISON:
        ou = cluster.openunison
        return render.render_openunison_target(
            name=names.dns_label(cluster.namespace, cluster.name), namespace=ou.namespace,
            url=cluster.server, ca_pem=cluster.ca_pem, issuer=ou.issuer, idp=ou.idp,
            username=cluster.access.username, audience=cluster.access.audience,
            labels=labels, annotations=annotations,
        )
    return render.render_broker_target(
        name=cluster.target_name, namespace=settings.broker_namespace,
        audience=cluster.access.audience, username=cluster.access.username,
        groups=list(cluster.access.groups), allowed_callers=list(cluster.access.allowed_callers),
        ttl_seconds=cluster.access.token_ttl_seconds,
        cluster_namespace=cluster.namespace, cluster_name=cluster.name,
        labels=labels, annotations=annotations,
    )


async def reconcile_broker_target(ctx: Context, cluster: RemoteTenantCluster) -> StepResult:
    kind = c.BROKER_TARGET_REGISTERED
    target = desired_target(ctx, cluster)
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
    target = desired_target(ctx, cluster)
    meta = target["metadata"]
    if await delete_if_owned(ctx.kube, target["apiVersion"], target["kind"], meta["namespace"], meta["name"],
                             cluster.ref):
        return [f"Deleted {target['kind']} {meta['namespace']}/{meta['name']}"]
    return []
