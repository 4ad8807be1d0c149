"""Reconcile steps for Argo CD: ArgoClusterRegistered (the cluster Secret, with the CA Argo CD trusts)
and AppProjectReady (the tenant's AppProject)."""
from __future__ import annotations

import base64

from ..kube.apply import OwnershipConflict, apply_if_changed, delete_if_owned
from ..kube.client import API_ERRORS, KubeError, resource_path
from ..model import conditions as c
from ..model import names
from ..model.claims import normalize_server
from ..model.spec import ProxyMode, RemoteTenantCluster
from ..render.argocd import (argocd_secret_name, render_adoption_patch, render_app_project,
                             render_argocd_cluster_secret)
from . import proxy_pki
from .conflicts import adoptable, find_secret_conflict
from .context import ArgoClusterSecret, Context, Flow, StepResult
from .errors import CleanupWaiting, Retry, classify, safe_error

CONFLICT = "Conflict"
ADOPTING = "Adopting"
PROXY_CA_UNAVAILABLE = "ProxyCAUnavailable"


def conflict_message(ctx: Context, cluster: RemoteTenantCluster) -> str | None:
    message = ctx.claims().conflict(cluster)
    if message:
        return message
    index = ctx.argo_secret_index(cluster.argocd.namespace)
    if index is not None:
        return find_secret_conflict(cluster, argocd_secret_name(cluster), index.sharing_server_or_name(cluster))
    return None


async def remove_orphaned_secrets(ctx: Context, cluster: RemoteTenantCluster) -> list[str]:
    """Deletes Keyless cluster Secrets in the way of a manifest that holds its claims, when their
    RemoteTenantCluster no longer exists (e.g. its finalizer was removed by hand before the operator
    could clean up) or no longer holds what the Secret registers (it lost the claim, or its namespace
    is not its tenant's any more): the rightful holder does not wait for the loser's next reconcile."""
    informer = ctx.argo_secrets.get(cluster.argocd.namespace)
    claims = ctx.claims()
    if informer is None or claims.conflict(cluster) is not None:
        return []
    holding = claims.holding
    server = normalize_server(cluster.server)
    removed = []
    for secret in list(informer.items.values()):
        if not secret.owner or secret.owner == cluster.ref or secret.owner in holding:
            continue
        if secret.cluster_name != cluster.argocd.cluster_name and normalize_server(secret.server) != server:
            continue
        owner = ctx.registry.clusters.get(secret.owner)
        if owner is None:
            owner_namespace, _, owner_name = secret.owner.partition("/")
            if await ctx.kube.get(resource_path(names.API_VERSION, "RemoteTenantCluster", owner_namespace, owner_name)):
                continue  # a manifest this operator has not seen yet: let it be judged first
            why = "no longer exists"
        else:
            why = "does not hold that claim"
        # Another tenant's Secret is not named: its name carries that tenant's namespace and manifest.
        which = (f"{cluster.argocd.namespace}/{secret.name}" if owner is not None and owner.tenant == cluster.tenant
                 else "of another or a deleted manifest")
        if await delete_if_owned(ctx.kube, "v1", "Secret", cluster.argocd.namespace, secret.name, secret.owner):
            removed.append(f"Deleted Argo CD cluster Secret {which} in the way (its RemoteTenantCluster {why})")
            informer.discard(f"{cluster.argocd.namespace}/{secret.name}")
    return removed


