"""Managed mode's certificates: a per-cluster CA, kept on the control plane (--pki-namespace), and the proxy's
serving certificate it signs. The CA is what Argo CD trusts for spec.server when spec.caData is empty.

Created once; the serving certificate is re-issued for new names or near expiry. Kept in the Flow, so one
reconcile reads the CA Secret once, whichever step needs it first.
"""
from __future__ import annotations

import base64
import datetime

from cryptography import x509

from ..kube.apply import OwnershipConflict
from ..kube.client import resource_path
from ..model import names
from ..model.spec import RemoteTenantCluster
from ..pki import issue_serving_certificate, new_cluster_ca
from ..render.tenant import proxy_serving_hostnames
from .context import Context, Flow

RENEW_BEFORE = datetime.timedelta(days=30)


def ca_secret_name(cluster: RemoteTenantCluster) -> str:
    return names.dns_label("keyless-proxy-ca", cluster.namespace, cluster.name)


def _ca_secret_path(ctx: Context, cluster: RemoteTenantCluster) -> str:
    return resource_path("v1", "Secret", ctx.settings.pki_namespace, ca_secret_name(cluster))


def _needs_new_serving_cert(cert_pem: bytes | None, hostnames: tuple[str, ...], stored_hostnames: str) -> bool:
    if not cert_pem or stored_hostnames != ",".join(hostnames):
        return True
    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc) < RENEW_BEFORE


def _decoded(secret: dict | None) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in ((secret or {}).get("data") or {}).items()}


async def ensure(ctx: Context, cluster: RemoteTenantCluster, flow: Flow) -> dict[str, bytes]:
    """The cluster's CA (ca.crt, ca.key) and serving certificate (tls.crt, tls.key), created or renewed.
    Raises OwnershipConflict when a Secret of that name belongs to another manifest."""
    if flow.proxy_pki is not None:
        return flow.proxy_pki
    live = await ctx.kube.get(_ca_secret_path(ctx, cluster))
    owner = ((live or {}).get("metadata", {}).get("annotations") or {}).get(names.ANNOTATION_OWNER)
    if live is not None and owner != cluster.ref:
        raise OwnershipConflict("Secret", ctx.settings.pki_namespace, ca_secret_name(cluster), owner)
    data = _decoded(live)
    hostnames = proxy_serving_hostnames(cluster)
    changed = False
    if not data.get("ca.crt") or not data.get("ca.key"):
        data["ca.crt"], data["ca.key"] = new_cluster_ca(cluster.ref)
        changed = True
    if _needs_new_serving_cert(data.get("tls.crt"), hostnames, data.get("hostnames", b"").decode()):
        data["tls.crt"], data["tls.key"] = issue_serving_certificate(data["ca.crt"], data["ca.key"], hostnames)
        data["hostnames"] = ",".join(hostnames).encode()
        changed = True
    if changed:
        secret = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                  "metadata": {"name": ca_secret_name(cluster), "namespace": ctx.settings.pki_namespace,
                               "labels": cluster.ownership_labels(), "annotations": cluster.ownership_annotations()},
                  "data": {k: base64.b64encode(v).decode() for k, v in data.items()}}
        await ctx.kube.apply(secret, names.FIELD_MANAGER_OPERATOR)
    flow.proxy_pki = data
    return data


async def read(ctx: Context, cluster: RemoteTenantCluster) -> dict[str, bytes] | None:
    """The kept CA and serving certificate, or None when there are none (never created, or removed)."""
    secret = await ctx.kube.get(_ca_secret_path(ctx, cluster))
    return _decoded(secret) if secret is not None else None


async def delete(ctx: Context, cluster: RemoteTenantCluster) -> list[str]:
    if await ctx.kube.delete(_ca_secret_path(ctx, cluster)):
        return [f"Deleted proxy CA Secret {ctx.settings.pki_namespace}/{ca_secret_name(cluster)}"]
    return []
