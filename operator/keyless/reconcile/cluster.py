"""The reconcile of one RemoteTenantCluster: run each step, then write status and events once."""
from __future__ import annotations

import base64
import datetime
import logging
import time

from ..kube import KubeError
from ..kube.client import TRANSIENT_ERRORS, resource_path
from ..model import conditions as c
from ..model import names
from ..model.spec import RemoteTenantCluster, SpecError, parse
from ..render.argocd import argocd_secret_name
from . import metrics
from ..kube.apply import OwnershipConflict
from ..model.spec import ProxyMode
from .argocd import cleanup_argocd, conflict_message, reconcile_app_project, reconcile_argocd_secret
from .managed import TenantUnavailable, delete_bootstrap_after_install, managed_ca_pem
from .broker import cleanup_broker_target, reconcile_broker_target
from .context import Context, StepResult
from .tenant import cleanup_tenant, reconcile_proxy, reconcile_verification

log = logging.getLogger(__name__)

FINALIZER = "keyless.dev/cleanup"


def _path(raw: dict, subresource: str | None = None) -> str:
    meta = raw["metadata"]
    return resource_path(names.API_VERSION, "RemoteTenantCluster", meta["namespace"], meta["name"], subresource)


def _ref(raw: dict) -> str:
    return names.owner_ref(raw["metadata"]["namespace"], raw["metadata"]["name"])


class Outcome:
    """What a reconcile found; `retry` asks the caller to come back soon (transient failure)."""

    def __init__(self, reason: str, retry: bool = False):
        self.reason = reason
        self.retry = retry


