"""Pure rendering of what Argo CD needs: the cluster Secret and the tenant's AppProject. No I/O."""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Iterable

from ..model import names
from ..model.spec import RemoteTenantCluster

EXEC_API_VERSION = "client.authentication.k8s.io/v1"


@dataclass(frozen=True)
class ExecSettings:
    """How Argo CD obtains a token: read the agent's file (default) or run `keyless token`."""

    mode: str = "agent"  # agent | token
    credential_dir: str = "/var/run/keyless/credentials"
    broker_url: str = "https://keyless-broker.keyless-system.svc"
    broker_ca_file: str = "/var/run/keyless/broker-ca/ca.crt"
    token_file: str = "/var/run/secrets/keyless.dev/broker/token"  # keyless token's default too
    keyless_command: str = "keyless"
    api_version: str = EXEC_API_VERSION


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


def render_app_project(project: str, tenant: str, argocd_namespace: str,
                       clusters: Iterable[RemoteTenantCluster]) -> dict:
    """The tenant's AppProject: destinations limited to the tenant's own clusters, project-scoped only."""
    members = sorted(clusters, key=lambda c: c.server)
    destinations = [{"server": c.server.rstrip("/"), "name": c.argocd.cluster_name, "namespace": "*"}
                    for c in members]
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "AppProject",
        "metadata": {
            "name": project,
            "namespace": argocd_namespace,
            "labels": {names.LABEL_MANAGED_BY: names.MANAGED_BY, names.LABEL_TENANT: tenant},
            "annotations": {names.ANNOTATION_OWNER: f"tenant/{tenant}"},
        },
        "spec": {
            "description": f"Tenant {tenant}: may deploy only to its own clusters (managed by Keyless)",
            "sourceRepos": ["*"],
            "destinations": destinations,
            # The whole tenant cluster is the tenant's; what the identity may do there is decided by
            # spec.access.clusterRole on the tenant side.
            "clusterResourceWhitelist": [{"group": "*", "kind": "*"}],
            "permitOnlyProjectScopedClusters": True,
        },
    }
