"""The step table: one Step per derived object, in the order they are reconciled, each owning one condition.

This table is the whole path from a RemoteTenantCluster to what Keyless derives from it. `run` walks it
forwards on every reconcile; `clean_up` walks it backwards when the manifest is deleted; `withdraw` runs
the cleanups of the control-plane steps when the manifest may not serve (it lost a claim, or its namespace
is not its tenant's). What a step needs from an earlier one travels in the Flow (context.py), never
through a side channel; the broker's CA, read once at start-up, is in the Context.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable

from ..kube.client import API_ERRORS
from ..model import conditions as c
from ..model.spec import RemoteTenantCluster
from ..settings import OperatorSettings
from . import argocd, broker, cluster_profile, proxy, proxy_pki, tenant_access, verify
from .context import Context, Flow, StepResult
from .errors import CleanupWaiting, Retry, classify

Reconcile = Callable[[Context, RemoteTenantCluster, Flow], Awaitable["StepResult | None"]]
Cleanup = Callable[[Context, RemoteTenantCluster], Awaitable[list[str]]]


def _always(_: OperatorSettings) -> bool:
    return True


@dataclass(frozen=True)
class Step:
    name: str
    reconcile: Reconcile
    # The condition this step owns; or None for a step that owns none and amends `amends` instead.
    condition: str | None
    cleanup: Cleanup | None = None
    needs: tuple[str, ...] = ()  # Flow fields (or Context fields) it reads, set by earlier steps
    gives: tuple[str, ...] = ()  # Flow fields it sets for later steps
    amends: str | None = None
    # Its cleanup also runs when the manifest may not serve (what it derived on the control plane
    # could serve whoever holds the claim now); tenant-side objects stay, they trust an audience
    # nobody can get a token for any more.
    withdrawn: bool = False
    # Its cleanup reaches the tenant: after --deletion-give-up-seconds a dead tenant is given up on,
    # and `abandon` removes what the control plane kept for it.
    on_tenant: bool = False
    abandon: Cleanup | None = None
    enabled: Callable[[OperatorSettings], bool] = _always


STEPS: tuple[Step, ...] = (
    # The AppProject comes first: it limits the tenant before its cluster appears in Argo CD, and, cleaned
    # up last, it outlives the cluster Secret until Argo CD has deleted the project's Applications (Argo CD
    # cannot finalize an Application whose AppProject is gone).
    Step("AppProject", argocd.reconcile_app_project, c.APP_PROJECT_READY, argocd.cleanup_app_project,
         withdrawn=True),
    Step("Argo CD cluster Secret", argocd.register_cluster, c.ARGO_CLUSTER_REGISTERED, argocd.unregister_cluster,
         gives=("ca_pem", "proxy_pki", "adopting"), withdrawn=True),
    Step("broker target", broker.reconcile_broker_target, c.BROKER_TARGET_REGISTERED, broker.cleanup_broker_target,
         withdrawn=True),
    Step("tenant side (proxy or trust)", proxy.reconcile_proxy, c.PROXY_READY, proxy.cleanup_proxy,
         needs=("broker_ca_pem", "proxy_pki"), gives=("proxy_pki",), on_tenant=True, abandon=proxy_pki.delete),
    Step("chain verification", verify.reconcile_verification, c.TOKEN_VERIFIED, verify.forget_verification,
         needs=("ca_pem",), gives=("verified",), withdrawn=True),
    Step("Argo CD Secret takeover", argocd.take_over_marked_secrets, None,
         needs=("verified", "adopting"), amends=c.ARGO_CLUSTER_REGISTERED),
    Step("bootstrap credential removal", tenant_access.remove_bootstrap_after_install, None,
         needs=("verified",), amends=c.PROXY_READY),
    Step("ClusterProfile", cluster_profile.reconcile, c.CLUSTER_PROFILE_PUBLISHED, cluster_profile.cleanup,
         needs=("ca_pem",), withdrawn=True, enabled=lambda settings: settings.cluster_profiles),
)


@dataclass
class Outcome:
    """What the steps found: the condition of each, and when to reconcile again."""

    results: dict[str, StepResult]
    retry: Retry


def active(settings: OperatorSettings) -> list[Step]:
    return [step for step in STEPS if step.enabled(settings)]


def blocked(kind: str, why: str) -> StepResult:
    return StepResult(c.Condition(kind, c.UNKNOWN, "Blocked", why))


async def run(ctx: Context, cluster: RemoteTenantCluster) -> Outcome:
    """Every step in order. A step's API failure becomes its condition (never an exception); a step that
    blocks leaves the later ones Blocked; a manifest that may not serve withdraws what it derived."""
    flow = Flow(ca_pem=cluster.ca_pem)
    results: dict[str, StepResult] = {}
    retry = Retry.NONE
    blocking: str | None = None
    for step in active(ctx.settings):
        if blocking is not None:
            if step.condition is not None:
                results[step.condition] = blocked(step.condition, blocking)
            continue
        try:
            result = await step.reconcile(ctx, cluster, flow)
        except API_ERRORS as e:
            failure = classify(e, ctx.settings.permanent_retry_seconds)
            retry = max(retry, failure.retry)
            if step.condition is None:
                continue  # an amending step that failed changes nothing; it runs again with the retry
            result = StepResult(c.Condition(step.condition, c.FALSE, failure.reason, failure.message))
        if result is None:
            continue
        retry = max(retry, result.retry)
        if step.amends is not None:
            before = results[step.amends]
            result = StepResult(result.condition, before.changes + result.changes, before.status)
            results[step.amends] = result
            flow.conditions[step.amends] = result.condition
            continue
        if result.withdraw:
            try:
                withdrawn = tuple(await withdraw(ctx, cluster))
            except API_ERRORS as e:
                withdrawn, retry = (), max(retry, classify(e, ctx.settings.permanent_retry_seconds).retry)
            result = StepResult(result.condition, result.changes + withdrawn, result.status, result.retry,
                                result.blocks)
        results[step.condition] = result
        flow.conditions[step.condition] = result.condition
        blocking = result.blocks
    return Outcome(results, retry)


async def withdraw(ctx: Context, cluster: RemoteTenantCluster) -> list[str]:
    """Removes what a manifest that may not serve created on the control plane (its Argo CD Secret, its
    AppProject destination, its BrokerTarget so no token is minted for its audience, its ClusterProfile)."""
    done: list[str] = []
    for step in reversed(active(ctx.settings)):
        if step.withdrawn and step.cleanup is not None:
            try:
                done += await step.cleanup(ctx, cluster)
            except CleanupWaiting as e:  # e.g. the AppProject stays, granting nothing, for its Applications
                done.append(str(e))
    return done


class TenantCleanupFailed(Exception):
    """The tenant side could not be cleaned (yet); the caller decides whether to give up on it."""

    def __init__(self, cause: Exception):
        super().__init__(str(cause))
        self.cause = cause


async def clean_up(ctx: Context, cluster: RemoteTenantCluster, *, give_up_on_tenant: bool) -> tuple[list[str], Exception | None]:
    """Every step's cleanup, last step first (the tenant is cleaned while the broker target that the
    proxy path needs still exists). Returns what was removed, and the tenant failure given up on (if any).
    Raises TenantCleanupFailed while the tenant may still be reached, and API errors of the control plane."""
    done: list[str] = []
    abandoned: Exception | None = None
    for step in reversed(active(ctx.settings)):
        if step.cleanup is None:
            continue
        if not step.on_tenant:
            try:
                done += await step.cleanup(ctx, cluster)
            except CleanupWaiting as e:
                if not give_up_on_tenant:
                    raise
                done.append(f"gave up waiting after --deletion-give-up-seconds: {e}")
            continue
        try:
            done += await step.cleanup(ctx, cluster)
        except (tenant_access.TenantUnavailable, *API_ERRORS) as e:
            if not give_up_on_tenant:
                raise TenantCleanupFailed(e) from None
            abandoned = e
            if step.abandon is not None:
                done += await step.abandon(ctx, cluster)
    return done, abandoned
