"""What `keyless render` prints: every object the operator would create for a manifest. No I/O.

The operator's steps call the same functions with the same OperatorSettings, so the two cannot differ
(the render==applied tests in tests/test_tenant_managed.py and tests/test_operator_control_plane.py
compare them object by object, byte for byte). What only exists at install
time (the per-cluster proxy certificates) is shown as a placeholder, never printed.
"""
from __future__ import annotations

from typing import Iterable

import yaml

from ..model.spec import ProxyMode, RemoteTenantCluster, parse
from ..settings import OperatorSettings
from . import cluster_profile
from .argocd import render_app_project, render_argocd_cluster_secret
from .broker_target import render_target
from .tenant import render_authentication_configuration, render_tenant_proxy

PLACEHOLDER_CA = (b"-----BEGIN CERTIFICATE-----\n(the broker's CA: pass --broker-ca-file)\n"
                  b"-----END CERTIFICATE-----\n")
ISSUED_AT_INSTALL = b"(issued by the operator at install time from the cluster's own CA)"


def render_control_plane(cluster: RemoteTenantCluster, settings: OperatorSettings,
                         project_members: Iterable[RemoteTenantCluster] | None = None) -> list[dict]:
    objects = [render_argocd_cluster_secret(cluster, settings.exec)]
    if cluster.argocd.create_app_project:
        members = list(project_members) if project_members is not None else [cluster]
        # The operator lists every namespace of the tenant; from manifests alone, those are their namespaces.
        objects.append(render_app_project(cluster.argocd.project, cluster.tenant, cluster.argocd.namespace, members,
                                          source_namespaces=[m.namespace for m in members]))
    objects.append(render_target(cluster, settings))
    if cluster_profile.wanted(cluster, settings):
        profile = cluster_profile.render_cluster_profile(cluster, cluster_profile.profile_namespace(cluster, settings))
        # Managed mode without spec.caData: the operator's per-cluster CA, known only at install time.
        profile["status"] = cluster_profile.render_cluster_profile_status(cluster, cluster.ca_data,
                                                                          settings.exec.credential_dir)
        objects.append(profile)
    return objects


def render_tenant_side(cluster: RemoteTenantCluster, settings: OperatorSettings,
                       broker_ca_pem: bytes | None) -> list[dict]:
    """What goes to the tenant: the Managed proxy (certificates are issued at install time and shown
    as placeholders, never printed), or Direct mode's AuthenticationConfiguration document."""
    issuer_ca = broker_ca_pem or PLACEHOLDER_CA
    if cluster.proxy.mode is ProxyMode.DIRECT:
        return [yaml.safe_load(render_authentication_configuration(
            settings.broker_issuer, cluster.access.audience, issuer_ca, settings.signing_algorithm))]
    if cluster.proxy.mode is ProxyMode.MANAGED:
        return render_tenant_proxy(cluster, settings, serving_cert_pem=ISSUED_AT_INSTALL,
                                   serving_key_pem=ISSUED_AT_INSTALL, issuer_ca_pem=issuer_ca)
    return []


# Where each rendered object goes (`keyless render --only`).
CONTROL_PLANE = "control-plane"  # the cluster where Keyless and Argo CD run
TENANT = "tenant"  # the tenant cluster (Managed mode: what the operator installs there)
API_SERVER_FILE = "api-server-file"  # a file for the tenant API server's flags (Direct mode), not an object
DESTINATIONS = (CONTROL_PLANE, TENANT, API_SERVER_FILE)


def render_clusters(clusters: list[RemoteTenantCluster], settings: OperatorSettings,
                    broker_ca_pem: bytes | None = None) -> list[tuple[str, RemoteTenantCluster, dict]]:
    """(destination, cluster, object) for every object the operator would create for `clusters`."""
    out: list[tuple[str, RemoteTenantCluster, dict]] = []
    for cluster in clusters:
        members = [c for c in clusters if (c.argocd.namespace, c.argocd.project, c.tenant)
                   == (cluster.argocd.namespace, cluster.argocd.project, cluster.tenant)]
        out.extend((CONTROL_PLANE, cluster, o) for o in render_control_plane(cluster, settings, members))
        tenant_side = API_SERVER_FILE if cluster.proxy.mode is ProxyMode.DIRECT else TENANT
        out.extend((tenant_side, cluster, o) for o in render_tenant_side(cluster, settings, broker_ca_pem))
    return out


def render_manifests(documents: Iterable[dict], settings: OperatorSettings,
                     broker_ca_pem: bytes | None = None) -> list[dict]:
    """Renders every RemoteTenantCluster in `documents` (other kinds are ignored)."""
    clusters = [parse(d) for d in documents if d and d.get("kind") == "RemoteTenantCluster"]
    return [obj for _, _, obj in render_clusters(clusters, settings, broker_ca_pem)]
