"""Reconcile steps on the tenant side: ProxyReady (per proxy mode) and TokenVerified."""
from __future__ import annotations

from pathlib import Path

from ..model import conditions as c
from ..model.spec import ProxyMode, RemoteTenantCluster
from .context import Context, StepResult


def broker_ca_pem(ctx: Context) -> bytes | None:
    path = ctx.settings.broker_ca_file
    return Path(path).read_bytes() if path else None


async def reconcile_proxy(ctx: Context, cluster: RemoteTenantCluster) -> StepResult:
    kind = c.PROXY_READY
    mode = cluster.proxy.mode
    if mode is ProxyMode.EXTERNAL:
        return StepResult(c.Condition(kind, c.TRUE, "External",
                                      "kube-oidc-proxy is installed by other means; TokenVerified proves it trusts the broker"))
    if mode is ProxyMode.DIRECT:
        from ..render.tenant import render_authentication_configuration

        ca = broker_ca_pem(ctx)
        if ca is None:
            return StepResult(c.Condition(kind, c.FALSE, "BrokerCAUnknown",
                                          "Direct mode needs the broker's CA (--broker-ca-file) to render the "
                                          "tenant API server's AuthenticationConfiguration"))
        document = render_authentication_configuration(ctx.settings.broker_issuer, cluster.access.audience, ca,
                                                       ctx.settings.signing_algorithm)
        return StepResult(
            c.Condition(kind, c.TRUE, "DirectMode",
                        "no proxy: the tenant API server must load status.authenticationConfiguration "
                        "(--authentication-config); TokenVerified proves it does"),
            status={"authenticationConfiguration": document})
    from .managed import reconcile_managed_proxy

    return await reconcile_managed_proxy(ctx, cluster)


async def reconcile_verification(ctx: Context, cluster: RemoteTenantCluster, ca_pem: bytes | None) -> StepResult:
    verifier = ctx.verifier
    if verifier is None:
        return StepResult(c.Condition(c.TOKEN_VERIFIED, c.UNKNOWN, "VerificationDisabled",
                                      "the operator runs without broker credentials"))
    return StepResult(await verifier.verify(cluster, ca_pem))


async def cleanup_tenant(ctx: Context, cluster: RemoteTenantCluster) -> list[str]:
    if ctx.verifier is not None:
        ctx.verifier.forget(cluster.ref)
    if cluster.proxy.mode is ProxyMode.MANAGED:
        from .managed import cleanup_managed_proxy

        return await cleanup_managed_proxy(ctx, cluster)
    return []
