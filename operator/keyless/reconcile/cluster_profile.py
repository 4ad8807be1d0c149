"""Reconcile step ClusterProfilePublished: the cluster's SIG Multicluster ClusterProfile (--cluster-profiles).

The profile lists Keyless as an access provider (server, CA, which target to ask the broker for), so any
ClusterProfile consumer reaches the tenant with the same short-lived tokens Argo CD uses. Its
ControlPlaneHealthy condition follows TokenVerified (the Verifier's last verdict). Runs last: it needs the CA
Argo CD trusts (Flow.ca_pem).
"""
from __future__ import annotations

import base64

from ..kube import KubeError
from ..kube.apply import OwnershipConflict, apply_if_changed, delete_if_owned
from ..kube.client import resource_path
from ..model import conditions as c
from ..model import names
from ..model.spec import RemoteTenantCluster
from ..render import cluster_profile as render
from .context import Context, Flow, StepResult

KIND = c.CLUSTER_PROFILE_PUBLISHED
CRD_MISSING = ("the ClusterProfile API (multicluster.x-k8s.io/v1alpha1) is not installed on the control plane: "
               "install the CRD from sigs.k8s.io/cluster-inventory-api (config/crd/bases), or run the operator "
               "without --cluster-profiles")


def profile_namespace(ctx: Context, cluster: RemoteTenantCluster) -> tuple[str, str | None]:
    """(namespace, problem): spec.clusterProfile.namespace, the operator's namespace, or the manifest's own.
    A manifest may name only a namespace of its own tenant or the admin's inventory namespace: a tenant must
    not publish a cluster into an inventory another tenant's (or the platform's) consumers read."""
    admin_namespace = ctx.settings.cluster_profile_namespace
    namespace = render.profile_namespace(cluster, ctx.settings)
    if namespace in (cluster.namespace, admin_namespace) or ctx.namespace_tenant(namespace) == cluster.tenant:
        return namespace, None
    return namespace, (f"spec.clusterProfile.namespace {namespace!r} is not a namespace of tenant {cluster.tenant} "
                       f"(label {names.LABEL_TENANT}) nor the operator's --cluster-profile-namespace")


async def reconcile(ctx: Context, cluster: RemoteTenantCluster, flow: Flow) -> StepResult:
    if not render.wanted(cluster, ctx.settings):
        removed = tuple(await cleanup(ctx, cluster))
        return StepResult(c.Condition(KIND, c.TRUE, "NotRequested", "spec.clusterProfile.enabled is false"), removed,
                          status={"clusterProfile": None})
    namespace, problem = profile_namespace(ctx, cluster)
    if problem:
        return StepResult(c.Condition(KIND, c.FALSE, "NamespaceNotAllowed", problem), status={"clusterProfile": None})
    profile = render.render_cluster_profile(cluster, namespace)
    where = f"{namespace}/{profile['metadata']['name']}"
    try:
        outcome = await apply_if_changed(ctx.kube, profile, names.FIELD_MANAGER_OPERATOR, owner=cluster.ref)
    except OwnershipConflict as e:
        return StepResult(c.Condition(KIND, c.FALSE, "Conflict", f"{e}; Keyless never overwrites it"))
    except KubeError as e:
        if e.status == 404 and "namespaces" not in e.message:
            return StepResult(c.Condition(KIND, c.FALSE, "ClusterProfileAPIMissing", CRD_MISSING))
        raise
    changes: tuple[str, ...] = ()
    if outcome == "created":
        # A new place (first publication, or spec.clusterProfile.namespace changed): the old one goes.
        changes = tuple(await cleanup(ctx, cluster, keep=where))
    if outcome != "unchanged":
        changes += (f"{outcome.capitalize()} ClusterProfile {where}",)
    ca_data = base64.b64encode(flow.ca_pem).decode() if flow.ca_pem else None
    status = render.render_cluster_profile_status(cluster, ca_data, ctx.settings.exec.credential_dir)
    verdict = ctx.verifier.last_verdict(cluster.ref)
    live = await ctx.kube.get(resource_path(render.API_VERSION, render.KIND, namespace, profile["metadata"]["name"]))
    live_status = (live or {}).get("status") or {}
    conditions = c.merge(live_status.get("conditions"), [render.control_plane_healthy(verdict)],
                         (live or {}).get("metadata", {}).get("generation", 0))
    if not (all(live_status.get(k) == v for k, v in status.items())
            and not c.changed(live_status.get("conditions"), conditions)):
        await ctx.kube.apply({"apiVersion": render.API_VERSION, "kind": render.KIND,
                              "metadata": {"name": profile["metadata"]["name"], "namespace": namespace},
                              "status": {**status, "conditions": conditions}},
                             names.FIELD_MANAGER_OPERATOR, subresource="status")
    return StepResult(c.Condition(KIND, c.TRUE, "Published",
                                  f"ClusterProfile {where} lists access provider {render.PROVIDER_NAME!r} "
                                  f"(target {cluster.target_name})"),
                      changes, status={"clusterProfile": where})


async def cleanup(ctx: Context, cluster: RemoteTenantCluster, keep: str | None = None) -> list[str]:
    """Deletes this manifest's ClusterProfiles (all but `keep`), wherever they are."""
    if not ctx.settings.cluster_profiles:
        return []
    selector = ",".join(f"{k}={v}" for k, v in cluster.ownership_labels().items() if k != names.LABEL_TENANT)
    try:
        listing = await ctx.kube.list(resource_path(render.API_VERSION, render.KIND), label_selector=selector)
    except KubeError as e:
        if e.status == 404:
            return []  # no ClusterProfile API: nothing was ever published
        raise
    done = []
    for item in listing.get("items", []):
        meta = item["metadata"]
        where = f"{meta['namespace']}/{meta['name']}"
        if where == keep:
            continue
        if await delete_if_owned(ctx.kube, render.API_VERSION, render.KIND, meta["namespace"], meta["name"],
                                 cluster.ref):
            done.append(f"Deleted ClusterProfile {where}")
    return done