async def register_cluster(ctx: Context, cluster: RemoteTenantCluster, flow: Flow) -> StepResult:
    """ArgoClusterRegistered. A manifest that lost a claim registers nothing and blocks the rest (the runner
    withdraws what it derived before); in Managed mode without spec.caData the CA Argo CD trusts is the
    per-cluster proxy CA, issued here first (so a conflicting manifest never creates one)."""
    kind = c.ARGO_CLUSTER_REGISTERED
    if flow.ca_pem is None and cluster.proxy.mode is ProxyMode.MANAGED and conflict_message(ctx, cluster) is None:
        try:
            flow.ca_pem = proxy_pki.trust_bundle(await proxy_pki.ensure(ctx, cluster, flow))
        except (*API_ERRORS, OwnershipConflict) as e:
            retry = Retry.NONE if isinstance(e, OwnershipConflict) else classify(
                e, ctx.settings.permanent_retry_seconds).retry
            return StepResult(c.Condition(kind, c.FALSE, PROXY_CA_UNAVAILABLE, f"cannot keep the proxy CA: {safe_error(e)}"),
                              retry=retry,
                              blocks="not reconciled until ArgoClusterRegistered is resolved")
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
        return StepResult(c.Condition(kind, c.FALSE, CONFLICT, conflict), orphans, withdraw=True,
                          blocks="not reconciled until ArgoClusterRegistered is resolved")
    index = ctx.argo_secret_index(cluster.argocd.namespace)
    marked = index.marked_for(cluster.ref) if index is not None else ()
    flow.adopting = tuple(sorted(s.name for s in marked if adoptable(cluster, s)))
    if flow.adopting:
        # Two Secrets for one server are ambiguous to Argo CD: the marked one keeps serving with its own
        # credential (nothing is written) until `take_over_marked_secrets` replaces it after verification.
        which = ", ".join(f"{cluster.argocd.namespace}/{name}" for name in flow.adopting)
        return StepResult(c.Condition(
            kind, c.FALSE, ADOPTING,
            f"Argo CD cluster Secret {which} (marked {names.ANNOTATION_ADOPT_BY}) serves the cluster with its own "
            f"credential until this chain is verified (TokenVerified) for {ctx.settings.adopt_grace_seconds:.0f} s; "
            f"Keyless then replaces that credential with its exec credential, registers the cluster in its own "
            f"Secret and deletes the marked one"), orphans)
    secret = desired_cluster_secret(ctx, cluster, flow)
    try:
        outcome = await apply_if_changed(ctx.kube, secret, names.FIELD_MANAGER_OPERATOR, owner=cluster.ref)
    except OwnershipConflict as e:
        return StepResult(c.Condition(kind, c.FALSE, CONFLICT, f"{e}; Keyless never overwrites it"),
                          withdraw=True, blocks="not reconciled until ArgoClusterRegistered is resolved")
    where = f"{cluster.argocd.namespace}/{secret['metadata']['name']}"
    changes = orphans + (() if outcome == "unchanged" else (f"{outcome.capitalize()} Argo CD cluster Secret {where}",))
    changes += tuple(await remove_taken_over(ctx, cluster))
    message = f"Argo CD cluster {cluster.argocd.cluster_name!r} registered in Secret {where}"
    return StepResult(c.Condition(kind, c.TRUE, "Registered", message), changes)


def desired_cluster_secret(ctx: Context, cluster: RemoteTenantCluster, flow: Flow) -> dict:
    ca_data = base64.b64encode(flow.ca_pem).decode() if flow.ca_pem else None
    return render_argocd_cluster_secret(cluster, ctx.settings.exec, ca_data)


async def remove_taken_over(ctx: Context, cluster: RemoteTenantCluster) -> list[str]:
    """Deletes this manifest's cluster Secrets under another name than its own: a Secret taken over whose
    deletion did not happen (the operator stopped in between). Its config is already Keyless's."""
    index = ctx.argo_secret_index(cluster.argocd.namespace)
    own = argocd_secret_name(cluster)
    removed = []
    for secret in index.owned_by(cluster.ref) if index is not None else []:
        if secret.name != own and await delete_if_owned(
                ctx.kube, "v1", "Secret", cluster.argocd.namespace, secret.name, cluster.ref):
            removed.append(f"Deleted Argo CD cluster Secret {cluster.argocd.namespace}/{secret.name} (taken over)")
    return removed


