"""The reconcile of one RemoteTenantCluster: parse it, check that its namespace is its tenant's, run the
step table (steps.py), then write status and events once. Deletion walks the same table backwards."""
from __future__ import annotations

import datetime
import logging
import time
from dataclasses import dataclass

from ..kube import KubeError
from ..kube.client import API_ERRORS, resource_path
from ..model import conditions as c
from ..model import names
from ..model.claims import namespace_problem
from ..model.spec import RemoteTenantCluster, SpecError, parse
from ..render.argocd import argocd_secret_name
from ..render.tenant import issuer_for
from . import metrics, steps
from .context import Context, StepResult
from .errors import CleanupWaiting, Retry, classify, safe_error
from .status import ClusterStatus
from .tenant_access import BOOTSTRAP_KEPT

log = logging.getLogger(__name__)

FINALIZER = "keyless.dev/cleanup"
NAMESPACE_NOT_OWNED = "NamespaceNotOwned"
# Reasons a True condition may carry that still need a human: a Warning event when they appear.
WARNING_REASONS = frozenset({BOOTSTRAP_KEPT})


@dataclass(frozen=True)
class Outcome:
    """What a reconcile found, and when the controller should come back (errors.Retry).

    `condition`, `status`, `message`: the condition that explains the outcome (the first failing step's,
    else Ready); `changed`: objects applied or withdrawn, or a status written. The controller logs one line
    from them (controller.py)."""

    reason: str
    retry: Retry = Retry.NONE
    condition: str = ""
    status: str = ""
    message: str = ""
    changed: bool = False


def _explained(reason: str, status: ClusterStatus | None, changed: bool, retry: Retry = Retry.NONE) -> Outcome:
    if status is None:
        return Outcome(reason, retry, changed=changed)
    wanted = status.conditions()
    culprit = next((x for x in wanted if x.type != c.READY and x.status == c.FALSE), None) \
        or next((x for x in wanted if x.type == c.READY), None)
    if culprit is None:
        return Outcome(reason, retry, changed=changed)
    return Outcome(reason, retry, culprit.type, culprit.status, culprit.message, changed)


def _path(raw: dict, subresource: str | None = None) -> str:
    meta = raw["metadata"]
    return resource_path(names.API_VERSION, "RemoteTenantCluster", meta["namespace"], meta["name"], subresource)


def _ref(raw: dict) -> str:
    return names.owner_ref(raw["metadata"]["namespace"], raw["metadata"]["name"])


async def reconcile(ctx: Context, raw: dict) -> Outcome:
    """Brings everything derived from one RemoteTenantCluster in line with its spec."""
    async with ctx.lock(_ref(raw)):
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
    except SpecError as e:
        results = {kind: StepResult(c.Condition(kind, c.FALSE, "InvalidSpec", str(e))) for kind in c.STEP_CONDITIONS}
        status, written = await _write_status(ctx, raw, None, results)
        return _explained("InvalidSpec", status, written)
    ctx.registry.put(cluster)
    problem = await _namespace_problem(ctx, cluster)
    if problem is not None:
        return await _refuse_foreign_namespace(ctx, raw, cluster, problem)
    await _ensure_finalizer(ctx, raw)
    outcome = await steps.run(ctx, cluster)
    # One Event per reconcile that changed anything, naming every change: at fleet scale an Event per
    # derived object was the largest share of the operator's API requests (4 of ~17 per manifest).
    changes = [change for result in outcome.results.values() for change in result.changes]
    for message in _joined(changes, limit=1000):  # an Event message is cut at 1,024 characters
        await ctx.events.record(raw, "Normal", "Applied", message)
    status, written = await _write_status(ctx, raw, cluster, outcome.results)
    return _explained(status.ready.reason, status, bool(changes) or written, outcome.retry)


def _joined(changes: list[str], limit: int) -> list[str]:
    """The changes as few '; '-joined messages of at most `limit` characters (a longer change alone)."""
    messages: list[str] = []
    for change in changes:
        if messages and len(messages[-1]) + 2 + len(change) <= limit:
            messages[-1] += "; " + change
        else:
            messages.append(change)
    return messages


