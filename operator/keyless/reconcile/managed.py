"""Managed proxy mode: install kube-oidc-proxy, its trust and RBAC on the tenant cluster."""
from __future__ import annotations

from ..model import conditions as c
from ..model.spec import RemoteTenantCluster
from .context import Context, StepResult


async def reconcile_managed_proxy(ctx: Context, cluster: RemoteTenantCluster) -> StepResult:
    return StepResult(c.Condition(c.PROXY_READY, c.UNKNOWN, "NotImplemented",
                                  "Managed mode installation is not available in this operator version"))


async def cleanup_managed_proxy(ctx: Context, cluster: RemoteTenantCluster) -> list[str]:
    return []
