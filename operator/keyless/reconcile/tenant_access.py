"""How the operator reaches a Managed tenant's API: with the bootstrap kubeconfig while it exists, else
through the chain itself (kube-oidc-proxy) with its own short-lived broker token once that path is proven;
and the bootstrap credential's removal once the chain is verified (deleteAfterInstall).

If neither path works, the condition says a new bootstrap credential is needed; nothing loops or hangs
(every call has a timeout).
"""
from __future__ import annotations

import base64

import yaml

from ..brokerclient.reply import BrokerError
from ..kube import Kube, KubeConfig, KubeError
from ..kube.client import resource_path
from ..model import conditions as c
from ..model import names
from ..model.spec import ProxyMode, RemoteTenantCluster
from .context import Context, Flow, StepResult

BOOTSTRAP_KEPT = "BootstrapSecretKept"


class TenantUnavailable(Exception):
    """No working credential for the tenant; `reason` and the message say what to do."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


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
    if ctx.broker is None:
        raise TenantUnavailable("BootstrapCredentialMissing", "no bootstrap Secret and no broker credentials")
    try:
        minted = await ctx.broker.mint(cluster.target_name)
    except BrokerError as e:
        raise TenantUnavailable("BrokerUnavailable", f"cannot mint a token to reach the tenant: {e}") from None
    return ctx.verifier.tenant_client(cluster.server, ca_pem, minted.token, "keyless-operator")


async def tenant_client(ctx: Context, cluster: RemoteTenantCluster, ca_pem: bytes) -> tuple[Kube, str]:
    """A client of the tenant's API and how it got there ("bootstrap credential" or "the verified proxy path")."""
    client = await _bootstrap_client(ctx, cluster)
    if client is not None:
        return client, "bootstrap credential"
    if ctx.verifier.enabled():
        # E.g. after an operator restart: prove the chain first, then manage the tenant through it.
        if ctx.verifier.was_verified(cluster.ref) or (await ctx.verifier.verify(cluster, ca_pem)).is_true:
            return await _proxy_path_client(ctx, cluster, ca_pem), "the verified proxy path"
    ref = f"{cluster.namespace}/{cluster.bootstrap.secret_name}" if cluster.bootstrap else "(none)"
    raise TenantUnavailable("BootstrapCredentialMissing",
                            f"bootstrap Secret {ref} not found and the proxy path is not verified; create the "
                            f"Secret with a kubeconfig for the tenant cluster (key "
                            f"{cluster.bootstrap.secret_key if cluster.bootstrap else 'kubeconfig'})")


def tenant_error(e: Exception, via: str) -> TenantUnavailable:
    """A failed call to the tenant, as the condition that says what to do."""
    if isinstance(e, KubeError) and e.status in (401, 403):
        hint = ("provide a new bootstrap credential (spec.bootstrap.kubeconfigSecretRef)"
                if via != "bootstrap credential" else "the bootstrap kubeconfig needs cluster-admin on the tenant")
        return TenantUnavailable("TenantAccessDenied", f"the tenant refused {via} (HTTP {e.status}); {hint}")
    return TenantUnavailable("TenantUnreachable", f"cannot reach the tenant API with {via} ({e.__class__.__name__})")


async def remove_bootstrap_after_install(ctx: Context, cluster: RemoteTenantCluster, flow: Flow) -> StepResult | None:
    """Once the chain is verified, no static credential needs to remain anywhere (deleteAfterInstall).

    Deletes only a Secret that says it is this manifest's bootstrap credential (annotation
    keyless.dev/bootstrap-for: <manifest name>), exactly the version that said so: a manifest's
    author cannot make the operator delete some other Secret of the namespace by naming it. A Secret
    kept for want of that annotation amends ProxyReady (a Warning the user must act on).
    """
    if (not flow.verified or cluster.proxy.mode is not ProxyMode.MANAGED or cluster.bootstrap is None
            or not cluster.bootstrap.delete_after_install):
        return None
    path = _bootstrap_path(cluster)
    secret = await ctx.kube.get(path)
    if secret is None:
        return None
    meta = secret.get("metadata") or {}
    where = f"{cluster.namespace}/{cluster.bootstrap.secret_name}"
    if (meta.get("annotations") or {}).get(names.ANNOTATION_BOOTSTRAP_FOR) != cluster.name:
        kept = (f"spec.bootstrap.deleteAfterInstall is true, but Secret {where} was kept: only a Secret annotated "
                f"{names.ANNOTATION_BOOTSTRAP_FOR}={cluster.name} is deleted (kubectl annotate secret -n "
                f"{cluster.namespace} {cluster.bootstrap.secret_name} {names.ANNOTATION_BOOTSTRAP_FOR}={cluster.name}), "
                f"or delete it yourself")
        proxy = flow.conditions[c.PROXY_READY]
        # A failing ProxyReady keeps its own reason (the thing to fix first); the kept Secret is added.
        reason = BOOTSTRAP_KEPT if proxy.is_true else proxy.reason
        return StepResult(c.Condition(c.PROXY_READY, proxy.status, reason, f"{proxy.message}; {kept}"))
    try:
        deleted = await ctx.kube.delete(path, preconditions={"uid": meta.get("uid"),
                                                             "resourceVersion": meta.get("resourceVersion")})
    except KubeError as e:
        if e.status == 409:  # changed since we read it: decide again on the next reconcile
            return None
        raise
    if not deleted:
        return None
    return StepResult(flow.conditions[c.PROXY_READY],
                      (f"Deleted bootstrap Secret {where}: the tenant is now managed through the verified proxy "
                       f"path with short-lived tokens",))