async def take_over_marked_secrets(ctx: Context, cluster: RemoteTenantCluster, flow: Flow) -> StepResult | None:
    """Amends ArgoClusterRegistered: the migration of a cluster Secret marked keyless.dev/adopt-by for this
    manifest, once this chain has been verified for --adopt-grace-seconds. At every moment a Secret with a
    working credential registers the server: (1) the marked Secret's credential is replaced in place by
    Keyless's exec credential (one write: still one Secret), (2) Keyless's own Secret is applied (two Secrets,
    byte-identical config, so Argo CD's choice between them does not matter), (3) the marked one is deleted,
    exactly the version written in (1). Each Secret is judged again as read live: same server, cluster
    name, Argo CD namespace, still marked for this manifest, not Keyless's."""
    if not flow.adopting or not flow.verified:
        return None  # ArgoClusterRegistered says Adopting: waiting for TokenVerified
    kind = c.ARGO_CLUSTER_REGISTERED
    if ctx.verifier.verified_for(cluster.ref) < ctx.settings.adopt_grace_seconds:
        before = flow.conditions[kind]
        return StepResult(c.Condition(kind, c.FALSE, ADOPTING, before.message + " (verified; waiting out the grace)"),
                          retry=Retry.TRANSIENT)
    namespace = cluster.argocd.namespace
    desired = desired_cluster_secret(ctx, cluster, flow)
    changes: list[str] = []
    written: list[tuple[str, dict]] = []
    for name in flow.adopting:
        path = resource_path("v1", "Secret", namespace, name)
        live = await ctx.kube.get(path)
        if live is None or (live["metadata"].get("labels") or {}).get(names.ARGOCD_SECRET_TYPE_LABEL) != "cluster" \
                or not adoptable(cluster, ArgoClusterSecret.of(live)):
            continue  # gone or changed since the informer saw it: judged again by the next reconcile
        patched = await ctx.kube.merge_patch(path, render_adoption_patch(live, desired), names.FIELD_MANAGER_OPERATOR)
        written.append((name, patched["metadata"]))
        changes.append(f"Took over Argo CD cluster Secret {namespace}/{name}: its credential replaced by the "
                       f"exec credential")
    try:
        outcome = await apply_if_changed(ctx.kube, desired, names.FIELD_MANAGER_OPERATOR, owner=cluster.ref)
    except OwnershipConflict as e:
        return StepResult(c.Condition(kind, c.FALSE, CONFLICT, f"{e}; Keyless never overwrites it"), tuple(changes))
    where = f"{namespace}/{desired['metadata']['name']}"
    if outcome != "unchanged":
        changes.append(f"{outcome.capitalize()} Argo CD cluster Secret {where}")
    for name, meta in written:
        try:
            await ctx.kube.delete(resource_path("v1", "Secret", namespace, name),
                                  preconditions={"uid": meta["uid"], "resourceVersion": meta["resourceVersion"]})
        except KubeError as e:
            if e.status != 409:
                raise
            continue  # changed since our write: remove_taken_over deletes it later if it is still ours
        changes.append(f"Deleted Argo CD cluster Secret {namespace}/{name} (taken over)")
    taken = ", ".join(f"{namespace}/{name}" for name in flow.adopting)
    return StepResult(c.Condition(kind, c.TRUE, "Registered",
                                  f"Argo CD cluster {cluster.argocd.cluster_name!r} registered in Secret {where} "
                                  f"(took over {taken})"), tuple(changes))


async def unregister_cluster(ctx: Context, cluster: RemoteTenantCluster) -> list[str]:
    """Removes the cluster's Argo CD Secret (only Keyless's own, for this manifest)."""
    name = argocd_secret_name(cluster)
    if await delete_if_owned(ctx.kube, "v1", "Secret", cluster.argocd.namespace, name, cluster.ref):
        return [f"Deleted Argo CD cluster Secret {cluster.argocd.namespace}/{name}"]
    return []


def project_members(ctx: Context, cluster: RemoteTenantCluster, *, excluding: str | None = None):
    """The project's clusters: counting manifests of the same project that hold all their claims."""
    members = ctx.claims().members(cluster.argocd.namespace, cluster.argocd.project, cluster.tenant)
    return [other for other in members if other.ref != excluding]


def desired_app_project(ctx: Context, cluster: RemoteTenantCluster, members) -> dict:
    # sourceNamespaces: Argo CD itself then refuses this project's Applications from any namespace
    # that is not the tenant's (apps in any namespace), whatever the webhooks say.
    return render_app_project(cluster.argocd.project, cluster.tenant, cluster.argocd.namespace, members,
                              source_namespaces=ctx.tenant_namespaces(cluster.tenant))


