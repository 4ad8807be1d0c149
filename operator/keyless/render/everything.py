"""What `keyless render` prints: every object the operator would create for a manifest. No I/O."""
from __future__ import annotations

from typing import Iterable

from ..model.spec import BrokerKind, RemoteTenantCluster, parse
from ..settings import OperatorSettings
from .argocd import render_app_project, render_argocd_cluster_secret


def render_control_plane(cluster: RemoteTenantCluster, settings: OperatorSettings,
                         project_members: Iterable[RemoteTenantCluster] | None = None) -> list[dict]:
    from ..reconcile.broker import desired_target_for

    objects = [render_argocd_cluster_secret(cluster, settings.exec)]
    if cluster.argocd.create_app_project:
        members = list(project_members) if project_members is not None else [cluster]
        objects.append(render_app_project(cluster.argocd.project, cluster.tenant, cluster.argocd.namespace, members))
    objects.append(desired_target_for(settings, cluster))
    return objects


def render_manifests(documents: Iterable[dict], settings: OperatorSettings) -> list[dict]:
    """Renders every RemoteTenantCluster in `documents` (other kinds are ignored)."""
    clusters = [parse(d) for d in documents if d and d.get("kind") == "RemoteTenantCluster"]
    out: list[dict] = []
    for cluster in clusters:
        members = [c for c in clusters if (c.argocd.namespace, c.argocd.project, c.tenant)
                   == (cluster.argocd.namespace, cluster.argocd.project, cluster.tenant)]
        out.extend(render_control_plane(cluster, settings, members))
    return out


__all__ = ["render_manifests", "render_control_plane", "BrokerKind"]