async def _ensure_finalizer(ctx: Context, raw: dict) -> None:
    finalizers = raw["metadata"].get("finalizers") or []
    if FINALIZER in finalizers:
        return
    ops = [{"op": "test", "path": "/metadata/resourceVersion", "value": raw["metadata"]["resourceVersion"]}]
    if finalizers:
        ops.append({"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER})
    else:
        ops.append({"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]})
    updated = await ctx.kube.json_patch(_path(raw), ops, names.FIELD_MANAGER_OPERATOR)
    raw["metadata"] = updated["metadata"]


async def _remove_finalizer(ctx: Context, raw: dict) -> None:
    finalizers = raw["metadata"].get("finalizers") or []
    if FINALIZER not in finalizers:
        return
    index = finalizers.index(FINALIZER)
    ops = [{"op": "test", "path": f"/metadata/finalizers/{index}", "value": FINALIZER},
           {"op": "remove", "path": f"/metadata/finalizers/{index}"}]
    try:
        await ctx.kube.json_patch(_path(raw), ops, names.FIELD_MANAGER_OPERATOR)
    except KubeError as e:
        if e.status != 404:
            raise


async def _run_steps(ctx: Context, cluster: RemoteTenantCluster) -> tuple[dict[str, StepResult], bool]:
    results: dict[str, StepResult] = {}
    transient = False

    async def run(kind: str, step, *args) -> None:
        nonlocal transient
        try:
            results[kind] = await step(ctx, cluster, *args)
        except TRANSIENT_ERRORS as e:
            transient = True
            status = getattr(e, "status", None)
            reason = "Forbidden" if status == 403 else "APIError"
            results[kind] = StepResult(c.Condition(kind, c.FALSE, reason, _safe_error(e)))

    ca_pem = cluster.ca_pem
    if ca_pem is None and cluster.proxy.mode is ProxyMode.MANAGED and conflict_message(ctx, cluster) is None:
        try:
            # The operator issues the proxy's serving certificate, so its CA is what Argo CD trusts.
            ca_pem = await managed_ca_pem(ctx, cluster)
        except (*TRANSIENT_ERRORS, OwnershipConflict) as e:
            transient = not isinstance(e, OwnershipConflict)
            results[c.ARGO_CLUSTER_REGISTERED] = StepResult(c.Condition(
                c.ARGO_CLUSTER_REGISTERED, c.FALSE, "ProxyCAUnavailable", f"cannot keep the proxy CA: {_safe_error(e)}"))
    if c.ARGO_CLUSTER_REGISTERED not in results:
        await run(c.ARGO_CLUSTER_REGISTERED, reconcile_argocd_secret,
                  base64.b64encode(ca_pem).decode() if ca_pem else None)
    if results[c.ARGO_CLUSTER_REGISTERED].condition.reason in ("Conflict", "ProxyCAUnavailable"):
        # Touch nothing else for a manifest that lost a conflict.
        for kind in (c.APP_PROJECT_READY, c.BROKER_TARGET_REGISTERED, c.PROXY_READY, c.TOKEN_VERIFIED):
            results[kind] = StepResult(c.Condition(kind, c.UNKNOWN, "Blocked",
                                                   "not reconciled until ArgoClusterRegistered is resolved"))
        return results, transient
    await run(c.APP_PROJECT_READY, reconcile_app_project)
    await run(c.BROKER_TARGET_REGISTERED, reconcile_broker_target)
    await run(c.PROXY_READY, reconcile_proxy)
    await run(c.TOKEN_VERIFIED, reconcile_verification, ca_pem)
    if results[c.TOKEN_VERIFIED].condition.is_true:
        try:
            removed = await delete_bootstrap_after_install(ctx, cluster)
        except TRANSIENT_ERRORS:
            removed, transient = [], True
        if removed:
            verified = results[c.TOKEN_VERIFIED]
            results[c.TOKEN_VERIFIED] = StepResult(verified.condition, verified.changes + tuple(removed))
    return results, transient


def _deleting_for(raw: dict) -> float:
    stamp = raw["metadata"].get("deletionTimestamp")
    try:
        since = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    except (TypeError, ValueError):
        return 0.0
    return (datetime.datetime.now(datetime.timezone.utc) - since).total_seconds()


def _safe_error(e: Exception) -> str:
    # KubeError messages carry only the server's status text; never request bodies or tokens.
    text = str(e) or e.__class__.__name__
    return f"API call failed: {text[:300]}"


async def _write_status(ctx: Context, raw: dict, cluster: RemoteTenantCluster | None,
                        results: dict[str, StepResult]) -> None:
    steps = {kind: r.condition for kind, r in results.items()}
    ready = c.summarize(steps)
    wanted = [ready, *(steps[k] for k in c.STEP_CONDITIONS if k in steps)]
    generation = raw["metadata"].get("generation", 0)
    old_status = raw.get("status") or {}
    merged = c.merge(old_status.get("conditions"), wanted, generation)
    status = {"observedGeneration": generation, "conditions": merged}
    if cluster is not None:
        status.update({
            "targetName": cluster.target_name,
            "audience": cluster.access.audience,
            "issuer": cluster.openunison.issuer if cluster.openunison else ctx.settings.broker_issuer,
            "argocdSecret": f"{cluster.argocd.namespace}/{argocd_secret_name(cluster)}",
        })
        for result in results.values():
            status.update(result.status or {})
    metrics.observe_conditions(_ref(raw), wanted)
    extras_same = all(old_status.get(k) == v for k, v in status.items() if k != "conditions")
    if extras_same and not c.changed(old_status.get("conditions"), merged):
        return  # steady state: nothing to write
    updated = await ctx.kube.merge_patch(_path(raw, "status"), {"status": status}, names.FIELD_MANAGER_OPERATOR)
    # Keep the caller's copy current, so a resync right after this does not write the same again.
    raw["status"] = updated.get("status", status)
    raw["metadata"] = updated.get("metadata", raw["metadata"])
    await _emit_transition_events(ctx, raw, old_status.get("conditions"), wanted)


async def _emit_transition_events(ctx: Context, raw: dict, old: list[dict] | None, wanted: list[c.Condition]) -> None:
    """Events for what a human must notice: Ready flipping, and any step that fails.

    Successful steps already produced an "Applied" event for each object they changed, so a step
    turning True adds nothing a reader needs (and 1,000 tenants would pay for it).
    """
    previous = {x.get("type"): (x.get("status"), x.get("reason")) for x in old or []}
    for condition in wanted:
        if previous.get(condition.type) == (condition.status, condition.reason):
            continue
        if condition.type != c.READY and condition.status != c.FALSE:
            continue
        if condition.type == c.READY and not condition.is_true and previous.get(c.READY) is None:
            # The first Ready=False just repeats the failing step's own event (or is expected,
            # e.g. verification pending); report it only when it is a change from a known state.
            if any(x.status == c.FALSE and x.type != c.READY for x in wanted):
                continue
        event_type = "Normal" if condition.is_true else "Warning"
        reason = condition.type if condition.is_true else condition.reason
        await ctx.events.record(raw, event_type, reason[:128], f"{condition.type}={condition.status}: {condition.message}")


async def reconcile(ctx: Context, raw: dict) -> Outcome:
    """Brings everything derived from one RemoteTenantCluster in line with its spec."""
    ref = _ref(raw)
    async with ctx.lock(ref):
        started = time.monotonic()
        if raw["metadata"].get("deletionTimestamp"):
            outcome = await finalize(ctx, raw)
        else:
            outcome = await _reconcile_live(ctx, raw)
        metrics.observe_reconcile(outcome.reason, time.monotonic() - started)
        return outcome


async def _reconcile_live(ctx: Context, raw: dict) -> Outcome:
    try:
        cluster = parse(raw)
    except (SpecError, KeyError, ValueError, TypeError) as e:
        message = str(e) if isinstance(e, SpecError) else f"spec is incomplete or malformed ({e.__class__.__name__}: {e})"
        results = {kind: StepResult(c.Condition(kind, c.FALSE, "InvalidSpec", message)) for kind in c.STEP_CONDITIONS}
        await _write_status(ctx, raw, None, results)
        return Outcome("InvalidSpec")
    ctx.registry.put(cluster)
    await _ensure_finalizer(ctx, raw)
    results, transient = await _run_steps(ctx, cluster)
    for result in results.values():
        for change in result.changes:
            await ctx.events.record(raw, "Normal", "Applied", change)
    await _write_status(ctx, raw, cluster, results)
    ready = c.summarize({k: r.condition for k, r in results.items()})
    return Outcome(ready.reason, retry=transient)


async def finalize(ctx: Context, raw: dict) -> Outcome:
    """Deletes what this manifest created, then lets Kubernetes delete the manifest."""
    ref = _ref(raw)
    if FINALIZER not in (raw["metadata"].get("finalizers") or []):
        ctx.registry.remove(ref)
        return Outcome("Deleted")
    ctx.registry.deleting.add(ref)
    try:
        cluster = parse(raw)
    except (SpecError, KeyError, ValueError, TypeError):
        cluster = ctx.registry.clusters.get(ref)
    if cluster is not None:
        done: list[str] = []
        try:
            done += await cleanup_tenant(ctx, cluster)
        except (TenantUnavailable, *TRANSIENT_ERRORS) as e:
            if _deleting_for(raw) < ctx.settings.deletion_give_up_seconds:
                await ctx.events.record(raw, "Warning", "TenantCleanupRetrying",
                                        f"cannot remove what Keyless installed on the tenant yet: {_safe_error(e)}")
                return Outcome("CleanupFailed", retry=True)
            # A dead tenant must not block deletion forever: give up on it, say so, clean the rest.
            await ctx.events.record(raw, "Warning", "TenantCleanupAbandoned",
                                    f"gave up removing kube-oidc-proxy from the tenant after "
                                    f"{ctx.settings.deletion_give_up_seconds:.0f}s ({_safe_error(e)}); remove namespace "
                                    f"{cluster.proxy.namespace} and the keyless-proxy ClusterRoles there by hand")
        try:
            done += await cleanup_broker_target(ctx, cluster)
            done += await cleanup_argocd(ctx, cluster)
        except TRANSIENT_ERRORS as e:
            await ctx.events.record(raw, "Warning", "CleanupFailed", f"cleanup will be retried: {_safe_error(e)}")
            return Outcome("CleanupFailed", retry=True)
        for line in done:
            await ctx.events.record(raw, "Normal", "Cleanup", line)
    await _remove_finalizer(ctx, raw)
    ctx.registry.remove(ref)
    ctx.forget_lock(ref)
    return Outcome("Deleted")
