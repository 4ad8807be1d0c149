"""Managed proxy mode: install kube-oidc-proxy, its trust and least-privilege RBAC on the tenant.

The tenant is reached with the bootstrap kubeconfig while it exists; after the chain is verified
(and `deleteAfterInstall` removed it) the operator reaches the tenant through the chain itself,
with its own short-lived broker token. If neither works, the condition says a new bootstrap
credential is needed; nothing loops or hangs (every call has a timeout).
"""
from __future__ import annotations

import base64
import datetime
import json

import yaml
from cryptography import x509

from ..kube import Kube, KubeConfig, KubeError
from ..kube.apply import OwnershipConflict, apply_if_changed, delete_if_owned
from ..kube.client import TRANSIENT_ERRORS, resource_path
from ..model import conditions as c
from ..model import names
from ..model.spec import ProxyMode, RemoteTenantCluster
from .context import Context, StepResult

RENEW_BEFORE = datetime.timedelta(days=30)


class TenantUnavailable(Exception):
    """No working credential for the tenant; `reason` and the message say what to do."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def ca_secret_name(cluster: RemoteTenantCluster) -> str:
    return names.dns_label("keyless-proxy-ca", cluster.namespace, cluster.name)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _needs_new_serving_cert(cert_pem: bytes | None, hostnames: tuple[str, ...], stored_hostnames: str) -> bool:
    if not cert_pem or stored_hostnames != ",".join(hostnames):
        return True
    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc) < RENEW_BEFORE


async def ensure_proxy_pki(ctx: Context, cluster: RemoteTenantCluster) -> dict[str, bytes]:
    """The per-cluster CA (kept on the control plane, in --pki-namespace) and the proxy's
    serving certificate. Created once; the serving cert is re-issued for new names or near expiry."""
    from ..pki import issue_serving_certificate, new_cluster_ca
    from ..render.tenant import proxy_serving_hostnames

    path = resource_path("v1", "Secret", ctx.settings.pki_namespace, ca_secret_name(cluster))
    live = await ctx.kube.get(path)
    data = {k: base64.b64decode(v) for k, v in ((live or {}).get("data") or {}).items()}
    hostnames = proxy_serving_hostnames(cluster)
    if live is not None and (live["metadata"].get("annotations") or {}).get(names.ANNOTATION_OWNER) != cluster.ref:
        raise OwnershipConflict("Secret", ctx.settings.pki_namespace, ca_secret_name(cluster),
                                (live["metadata"].get("annotations") or {}).get(names.ANNOTATION_OWNER))
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
                  "data": {k: _b64(v) for k, v in data.items()}}
        await ctx.kube.apply(secret, names.FIELD_MANAGER_OPERATOR)
    return data


async def managed_ca_pem(ctx: Context, cluster: RemoteTenantCluster) -> bytes:
    return (await ensure_proxy_pki(ctx, cluster))["ca.crt"]


def _bootstrap_path(cluster: RemoteTenantCluster) -> str:
    return resource_path("v1", "Secret", cluster.namespace, cluster.bootstrap.secret_name)


async def _bootstrap_client(ctx: Context, cluster: RemoteTenantCluster) -> Kube | None:
    """A client from the bootstrap kubeconfig, or None when the Secret does not exist."""
    if cluster.bootstrap is None:
        return None
    secret = await ctx.kube.get(_bootstrap_path(cluster))
    if secret is None:
        return None
    ref = f"{cluster.namespace}/{cluster.bootstrap.secret_name}"
    encoded = (secret.get("data") or {}).get(cluster.bootstrap.secret_key)
    if not encoded:
        raise TenantUnavailable("BootstrapCredentialInvalid",
                                f"bootstrap Secret {ref} has no key {cluster.bootstrap.secret_key!r}; put the "
                                f"tenant kubeconfig there or set spec.bootstrap.kubeconfigSecretRef.key")
    try:
        config = KubeConfig.from_kubeconfig_dict(yaml.safe_load(base64.b64decode(encoded)), untrusted=True)
        return Kube(config, user_agent="keyless-operator-bootstrap", timeout=ctx.settings.tenant_api_timeout_seconds)
    except ValueError as e:  # our own messages name only kubeconfig keys, never values
        reason = str(e) if str(e).startswith("kubeconfig ") else "it is not a usable kubeconfig"
        raise TenantUnavailable("BootstrapCredentialInvalid",
                                f"bootstrap Secret {ref} key {cluster.bootstrap.secret_key!r}: {reason} (it needs a "
                                f"context with an https server, inline credentials and certificate-authority-data)") from None
    except Exception:  # never echo the content: it is a credential
        raise TenantUnavailable("BootstrapCredentialInvalid",
                                f"bootstrap Secret {ref} key {cluster.bootstrap.secret_key!r} is not a usable "
                                f"kubeconfig (it needs a context with a server and credentials)") from None


async def _proxy_path_client(ctx: Context, cluster: RemoteTenantCluster, ca_pem: bytes) -> Kube:
    """The tenant reached through the chain itself, with the operator's own short-lived token."""
    from ..agent.broker_client import BrokerError

    if ctx.verifier is None or not ctx.verifier.enabled():
        raise TenantUnavailable("BootstrapCredentialMissing", "no bootstrap Secret and no broker credentials")
    try:
        minted = await ctx.verifier._broker_client().mint(cluster.target_name)
    except BrokerError as e:
        raise TenantUnavailable("BrokerUnavailable", f"cannot mint a token to reach the tenant: {e}") from None
    config = KubeConfig(server=cluster.server, ca_pem=ca_pem, token=minted.token)
    return Kube(config, user_agent="keyless-operator", timeout=ctx.settings.tenant_api_timeout_seconds)


