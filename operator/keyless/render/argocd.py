"""Pure rendering of what Argo CD needs: the cluster Secret and the tenant's AppProject. No I/O."""
from __future__ import annotations

import base64
import json
from typing import Iterable

from ..model import names
from ..model.spec import RemoteTenantCluster
from ..settings import ExecSettings

def argocd_secret_name(cluster: RemoteTenantCluster) -> str:
    return names.dns_label("keyless", cluster.namespace, cluster.name)


def render_exec_provider_config(cluster: RemoteTenantCluster, settings: ExecSettings) -> dict:
    """The execProviderConfig. Its args are unique per cluster because client-go caches
    authenticators by exec config, and nothing volatile goes in (any change of `config` makes Argo CD
    drop its whole cache for the cluster)."""
    target = cluster.target_name
    if settings.mode == "agent":
        command, args = "cat", [f"{settings.credential_dir.rstrip('/')}/{target}.json"]
        hint = ("The keyless agent sidecar writes this file; check that it runs next to the Argo CD "
                "application controller and that this cluster's broker target allows its ServiceAccount.")
    elif settings.mode == "token":
        command = settings.keyless_command
        args = ["token", "--broker-url", settings.broker_url, "--target", target,
                "--broker-ca-file", settings.broker_ca_file, "--token-file", settings.token_file]
        hint = "Install keyless (pip install keyless) where Argo CD runs; see the Keyless README."
    else:
        raise ValueError(f"unknown exec mode {settings.mode!r}; expected agent or token")
    return {"command": command, "args": args, "apiVersion": settings.api_version, "installHint": hint}


def render_cluster_config(cluster: RemoteTenantCluster, settings: ExecSettings, ca_data: str | None) -> dict:
    tls: dict = {"insecure": False}
    if ca_data:
        tls["caData"] = ca_data
    return {"tlsClientConfig": tls, "execProviderConfig": render_exec_provider_config(cluster, settings)}


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def render_argocd_cluster_secret(cluster: RemoteTenantCluster, settings: ExecSettings,
                                 ca_data: str | None = None) -> dict:
    """The Argo CD cluster Secret (declarative cluster registration), exactly as Argo CD reads it."""
    ca_data = ca_data or cluster.ca_data
    config = render_cluster_config(cluster, settings, ca_data)
    labels = {k: v for k, v in cluster.argocd.labels.items() if k not in names.ARGOCD_TRACKING_KEYS}
    labels.update(cluster.ownership_labels())
    labels[names.ARGOCD_SECRET_TYPE_LABEL] = "cluster"
    data = {
        "name": _b64(cluster.argocd.cluster_name),
        "server": _b64(cluster.server.rstrip("/")),
        # sort_keys + compact separators: the same spec always yields byte-identical config.
        "config": _b64(json.dumps(config, sort_keys=True, separators=(",", ":"))),
        # Only the manifest's own project: the key grants that project the cluster as a destination.
        "project": _b64(cluster.argocd.project),
    }
    if cluster.argocd.shard is not None:
        # Argo CD's cluster sharding: this controller shard (of --sharding replicas) manages the cluster.
        data["shard"] = _b64(str(cluster.argocd.shard))
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": argocd_secret_name(cluster),
            "namespace": cluster.argocd.namespace,
            "labels": labels,
            "annotations": cluster.ownership_annotations(),
        },
        "data": data,
    }


def render_adoption_patch(live: dict, desired: dict) -> dict:
    """The JSON merge patch that turns an Argo CD cluster Secret Keyless takes over (a static credential,
    marked keyless.dev/adopt-by) into Keyless's registration in place, in one write: `desired`'s data (the
    exec credential) with every other key removed (a bearer token or client key lives in `config`; other
    keys such as `namespaces` would narrow what Keyless registers), Keyless's labels and owner, the mark and
    kubectl's last-applied copy (which holds the old credential too) removed. The live uid and
    resourceVersion make it apply only to exactly the version read."""
    meta = live["metadata"]
    data: dict = {key: None for key in (live.get("data") or {}) if key not in desired["data"]}
    data.update(desired["data"])
    annotations: dict = {key: None for key in (names.ANNOTATION_ADOPT_BY, names.ANNOTATION_LAST_APPLIED)
                         if key in (meta.get("annotations") or {})}
    annotations.update(desired["metadata"]["annotations"])
    return {"metadata": {"uid": meta["uid"], "resourceVersion": meta["resourceVersion"],
                         "labels": dict(desired["metadata"]["labels"]), "annotations": annotations},
            "data": data}


def render_app_project(project: str, tenant: str, argocd_namespace: str,
                       clusters: Iterable[RemoteTenantCluster], source_namespaces: Iterable[str] = ()) -> dict:
    """The tenant's AppProject: destinations limited to the tenant's own clusters, project-scoped only,
    Applications accepted only from the tenant's own namespaces (besides Argo CD's, admins only)."""
    members = sorted(clusters, key=lambda c: c.server)
    destinations = [{"server": c.server.rstrip("/"), "name": c.argocd.cluster_name, "namespace": "*"}
                    for c in members]
    spec: dict = {
        "description": f"Tenant {tenant}: may deploy only to its own clusters (managed by Keyless)",
        "sourceRepos": ["*"],
        "destinations": destinations,
        # The whole tenant cluster is the tenant's; what the identity may do there is decided by
        # spec.access.clusterRole on the tenant side.
        "clusterResourceWhitelist": [{"group": "*", "kind": "*"}],
        "permitOnlyProjectScopedClusters": True,
    }
    if source_namespaces:
        spec["sourceNamespaces"] = sorted(set(source_namespaces))
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "AppProject",
        "metadata": {
            "name": project,
            "namespace": argocd_namespace,
            "labels": {names.LABEL_MANAGED_BY: names.MANAGED_BY, names.LABEL_TENANT: tenant},
            "annotations": {names.ANNOTATION_OWNER: f"tenant/{tenant}"},
        },
        "spec": spec,
    }
