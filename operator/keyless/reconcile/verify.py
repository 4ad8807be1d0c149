"""Reconcile step TokenVerified: the Verifier's proof of the whole chain, with the CA Argo CD is given."""
from __future__ import annotations

from ..model.spec import RemoteTenantCluster
from .context import Context, Flow, StepResult


async def reconcile_verification(ctx: Context, cluster: RemoteTenantCluster, flow: Flow) -> StepResult:
    condition = await ctx.verifier.verify(cluster, flow.ca_pem)
    flow.verified = condition.is_true
    return StepResult(condition)


async def forget_verification(ctx: Context, cluster: RemoteTenantCluster) -> list[str]:
    """A manifest that is deleted or may not serve is proven again from scratch, should it come back."""
    ctx.verifier.forget(cluster.ref)
    return []
