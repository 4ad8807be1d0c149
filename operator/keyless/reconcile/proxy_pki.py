"""Managed mode's certificates: a per-cluster CA, kept on the control plane (--pki-namespace), and the proxy's
serving certificate it signs. The CA is what Argo CD trusts for spec.server when spec.caData is empty.

Created once; the serving certificate is re-issued for new names or near expiry. Kept in the Flow, so one
reconcile reads the CA Secret once, whichever step needs it first.

Rotating the CA (an admin deletes the CA Secret) keeps trust continuous: the new CA's Secret also keeps the
CA Argo CD trusted until then (`previous-ca.crt`, read back from Keyless's own Argo CD cluster Secret), and
both Argo CD and the operator's path to the tenant trust the two (`trust_bundle`) until every proxy replica
serves the new certificate (`retire_previous`). Without that, the proxy kept serving the old certificate,
nobody trusted it any more, and once the bootstrap credential was gone the tenant was out of reach for good
(found by bench/soak.py).
"""
from __future__ import annotations

import base64
import datetime
import json

from cryptography import x509

from ..kube.apply import OwnershipConflict
from ..kube.client import resource_path
from ..model import names
from ..model.spec import RemoteTenantCluster
from ..pki import issue_serving_certificate, new_cluster_ca
from ..render.argocd import argocd_secret_name
from ..render.tenant import proxy_serving_hostnames
from .context import Context, Flow

RENEW_BEFORE = datetime.timedelta(days=30)
PREVIOUS_CA = "previous-ca.crt"


def trust_bundle(pki: dict[str, bytes]) -> bytes:
    """The CAs to trust for the proxy: its CA, and during a rotation the one before it."""
    previous = pki.get(PREVIOUS_CA)
    return pki["ca.crt"] if not previous else pki["ca.crt"].rstrip(b"\n") + b"\n" + previous


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
        previous = await _registered_ca(ctx, cluster)
        if previous:
            data[PREVIOUS_CA] = previous
        changed = True
    if _needs_new_serving_cert(data.get("tls.crt"), hostnames, data.get("hostnames", b"").decode()):
        data["tls.crt"], data["tls.key"] = issue_serving_certificate(data["ca.crt"], data["ca.key"], hostnames)
        data["hostnames"] = ",".join(hostnames).encode()
        changed = True
    if changed:
        await _write(ctx, cluster, data)
    flow.proxy_pki = data
    return data


async def _write(ctx: Context, cluster: RemoteTenantCluster, data: dict[str, bytes]) -> None:
    secret = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
              "metadata": {"name": ca_secret_name(cluster), "namespace": ctx.settings.pki_namespace,
                           "labels": cluster.ownership_labels(), "annotations": cluster.ownership_annotations()},
              "data": {k: base64.b64encode(v).decode() for k, v in data.items()}}
    await ctx.kube.apply(secret, names.FIELD_MANAGER_OPERATOR)


async def _registered_ca(ctx: Context, cluster: RemoteTenantCluster) -> bytes | None:
    """The CA (PEM) Keyless's own Argo CD cluster Secret for this manifest trusts now, if any."""
    live = await ctx.kube.get(resource_path("v1", "Secret", cluster.argocd.namespace, argocd_secret_name(cluster)))
    meta = (live or {}).get("metadata") or {}
    if (meta.get("annotations") or {}).get(names.ANNOTATION_OWNER) != cluster.ref:
        return None
    try:
        config = json.loads(base64.b64decode(((live or {}).get("data") or {}).get("config") or ""))
        pem = base64.b64decode(config["tlsClientConfig"]["caData"])
    except (ValueError, KeyError, TypeError):
        return None
    return pem if b"-----BEGIN CERTIFICATE-----" in pem else None


async def retire_previous(ctx: Context, cluster: RemoteTenantCluster, flow: Flow) -> list[str]:
    """Ends a CA rotation (every proxy replica serves a certificate of the new CA): the previous CA is
    no longer trusted; Argo CD's Secret follows on the next reconcile."""
    data = dict(flow.proxy_pki or {})
    if PREVIOUS_CA not in data:
        return []
    data.pop(PREVIOUS_CA)
    await _write(ctx, cluster, data)
    flow.proxy_pki = data
    return [f"Retired the previous proxy CA of {cluster.ref}: every proxy replica serves the new one"]


async def read(ctx: Context, cluster: RemoteTenantCluster) -> dict[str, bytes] | None:
    """The kept CA and serving certificate, or None when there are none (never created, or removed)."""
    secret = await ctx.kube.get(_ca_secret_path(ctx, cluster))
    return _decoded(secret) if secret is not None else None


async def delete(ctx: Context, cluster: RemoteTenantCluster) -> list[str]:
    if await ctx.kube.delete(_ca_secret_path(ctx, cluster)):
        return [f"Deleted proxy CA Secret {ctx.settings.pki_namespace}/{ca_secret_name(cluster)}"]
    return []