async def reconcile_app_project(ctx: Context, cluster: RemoteTenantCluster, flow: Flow) -> StepResult:
    kind = c.APP_PROJECT_READY
    if not cluster.argocd.create_app_project:
        return StepResult(c.Condition(kind, c.TRUE, "NotRequested",
                                      "spec.argocd.createAppProject is false; the project is managed elsewhere"))
    members = project_members(ctx, cluster)
    if cluster.ref not in {m.ref for m in members}:
        return StepResult(c.Condition(kind, c.FALSE, "Conflict", "the cluster is not registered (see ArgoClusterRegistered)"))
    project = desired_app_project(ctx, cluster, members)
    try:
        outcome = await apply_if_changed(ctx.kube, project, names.FIELD_MANAGER_OPERATOR, owner=f"tenant/{cluster.tenant}")
    except OwnershipConflict:
        return StepResult(c.Condition(kind, c.FALSE, "Conflict",
                                      f"AppProject {cluster.argocd.namespace}/{cluster.argocd.project} exists and is "
                                      f"not managed by Keyless for tenant {cluster.tenant}; set "
                                      f"spec.argocd.createAppProject: false or choose another spec.argocd.project"))
    where = f"{cluster.argocd.namespace}/{cluster.argocd.project}"
    changes = () if outcome == "unchanged" else (f"{outcome.capitalize()} AppProject {where}",)
    # No count of the project's clusters here: it changes with every sibling added or removed, and each of
    # the tenant's manifests would then rewrite its status (50 siblings, 50 writes per change).
    return StepResult(c.Condition(kind, c.TRUE, "Ready",
                                  f"AppProject {where} limits tenant {cluster.tenant} to its own registered clusters"),
                      changes)


async def cleanup_app_project(ctx: Context, cluster: RemoteTenantCluster) -> list[str]:
    """Removes the cluster from its AppProject's destinations; the project goes with its last cluster."""
    if not cluster.argocd.create_app_project:
        return []
    members = project_members(ctx, cluster, excluding=cluster.ref)
    owner = f"tenant/{cluster.tenant}"
    if members:
        try:
            await apply_if_changed(ctx.kube, desired_app_project(ctx, cluster, members), names.FIELD_MANAGER_OPERATOR,
                                   owner=owner)
        except OwnershipConflict:
            pass
        return []
    where = f"{cluster.argocd.namespace}/{cluster.argocd.project}"
    in_use = await project_applications(ctx, cluster)
    if in_use:
        # Argo CD finalizes an Application only while its AppProject exists: keep the project, granting
        # no destination at all, until Argo CD has deleted them (the cluster Secret is already gone, so an
        # ApplicationSet drops its Applications by itself).
        try:
            await apply_if_changed(ctx.kube, desired_app_project(ctx, cluster, []), names.FIELD_MANAGER_OPERATOR,
                                   owner=owner)
        except OwnershipConflict:
            return []
        shown = ", ".join(in_use[:5]) + (f" and {len(in_use) - 5} more" if len(in_use) > 5 else "")
        raise CleanupWaiting(f"AppProject {where} is kept, with no destination, while Argo CD still has "
                             f"{len(in_use)} Application(s) of it: {shown}; it is deleted once they are gone")
    if await delete_if_owned(ctx.kube, "argoproj.io/v1alpha1", "AppProject", cluster.argocd.namespace,
                             cluster.argocd.project, owner):
        return [f"Deleted AppProject {where}"]
    return []


async def project_applications(ctx: Context, cluster: RemoteTenantCluster) -> list[str]:
    """Names of the Applications in the Argo CD namespace that belong to the cluster's AppProject."""
    listed = await ctx.kube.list(resource_path("argoproj.io/v1alpha1", "Application", cluster.argocd.namespace))
    return sorted(app["metadata"]["name"] for app in listed.get("items", [])
                  if (app.get("spec") or {}).get("project") == cluster.argocd.project)
