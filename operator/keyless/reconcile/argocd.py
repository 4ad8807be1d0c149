"""Reconcile steps for Argo CD: the cluster Secret (ArgoClusterRegistered) and the AppProject."""
from __future__ import annotations

from ..kube.apply import OwnershipConflict, apply_if_changed, delete_if_owned
from ..model import conditions as c
from ..model import names
from ..model.spec import RemoteTenantCluster
from ..render.argocd import argocd_secret_name, render_app_project, render_argocd_cluster_secret
from .conflicts import find_cluster_conflict, find_secret_conflict
from .context import Context, StepResult


def conflict_message(ctx: Context, cluster: RemoteTenantCluster) -> str | None:
    message = find_cluster_conflict(cluster, ctx.registry.live())
    if message:
        return message
    informer = ctx.argo_secrets.get(cluster.argocd.namespace)
    if informer is not None:
        return find_secret_conflict(cluster, argocd_secret_name(cluster), informer.items.values())
    return None


async def remove_orphaned_secrets(ctx: Context, cluster: RemoteTenantCluster) -> list[str]:
    """Deletes Keyless cluster Secrets in our way whose RemoteTenantCluster no longer exists (e.g. its
    finalizer was removed by hand before the operator could clean up)."""
    from ..kube.client import resource_path

    informer = ctx.argo_secrets.get(cluster.argocd.namespace)
    if informer is None:
        return []
    removed = []
    for secret in list(informer.items.values()):
        if not secret.owner or secret.owner == cluster.ref or secret.owner in ctx.registry.clusters:
            continue
        if secret.cluster_name != cluster.argocd.cluster_name and secret.server.rstrip("/") != cluster.server.rstrip("/"):
            continue
        owner_namespace, _, owner_name = secret.owner.partition("/")
        if await ctx.kube.get(resource_path(names.API_VERSION, "RemoteTenantCluster", owner_namespace, owner_name)):
            continue
        if await delete_if_owned(ctx.kube, "v1", "Secret", cluster.argocd.namespace, secret.name, secret.owner):
            removed.append(f"Deleted orphaned Argo CD cluster Secret {cluster.argocd.namespace}/{secret.name} "
                           f"(its RemoteTenantCluster {secret.owner} no longer exists)")
            informer.items.pop(f"{cluster.argocd.namespace}/{secret.name}", None)
    return removed


async def reconcile_argocd_secret(ctx: Context, cluster: RemoteTenantCluster, ca_data: str | None) -> StepResult:
    kind = c.ARGO_CLUSTER_REGISTERED
    if cluster.argocd.namespace not in ctx.settings.argocd_namespaces:
        allowed = ", ".join(ctx.settings.argocd_namespaces)
        return StepResult(c.Condition(kind, c.FALSE, "ArgoNamespaceNotAllowed",
                                      f"spec.argocd.namespace {cluster.argocd.namespace!r} is not an Argo CD "
                                      f"namespace this operator manages ({allowed})"))
    orphans: tuple[str, ...] = ()
    if conflict_message(ctx, cluster):
        orphans = tuple(await remove_orphaned_secrets(ctx, cluster))
    conflict = conflict_message(ctx, cluster)
    if conflict:
        return StepResult(c.Condition(kind, c.FALSE, "Conflict", conflict), orphans)
    secret = render_argocd_cluster_secret(cluster, ctx.settings.exec, ca_data)
    try:
        outcome = await apply_if_changed(ctx.kube, secret, names.FIELD_MANAGER_OPERATOR, owner=cluster.ref)
    except OwnershipConflict as e:
        return StepResult(c.Condition(kind, c.FALSE, "Conflict", f"{e}; Keyless never overwrites it"))
    where = f"{cluster.argocd.namespace}/{secret['metadata']['name']}"
    changes = orphans + (() if outcome == "unchanged" else (f"{outcome.capitalize()} Argo CD cluster Secret {where}",))
    message = f"Argo CD cluster {cluster.argocd.cluster_name!r} registered in Secret {where}"
    return StepResult(c.Condition(kind, c.TRUE, "Registered", message), changes)


def project_members(ctx: Context, cluster: RemoteTenantCluster, *, excluding: str | None = None):
    members = []
    for other in ctx.registry.live():
        if other.ref == excluding:
            continue
        if (other.argocd.namespace, other.argocd.project, other.tenant) != (
                cluster.argocd.namespace, cluster.argocd.project, cluster.tenant):
            continue
        if find_cluster_conflict(other, ctx.registry.live()):
            continue
        members.append(other)
    return members


async def reconcile_app_project(ctx: Context, cluster: RemoteTenantCluster) -> StepResult:
    kind = c.APP_PROJECT_READY
    if not cluster.argocd.create_app_project:
        return StepResult(c.Condition(kind, c.TRUE, "NotRequested",
                                      "spec.argocd.createAppProject is false; the project is managed elsewhere"))
    members = project_members(ctx, cluster)
    if cluster.ref not in {m.ref for m in members}:
        return StepResult(c.Condition(kind, c.FALSE, "Conflict", "the cluster is not registered (see ArgoClusterRegistered)"))
    project = render_app_project(cluster.argocd.project, cluster.tenant, cluster.argocd.namespace, members)
    try:
        outcome = await apply_if_changed(ctx.kube, project, names.FIELD_MANAGER_OPERATOR, owner=f"tenant/{cluster.tenant}")
    except OwnershipConflict:
        return StepResult(c.Condition(kind, c.FALSE, "Conflict",
                                      f"AppProject {cluster.argocd.namespace}/{cluster.argocd.project} exists and is "
                                      f"not managed by Keyless for tenant {cluster.tenant}; set "
                                      f"spec.argocd.createAppProject: false or choose another spec.argocd.project"))
    where = f"{cluster.argocd.namespace}/{cluster.argocd.project}"
    changes = () if outcome == "unchanged" else (f"{outcome.capitalize()} AppProject {where}",)
    return StepResult(c.Condition(kind, c.TRUE, "Ready",
                                  f"AppProject {where} limits tenant {cluster.tenant} to its {len(members)} cluster(s)"),
                      changes)


async def cleanup_argocd(ctx: Context, cluster: RemoteTenantCluster) -> list[str]:
    done = []
    name = argocd_secret_name(cluster)
    if await delete_if_owned(ctx.kube, "v1", "Secret", cluster.argocd.namespace, name, cluster.ref):
        done.append(f"Deleted Argo CD cluster Secret {cluster.argocd.namespace}/{name}")
    if cluster.argocd.create_app_project:
        members = project_members(ctx, cluster, excluding=cluster.ref)
        owner = f"tenant/{cluster.tenant}"
        if members:
            project = render_app_project(cluster.argocd.project, cluster.tenant, cluster.argocd.namespace, members)
            try:
                await apply_if_changed(ctx.kube, project, names.FIELD_MANAGER_OPERATOR, owner=owner)
            except OwnershipConflict:
                pass
        elif await delete_if_owned(ctx.kube, "argoproj.io/v1alpha1", "AppProject", cluster.argocd.namespace,
                                    cluster.argocd.project, owner):
            done.append(f"Deleted AppProject {cluster.argocd.namespace}/{cluster.argocd.project}")
    return done