async def tenant_client(ctx: Context, cluster: RemoteTenantCluster, ca_pem: bytes) -> tuple[Kube, str]:
    client = await _bootstrap_client(ctx, cluster)
    if client is not None:
        return client, "bootstrap credential"
    if ctx.verifier is not None and ctx.verifier.enabled():
        # E.g. after an operator restart: prove the chain first, then manage the tenant through it.
        if ctx.verifier.was_verified(cluster.ref) or (await ctx.verifier.verify(cluster, ca_pem)).is_true:
            return await _proxy_path_client(ctx, cluster, ca_pem), "the verified proxy path"
    ref = f"{cluster.namespace}/{cluster.bootstrap.secret_name}" if cluster.bootstrap else "(none)"
    raise TenantUnavailable("BootstrapCredentialMissing",
                            f"bootstrap Secret {ref} not found and the proxy path is not verified; create the "
                            f"Secret with a kubeconfig for the tenant cluster (key "
                            f"{cluster.bootstrap.secret_key if cluster.bootstrap else 'kubeconfig'})")


def _tenant_error(e: Exception, via: str) -> TenantUnavailable:
    if isinstance(e, KubeError) and e.status in (401, 403):
        hint = ("provide a new bootstrap credential (spec.bootstrap.kubeconfigSecretRef)"
                if via != "bootstrap credential" else "the bootstrap kubeconfig needs cluster-admin on the tenant")
        return TenantUnavailable("TenantAccessDenied", f"the tenant refused {via} (HTTP {e.status}); {hint}")
    return TenantUnavailable("TenantUnreachable", f"cannot reach the tenant API with {via} ({e.__class__.__name__})")


async def reconcile_managed_proxy(ctx: Context, cluster: RemoteTenantCluster) -> StepResult:
    from ..render.tenant import render_tenant_proxy
    from .tenant import broker_ca_pem

    kind = c.PROXY_READY
    issuer_ca = broker_ca_pem(ctx)
    if issuer_ca is None:
        return StepResult(c.Condition(kind, c.FALSE, "BrokerCAUnknown",
                                      "the operator needs --broker-ca-file: the proxy must trust the broker's TLS"))
    pki = await ensure_proxy_pki(ctx, cluster)
    objects = render_tenant_proxy(cluster, ctx.settings, serving_cert_pem=pki["tls.crt"],
                                  serving_key_pem=pki["tls.key"], issuer_ca_pem=issuer_ca,
                                  signing_algorithm=ctx.settings.signing_algorithm)
    try:
        client, via = await tenant_client(ctx, cluster, cluster.ca_pem or pki["ca.crt"])
    except TenantUnavailable as e:
        return StepResult(c.Condition(kind, c.FALSE, e.reason, str(e)))
    changes = []
    try:
        async with client:
            for obj in objects:
                outcome = await apply_if_changed(client, obj, names.FIELD_MANAGER_OPERATOR, owner=cluster.ref)
                if outcome != "unchanged":
                    meta = obj["metadata"]
                    where = f"{meta['namespace']}/{meta['name']}" if meta.get("namespace") else meta["name"]
                    changes.append(f"{outcome.capitalize()} tenant {obj['kind']} {where} (via {via})")
            changes += await _prune_stale_bindings(client, cluster, objects)
            deployment = await client.get(resource_path("apps/v1", "Deployment", cluster.proxy.namespace,
                                                        "kube-oidc-proxy"))
    except OwnershipConflict as e:
        return StepResult(c.Condition(kind, c.FALSE, "Conflict", f"on the tenant cluster: {e}"), tuple(changes))
    except TRANSIENT_ERRORS as e:
        error = _tenant_error(e, via)
        return StepResult(c.Condition(kind, c.FALSE, error.reason, str(error)), tuple(changes))
    status = (deployment or {}).get("status") or {}
    ready, wanted = status.get("readyReplicas") or 0, cluster.proxy.replicas
    if ready < 1:
        return StepResult(c.Condition(kind, c.FALSE, "ProxyNotReady",
                                      f"kube-oidc-proxy installed via {via}, {ready}/{wanted} replicas ready; "
                                      f"check its pods in namespace {cluster.proxy.namespace} on the tenant"),
                          tuple(changes))
    return StepResult(c.Condition(kind, c.TRUE, "Ready",
                                  f"kube-oidc-proxy {ready}/{wanted} replicas ready (managed via {via})"), tuple(changes))