async def _namespace_problem(ctx: Context, cluster: RemoteTenantCluster) -> str | None:
    """Why the manifest's namespace is not its tenant's, as the API server says now: the namespace
    watch may not have delivered a label set just before the manifest was created."""
    problem = namespace_problem(cluster.namespace, cluster.tenant, ctx.namespace_tenant(cluster.namespace))
    if problem is None:
        return None
    live = await ctx.kube.get(resource_path("v1", "Namespace", None, cluster.namespace))
    tenant = ((live or {}).get("metadata", {}).get("labels") or {}).get(names.LABEL_TENANT)
    return namespace_problem(cluster.namespace, cluster.tenant, tenant)


async def _refuse_foreign_namespace(ctx: Context, raw: dict, cluster: RemoteTenantCluster, problem: str) -> Outcome:
    """A manifest whose namespace is not its tenant's derives nothing; if it did before (the namespace
    was relabelled), what it created is withdrawn. Its finalizer stays, so deleting it still cleans up."""
    retry = Retry.NONE
    try:
        withdrawn = tuple(await steps.withdraw(ctx, cluster))
    except API_ERRORS as e:
        withdrawn, retry = (), classify(e, ctx.settings.permanent_retry_seconds).retry
    results = {c.ARGO_CLUSTER_REGISTERED: StepResult(
        c.Condition(c.ARGO_CLUSTER_REGISTERED, c.FALSE, NAMESPACE_NOT_OWNED, problem), withdrawn)}
    for kind in c.STEP_CONDITIONS[1:]:
        results[kind] = steps.blocked(kind, "not reconciled until the namespace belongs to spec.tenant")
    for change in withdrawn:
        await ctx.events.record(raw, "Normal", "Withdrawn", change)
    status, written = await _write_status(ctx, raw, cluster, results)
    return _explained(NAMESPACE_NOT_OWNED, status, bool(withdrawn) or written, retry)


async def finalize(ctx: Context, raw: dict) -> Outcome:
    """Deletes what this manifest created (the step table backwards), then lets Kubernetes delete it."""
    ref = _ref(raw)
    if FINALIZER not in (raw["metadata"].get("finalizers") or []):
        ctx.registry.remove(ref)
        return Outcome("Deleted")
    ctx.registry.mark_deleting(ref)
    try:
        cluster = parse(raw)
    except SpecError:
        cluster = ctx.registry.clusters.get(ref)
    if cluster is not None:
        give_up = _deleting_for(raw) >= ctx.settings.deletion_give_up_seconds
        try:
            done, abandoned = await steps.clean_up(ctx, cluster, give_up_on_tenant=give_up)
        except CleanupWaiting as e:
            await ctx.events.record(raw, "Normal", "CleanupWaiting", str(e))
            return Outcome("CleanupWaiting", Retry.TRANSIENT, "Deletion", c.FALSE, str(e))
        except steps.TenantCleanupFailed as e:
            await ctx.events.record(raw, "Warning", "TenantCleanupRetrying",
                                    f"cannot remove what Keyless installed on the tenant yet: {safe_error(e.cause)}")
            return Outcome("CleanupFailed", Retry.TRANSIENT, "Deletion", c.FALSE, safe_error(e.cause))
        except API_ERRORS as e:
            await ctx.events.record(raw, "Warning", "CleanupFailed", f"cleanup will be retried: {safe_error(e)}")
            return Outcome("CleanupFailed", classify(e, ctx.settings.permanent_retry_seconds).retry, "Deletion",
                           c.FALSE, safe_error(e))
        if abandoned is not None:
            # A dead tenant must not block deletion forever: give up on it, say so, clean the rest.
            await ctx.events.record(raw, "Warning", "TenantCleanupAbandoned",
                                    f"gave up removing kube-oidc-proxy from the tenant after "
                                    f"{ctx.settings.deletion_give_up_seconds:.0f}s ({safe_error(abandoned)}); remove "
                                    f"namespace {cluster.proxy.namespace} and the keyless-proxy ClusterRoles there by hand")
        for line in done:
            await ctx.events.record(raw, "Normal", "Cleanup", line)
    await _remove_finalizer(ctx, raw)
    ctx.registry.remove(ref)
    ctx.forget_lock(ref)
    return Outcome("Deleted", condition="Deletion", status=c.TRUE, message="everything it created is removed",
                   changed=True)


