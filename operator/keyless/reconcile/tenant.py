"""Reconcile steps on the tenant side: ProxyReady and TokenVerified.

Until the tenant-side installer lands these report Unknown with a reason, so `Ready` never claims
more than the operator has proven.
"""
from __future__ import annotations

from ..model import conditions as c
from ..model.spec import RemoteTenantCluster
from .context import Context, StepResult


async def reconcile_proxy(ctx: Context, cluster: RemoteTenantCluster) -> StepResult:
    return StepResult(c.Condition(c.PROXY_READY, c.UNKNOWN, "NotImplemented",
                                  f"proxy mode {cluster.proxy.mode.value} is not handled by this operator version"))


async def reconcile_verification(ctx: Context, cluster: RemoteTenantCluster) -> StepResult:
    return StepResult(c.Condition(c.TOKEN_VERIFIED, c.UNKNOWN, "NotImplemented",
                                  "end-to-end token verification is not handled by this operator version"))


async def cleanup_tenant(ctx: Context, cluster: RemoteTenantCluster) -> list[str]:
    return []
