"""Who is calling: TokenReview of the caller's projected token, a live-Pod check, a short cache."""
from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections import OrderedDict
from dataclasses import dataclass

import aiohttp

from ..kube.client import Kube, KubeError, resource_path
from .signing import unverified_claims

POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"
MAX_TOKEN_LENGTH = 16384
# What a Pod lookup may be built from: a path segment that is a DNS-1123 name, never "..", "/" or "%".
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_POD_NAME = re.compile(r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def pod_reference_is_safe(namespace: object, name: object, uid: object) -> bool:
    """True when namespace/name are DNS-1123 names (safe in an API path) and a uid is given."""
    return (isinstance(namespace, str) and isinstance(name, str) and isinstance(uid, str)
            and bool(_NAMESPACE.fullmatch(namespace)) and bool(_POD_NAME.fullmatch(name))
            and 0 < len(uid) <= 64)


@dataclass(frozen=True)
class Caller:
    username: str
    pod_namespace: str
    pod_name: str
    pod_uid: str

    @property
    def pod(self) -> str:
        return f"{self.pod_namespace}/{self.pod_name}"


class Refused(Exception):
    """A caller the broker will not serve; `reason` is a stable machine word, `message` is for humans."""

    def __init__(self, status: int, reason: str, message: str, caller: Caller | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.caller = caller
        self.retry_after = retry_after


class CallerReviewer:
    """Turns a bearer token into a Caller or a Refused. Positive answers are cached briefly."""

    def __init__(self, kube: Kube, audience: str, *, cache_seconds: float = 5.0, cache_size: int = 10000,
                 check_pod: bool = True, concurrent_reviews: int = 16, miss_limiter=None,
                 on_review=None, clock=time.time):
        self.kube = kube
        self.audience = audience
        self.cache_seconds = cache_seconds
        self.cache_size = cache_size
        self.check_pod = check_pod
        self.clock = clock
        self._cache: OrderedDict[bytes, tuple[Caller, float]] = OrderedDict()
        self._pending: dict[bytes, asyncio.Future] = {}
        self._reviews = asyncio.Semaphore(concurrent_reviews)
        self.reviews_sent = 0
        # Tokens not in the cache cost the API server a TokenReview: limit those per remote address.
        self.miss_limiter = miss_limiter
        self.on_review = on_review

    async def caller(self, token: str, remote: str = "") -> Caller:
        if not token or len(token) > MAX_TOKEN_LENGTH:
            raise Refused(401, "malformed_token", "the bearer token is empty or too long")
        digest = hashlib.sha256(token.encode()).digest()
        now = self.clock()
        hit = self._cache.get(digest)
        if hit is not None:
            if hit[1] > now:
                return hit[0]
            del self._cache[digest]
        pending = self._pending.get(digest)
        if pending is not None:  # the same token is being reviewed right now: share the answer
            return await asyncio.shield(pending)
        if self.miss_limiter is not None:
            allowed, retry_after = self.miss_limiter.allow(remote)
            if not allowed:
                raise Refused(429, "rate_limited", "too many unreviewed tokens from this address; retry later",
                              retry_after=retry_after)
        future = asyncio.get_running_loop().create_future()
        self._pending[digest] = future
        try:
            caller, until = await self._review(token)
            if until > self.clock():
                self._cache[digest] = (caller, until)
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            future.set_result(caller)
            return caller
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # mark retrieved: nobody else may be waiting
            raise
        finally:
            del self._pending[digest]

    async def _review(self, token: str) -> tuple[Caller, float]:
        claims = unverified_claims(token)
        if claims is None:
            raise Refused(401, "malformed_token", "the bearer token is not a JWT")
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": {"token": token, "audiences": [self.audience]}}
        try:
            async with self._reviews:
                self.reviews_sent += 1
                if self.on_review is not None:
                    self.on_review()
                review = await self.kube.create(resource_path("authentication.k8s.io/v1", "TokenReview"), body)
        except (KubeError, OSError, asyncio.TimeoutError, aiohttp.ClientError) as e:
            raise Refused(503, "review_unavailable", f"the TokenReview could not be made: {type(e).__name__}") from None
        status = review.get("status") or {}
        # An empty audiences list means "valid for the API server itself", not for us: refuse it.
        if not status.get("authenticated") or self.audience not in (status.get("audiences") or []):
            reason = _why_unauthenticated(claims, self.audience, self.clock())
            if reason == "invalid_token" and await self._bound_pod_is_gone(claims):
                reason = "pod_gone"
            raise Refused(401, reason, "the caller token was not accepted by the API server")
        user = status.get("user") or {}
        username = user.get("username") or ""
        extra = user.get("extra") or {}
        pod_name = (extra.get(POD_NAME_EXTRA) or [""])[0]
        pod_uid = (extra.get(POD_UID_EXTRA) or [""])[0]
        if not username.startswith(SERVICE_ACCOUNT_PREFIX) or not pod_name or not pod_uid:
            raise Refused(401, "not_pod_bound", "the caller token must be a ServiceAccount token bound to a Pod")
        pod_namespace = username[len(SERVICE_ACCOUNT_PREFIX):].split(":", 1)[0]
        caller = Caller(username, pod_namespace, pod_name, pod_uid)
        if self.check_pod:
            await self._require_live_pod(caller)
        until = self.clock() + self.cache_seconds
        exp = claims.get("exp")
        if isinstance(exp, (int, float)):
            until = min(until, float(exp))
        return caller, until

    async def _require_live_pod(self, caller: Caller) -> None:
        # The API server caches successful authentications (~10 s); asking for the Pod is what makes
        # "the Pod still exists" true now rather than a few seconds ago.
        if not pod_reference_is_safe(caller.pod_namespace, caller.pod_name, caller.pod_uid):
            raise Refused(401, "not_pod_bound", "the caller token must be a ServiceAccount token bound to a Pod",
                          caller)
        try:
            pod = await self.kube.get(resource_path("v1", "Pod", caller.pod_namespace, caller.pod_name))
        except (KubeError, OSError, asyncio.TimeoutError, aiohttp.ClientError) as e:
            raise Refused(503, "review_unavailable", f"the caller's Pod could not be checked: {type(e).__name__}",
                          caller) from None
        if pod is None or (pod.get("metadata") or {}).get("uid") != caller.pod_uid:
            raise Refused(401, "pod_gone", f"the Pod {caller.pod} the caller token is bound to no longer exists",
                          caller)


    async def _bound_pod_is_gone(self, claims: dict) -> bool:
        """Only names a refusal that already happened. The claims are the token's own, unverified:
        they reach the API only as a well-formed namespace/name (no path tricks such as "../"), with
        a uid, so the answer says no more than "this exact Pod is gone" to someone holding its token."""
        bound = claims.get("kubernetes.io")
        if not isinstance(bound, dict) or not isinstance(bound.get("pod"), dict):
            return False
        namespace, pod = bound.get("namespace"), bound["pod"]
        if not pod_reference_is_safe(namespace, pod.get("name"), pod.get("uid")):
            return False
        try:
            found = await self.kube.get(resource_path("v1", "Pod", namespace, pod["name"]))
        except (KubeError, OSError, asyncio.TimeoutError, aiohttp.ClientError):
            return False
        return found is None or (found.get("metadata") or {}).get("uid") != pod.get("uid")


def _why_unauthenticated(claims: dict, audience: str, now: float) -> str:
    """Names a refusal from the unverified claims. Only a label for logs and metrics; never grants."""
    exp = claims.get("exp")
    if isinstance(exp, (int, float)) and exp <= now:
        return "expired_token"
    aud = claims.get("aud")
    audiences = aud if isinstance(aud, list) else [aud]
    if audience not in audiences:
        return "wrong_audience"
    return "invalid_token"