def _deleting_for(raw: dict) -> float:
    stamp = raw["metadata"].get("deletionTimestamp")
    try:
        since = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    except (TypeError, ValueError):
        return 0.0
    return (datetime.datetime.now(datetime.timezone.utc) - since).total_seconds()


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


async def _write_status(ctx: Context, raw: dict, cluster: RemoteTenantCluster | None,
                        results: dict[str, StepResult]) -> tuple[ClusterStatus, bool]:
    """Writes the status once, and only when it changed; then the events a human must notice.
    Returns the status and whether it was written."""
    generation = raw["metadata"].get("generation", 0)
    conditions = {kind: r.condition for kind, r in results.items()}
    if cluster is None:
        status = ClusterStatus.of(generation, conditions)
    else:
        status = ClusterStatus.of(generation, conditions, cluster, issuer=issuer_for(cluster, ctx.settings),
                                  argocd_secret=f"{cluster.argocd.namespace}/{argocd_secret_name(cluster)}")
        for result in results.values():
            status.add_step_fields(result.status)
    wanted = status.conditions()
    metrics.observe_conditions(_ref(raw), wanted)
    old_status = raw.get("status") or {}
    patch = status.patch(old_status)
    if patch is None:
        return status, False  # steady state: nothing to write
    updated = await ctx.kube.merge_patch(_path(raw, "status"), {"status": patch}, names.FIELD_MANAGER_OPERATOR)
    # Keep the caller's copy current, so a resync right after this does not write the same again.
    raw["status"] = updated.get("status", patch)
    raw["metadata"] = updated.get("metadata", raw["metadata"])
    await _emit_transition_events(ctx, raw, old_status.get("conditions"), wanted)
    return status, True


async def _emit_transition_events(ctx: Context, raw: dict, old: list[dict] | None, wanted: list[c.Condition]) -> None:
    """Events for what a human must notice: Ready flipping, and any step that fails.

    Successful steps already produced one "Applied" event naming the objects they changed, so a step
    turning True adds nothing a reader needs (and 1,000 tenants would pay for it). One Event per distinct
    problem: conditions that fail for the same reason with the same message (an invalid spec fails every
    step) make one Event naming them all, and a condition whose status, reason and message did not change
    makes none, however often the manifest is reconciled.
    """
    previous = {x.get("type"): (x.get("status"), x.get("reason"), x.get("message")) for x in old or []}
    problems: dict[tuple[str, str, str, str], list[str]] = {}  # (type, reason, status, message) -> conditions
    for condition in wanted:
        if previous.get(condition.type) == (condition.status, condition.reason, condition.message):
            continue
        warning = condition.reason in WARNING_REASONS
        if condition.type != c.READY and condition.status != c.FALSE and not warning:
            continue
        if condition.type == c.READY and not condition.is_true and previous.get(c.READY) is None:
            # The first Ready=False just repeats the failing step's own event (or is expected,
            # e.g. verification pending); report it only when it is a change from a known state.
            if any(x.status == c.FALSE and x.type != c.READY for x in wanted):
                continue
        event_type = "Normal" if condition.is_true and not warning else "Warning"
        reason = condition.type if condition.is_true and not warning else condition.reason
        problems.setdefault((event_type, reason[:128], condition.status, condition.message), []).append(condition.type)
    failing_steps = {key[1] for key, kinds in problems.items() if key[0] == "Warning" and c.READY not in kinds}
    for (event_type, reason, status, message), kinds in problems.items():
        if kinds == [c.READY] and event_type == "Warning" and reason in failing_steps:
            continue  # Ready=False for a step's reason repeats that step's own Event of this round
        await ctx.events.record(raw, event_type, reason, f"{', '.join(kinds)}={status}: {message}")