async def _prune_stale_bindings(client: Kube, cluster: RemoteTenantCluster, objects: list[dict]) -> list[str]:
    """Removes this cluster's ClusterRoleBindings that are no longer wanted (e.g. after a role change)."""
    wanted = {o["metadata"]["name"] for o in objects if o["kind"] == "ClusterRoleBinding"}
    labels = cluster.ownership_labels()
    selector = ",".join(f"{k}={labels[k]}" for k in (names.LABEL_CLUSTER_NAMESPACE, names.LABEL_CLUSTER_NAME))
    listing = await client.list(resource_path("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"),
                                label_selector=selector)
    removed = []
    for binding in listing.get("items", []):
        name = binding["metadata"]["name"]
        owner = (binding["metadata"].get("annotations") or {}).get(names.ANNOTATION_OWNER)
        if name not in wanted and owner == cluster.ref:
            await client.delete(resource_path("rbac.authorization.k8s.io/v1", "ClusterRoleBinding", None, name))
            removed.append(f"Deleted stale tenant ClusterRoleBinding {name}")
    return removed


async def delete_bootstrap_after_install(ctx: Context, cluster: RemoteTenantCluster) -> list[str]:
    """Once the chain is verified, no static credential needs to remain anywhere."""
    if (cluster.proxy.mode is not ProxyMode.MANAGED or cluster.bootstrap is None
            or not cluster.bootstrap.delete_after_install):
        return []
    if await ctx.kube.delete(_bootstrap_path(cluster)):
        return [f"Deleted bootstrap Secret {cluster.namespace}/{cluster.bootstrap.secret_name}: the tenant is now "
                f"managed through the verified proxy path with short-lived tokens"]
    return []


async def cleanup_managed_proxy(ctx: Context, cluster: RemoteTenantCluster) -> list[str]:
    """Removes what was installed on the tenant; raises TenantUnavailable when it cannot."""
    from ..render.tenant import render_tenant_proxy
    from .tenant import broker_ca_pem

    done: list[str] = []
    ca_path = resource_path("v1", "Secret", ctx.settings.pki_namespace, ca_secret_name(cluster))
    ca_secret = await ctx.kube.get(ca_path)
    issuer_ca = broker_ca_pem(ctx)
    if ca_secret is not None and issuer_ca is not None:
        pki = {k: base64.b64decode(v) for k, v in (ca_secret.get("data") or {}).items()}
        client, via = await tenant_client(ctx, cluster, cluster.ca_pem or pki["ca.crt"])
        objects = render_tenant_proxy(cluster, ctx.settings, serving_cert_pem=pki["tls.crt"],
                                      serving_key_pem=pki["tls.key"], issuer_ca_pem=issuer_ca)
        try:
            async with client:
                # Reverse order: the Deployment goes before the RBAC it uses; the Namespace last.
                for obj in reversed(objects):
                    meta = obj["metadata"]
                    if await delete_if_owned(client, obj["apiVersion"], obj["kind"], meta.get("namespace"),
                                             meta["name"], cluster.ref):
                        done.append(f"Deleted tenant {obj['kind']} {meta['name']} (via {via})")
        except TRANSIENT_ERRORS as e:
            raise _tenant_error(e, via) from None
    if ca_secret is not None:
        await ctx.kube.delete(ca_path)
        done.append(f"Deleted proxy CA Secret {ctx.settings.pki_namespace}/{ca_secret_name(cluster)}")
    return done


__all__ = ["reconcile_managed_proxy", "cleanup_managed_proxy", "managed_ca_pem", "delete_bootstrap_after_install",
           "TenantUnavailable", "json"]
