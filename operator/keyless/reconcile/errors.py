"""What a failed call means for the next attempt: permanent (the API refused the request as it is) or
transient (the API or the network may answer differently soon), and how long to wait. Pure.

A 403 or 422 does not change by being sent again: RBAC, an admission policy or the object itself must
change first. Retrying it every few seconds costs the API server a failing write per manifest forever,
so a permanent failure is tried again when the manifest changes, or after a slow back-off
(--permanent-retry-seconds) in case the fix was made elsewhere. Everything else backs off
exponentially, with jitter, from --retry-seconds to --max-retry-seconds.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from ..kube import KubeError

# Statuses meaning "this request, as it is, will be refused again": bad request, forbidden, method or
# media type not supported, too large, invalid. 401 is not among them (credentials rotate), nor 404
# (a namespace or CRD being created), 409 (a concurrent writer) or 429/5xx.
PERMANENT_STATUSES = frozenset({400, 403, 405, 406, 413, 415, 422})


class CleanupWaiting(Exception):
    """A cleanup that must wait for something outside Keyless to finish first (its message says what);
    the deletion is tried again soon, and given up on after --deletion-give-up-seconds."""


class Retry(enum.IntEnum):
    """When to reconcile again; the larger wins when several steps fail."""

    NONE = 0  # at the next resync (drift repair), or when the manifest changes
    PERMANENT = 1  # when the manifest changes, or after --permanent-retry-seconds
    TRANSIENT = 2  # soon, backing off exponentially with jitter


@dataclass(frozen=True)
class Failure:
    reason: str  # the condition reason: the API's own (Forbidden, Invalid, ...) when permanent
    message: str  # the API's message: safe, it never holds request bodies or tokens
    retry: Retry


def safe_error(e: BaseException) -> str:
    # KubeError messages carry only the server's status text; never request bodies or tokens.
    text = str(e) or e.__class__.__name__
    return f"API call failed: {text[:300]}"


def is_permanent(e: BaseException) -> bool:
    return isinstance(e, KubeError) and e.status in PERMANENT_STATUSES


def classify(e: BaseException, permanent_retry_seconds: float) -> Failure:
    """The condition a failed API call becomes, and when to try again."""
    if is_permanent(e):
        reason = e.reason or ("Forbidden" if e.status == 403 else "Invalid")
        return Failure(reason, f"the API server refused the request (HTTP {e.status} {e.reason}): "
                               f"{(e.message or '')[:300]}; Keyless tries again when the manifest changes, or in "
                               f"{permanent_retry_seconds:.0f} s", Retry.PERMANENT)
    return Failure("APIError", safe_error(e), Retry.TRANSIENT)
