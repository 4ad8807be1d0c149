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


PLACEHOLDER_CA = (b"-----BEGIN CERTIFICATE-----\n(the broker's CA: pass --broker-ca-file)\n"
                  b"-----END CERTIFICATE-----\n")
ISSUED_AT_INSTALL = b"(issued by the operator at install time from the cluster's own CA)"


def render_tenant_side(cluster: RemoteTenantCluster, settings: OperatorSettings,
                       broker_ca_pem: bytes | None) -> list[dict]:
    """What goes to the tenant: the Managed proxy (certificates are issued at install time and shown
    as placeholders, never printed), or Direct mode's AuthenticationConfiguration document."""
    from ..model.spec import ProxyMode
    from .tenant import render_authentication_configuration, render_tenant_proxy

    issuer_ca = broker_ca_pem or PLACEHOLDER_CA
    if cluster.proxy.mode is ProxyMode.DIRECT:
        import yaml

        return [yaml.safe_load(render_authentication_configuration(
            settings.broker_issuer, cluster.access.audience, issuer_ca, settings.signing_algorithm))]
    if cluster.proxy.mode is ProxyMode.MANAGED:
        return render_tenant_proxy(cluster, settings, serving_cert_pem=ISSUED_AT_INSTALL,
                                   serving_key_pem=ISSUED_AT_INSTALL, issuer_ca_pem=issuer_ca,
                                   signing_algorithm=settings.signing_algorithm)
    return []


def render_manifests(documents: Iterable[dict], settings: OperatorSettings,
                     broker_ca_pem: bytes | None = None) -> list[dict]:
    """Renders every RemoteTenantCluster in `documents` (other kinds are ignored)."""
    clusters = [parse(d) for d in documents if d and d.get("kind") == "RemoteTenantCluster"]
    out: list[dict] = []
    for cluster in clusters:
        members = [c for c in clusters if (c.argocd.namespace, c.argocd.project, c.tenant)
                   == (cluster.argocd.namespace, cluster.argocd.project, cluster.tenant)]
        out.extend(render_control_plane(cluster, settings, members))
        out.extend(render_tenant_side(cluster, settings, broker_ca_pem))
    return out


__all__ = ["render_manifests", "render_control_plane", "BrokerKind"]
