"""The broker's HTTP API: OIDC discovery + JWKS, token minting behind TokenReview, health; and apart from it,
on the metrics listener, metrics and the OpenAPI document."""
from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

from ..model.names import DEFAULT_CALLER_AUDIENCE
from .audit import AuditLog, rfc3339
from .keys import KeyStore
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, BrokerMetrics
from .openapi import openapi_document
from .ratelimit import RateLimiter
from .review import Caller, CallerReviewer, Refused
from .signing import ClaimsTemplate
from .targets import Target, TargetRegistry

log = logging.getLogger("keyless.broker")

DEFAULT_OPERATOR_IDENTITY = "system:serviceaccount:keyless-system:keyless-operator"
TARGET_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode
_NO_STORE = {"Cache-Control": "no-store"}  # a token must never sit in a shared cache


@dataclass(frozen=True)
class BrokerSettings:
    issuer: str
    namespace: str
    caller_audience: str = DEFAULT_CALLER_AUDIENCE
    operator_identity: str = DEFAULT_OPERATOR_IDENTITY
    max_token_ttl_seconds: int = 3600
    max_body_bytes: int = 4096

    @property
    def issuer_path(self) -> str:
        return urlsplit(self.issuer).path.rstrip("/")

    @property
    def origin(self) -> str:
        parts = urlsplit(self.issuer)
        return f"{parts.scheme}://{parts.netloc}"


def _json(status: int, body: dict, headers: dict | None = None) -> web.Response:
    return web.Response(status=status, body=_encode(body).encode(), content_type="application/json",
                        headers=headers)


def _error(status: int, reason: str, message: str, retry_after: float | None = None) -> web.Response:
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="keyless-broker"'
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, int(retry_after + 0.999)))
    return _json(status, {"error": reason, "message": message}, headers)


_HTTP_REASONS = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large",
                 414: "request_too_large", 431: "request_too_large"}


def _answered(handler, metrics: "BrokerMetrics | None" = None):
    """The route handler, with every error answered as JSON with a stable reason (aiohttp's own 413
    included) and, for the callers' endpoints (`metrics` given), the answer counted.

    A wrapper per route rather than middlewares: on the minting path aiohttp's middleware chain cost ~7 %
    of the broker's throughput."""
    async def answer(request: web.Request) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            reason = _HTTP_REASONS.get(e.status, "error")
            response = _error(e.status, reason, e.reason or reason)
        except Exception:  # a bug: answer, and log without request data (it may hold a token)
            log.exception("unexpected error answering %s %s", request.method, request.path)
            response = _error(500, "internal_error", "the broker failed to answer; see its log")
        if metrics is not None:
            metrics.count_response(response.status)
        return response
    return answer


class Broker:
    def __init__(self, settings: BrokerSettings, keys: KeyStore, targets: TargetRegistry, reviewer: CallerReviewer,
                 limiter: RateLimiter, audit: AuditLog, metrics: BrokerMetrics | None = None, clock=time.time):
        self.settings = settings
        self.keys = keys
        self.targets = targets
        self.reviewer = reviewer
        self.limiter = limiter
        self.audit = audit
        self.metrics = metrics or BrokerMetrics()
        # What /metrics shows: this process's metrics, or the whole pod's with several workers (workers.py).
        self.render_metrics = self.metrics.render
        self.clock = clock
        self.metrics.key_age.set_function(keys.current_key_age)
        self.metrics.keys_published.set_function(lambda: len(keys.keys.keys))
        self.metrics.key_writer.set_function(lambda: 1 if keys.is_writer else 0)
        self.metrics.targets.set_function(lambda: len(targets.targets))
        self.metrics.key_rotation.set(keys.policy.rotation_seconds)
        reviewer.on_review = self.metrics.reviews.inc
        self._mint_counters: dict = {}
        self._templates: dict[str, tuple[Target, ClaimsTemplate]] = {}
        self._jwks_max_age = int(min(300.0, keys.policy.effective_prepublish / 4))
        self._openapi = _encode(openapi_document(settings.origin, settings.issuer_path)).encode()

    # ---- app ------------------------------------------------------------------------------------
    def application(self) -> web.Application:
        app = web.Application(client_max_size=self.settings.max_body_bytes)
        prefix = self.settings.issuer_path
        counted = self.metrics
        routes = [("GET", f"{prefix}/.well-known/openid-configuration", self.discovery, None),
                  ("GET", f"{prefix}/openid/v1/jwks", self.jwks, None),
                  ("POST", "/v1/targets/{name}/token", self.mint_json, counted),
                  ("GET", "/v1/targets", self.list_targets, counted),
                  ("GET", "/api/get-target-token", self.mint_text, counted),
                  ("GET", "/healthz", self.healthz, None),
                  ("GET", "/readyz", self.readyz, None)]
        for method, path, handler, metrics in routes:
            add = app.router.add_get if method == "GET" else app.router.add_post  # add_get: HEAD too
            add(path, _answered(handler, metrics))
        # Not /metrics nor /openapi.json: they name every target, and anyone who can fetch the JWKS reaches
        # this listener. They are on internal_application (--metrics-listen).
        # Last: whatever no route above took, answered as JSON (404, or 405 with Allow) and counted like
        # the callers' endpoints when under their paths.
        routed = list(app.router.resources())
        app.router.add_route("*", "/{path:.*}", self._no_route(routed))
        return app

    def _no_route(self, routed: list):
        async def unmatched(request: web.Request) -> web.Response:
            allowed = set()
            for resource in routed:
                _, methods = await resource.resolve(request)
                allowed |= methods
            if allowed:
                response = _error(405, "method_not_allowed", "Method Not Allowed")
                response.headers["Allow"] = ",".join(sorted(allowed))
            else:
                response = _error(404, "not_found", "Not Found")
            if request.path.startswith(("/v1/", "/api/")):
                self.metrics.count_response(response.status)
            return response
        return unmatched

    def internal_application(self) -> web.Application:
        """The metrics listener's routes: for Prometheus and operators, never on the public issuer."""
        app = web.Application(client_max_size=1024)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get("/openapi.json", self.openapi)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        return app

    # ---- OIDC -----------------------------------------------------------------------------------
    async def discovery(self, request: web.Request) -> web.Response:
        issuer = self.settings.issuer
        return _json(200, {
            "issuer": issuer,
            "jwks_uri": issuer.rstrip("/") + "/openid/v1/jwks",
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": self.keys.keys.algorithms() or [self.keys.policy.algorithm],
            "claims_supported": ["iss", "sub", "aud", "iat", "nbf", "exp", "jti", "groups"],
        }, {"Cache-Control": "public, max-age=60"})

    async def jwks(self, request: web.Request) -> web.Response:
        # Verifiers built on go-oidc do not refetch a JWKS on an unknown kid while its max-age lasts.
        # Keep max-age well inside the pre-publication time, so a cached JWKS always holds the next key
        # before that key signs.
        return web.Response(body=self.keys.jwks_json, content_type="application/jwk-set+json",
                            headers={"Cache-Control": f"public, max-age={self._jwks_max_age}"})

    # ---- minting --------------------------------------------------------------------------------
    async def mint_json(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            if request.body_exists:
                await self._check_body(request)
            token, expires, target = await self._mint(request, request.match_info["name"], "token")
            # Built by hand: the token is base64url text, the target name a validated DNS-style name.
            body = (f'{{"token":"{token}","expirationTimestamp":"{rfc3339(expires)}",'
                    f'"expiresIn":{expires - int(self.clock())},"target":"{target.name}"}}')
            return web.Response(body=body.encode("ascii"), content_type="application/json", headers=_NO_STORE)
        except Refused as r:
            return _error(r.status, r.reason, r.message, r.retry_after)
        finally:
            self.metrics.latency.observe(time.perf_counter() - started)

    async def mint_text(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            name = request.query.get("targetName")
            if not name:
                raise Refused(400, "missing_target_name", "the targetName query parameter is required")
            token, _, _ = await self._mint(request, name, "get-target-token")
            return web.Response(text=token, content_type="text/plain", headers=_NO_STORE)
        except Refused as r:
            return _error(r.status, r.reason, r.message, r.retry_after)
        finally:
            self.metrics.latency.observe(time.perf_counter() - started)

    async def _check_body(self, request: web.Request) -> None:
        raw = await request.read()  # client_max_size turns an oversized body into a 413
        if not raw.strip():
            return
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise Refused(400, "malformed_body", "the request body must be a JSON object (or empty)") from None
        if not isinstance(body, dict):
            raise Refused(400, "malformed_body", "the request body must be a JSON object (or empty)")

    async def _caller(self, request: web.Request) -> Caller:
        header = request.headers.get("Authorization")
        if not header:
            raise Refused(401, "missing_token", "send the caller's projected ServiceAccount token as "
                                                "'Authorization: Bearer <token>'")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Refused(401, "malformed_token", "the Authorization header must be 'Bearer <token>'")
        return await self.reviewer.caller(token.strip(), request.remote or "")

    def _limit(self, caller: Caller) -> None:
        allowed, retry_after = self.limiter.allow(caller.username)
        if not allowed:
            raise Refused(429, "rate_limited", "too many token requests from this caller; retry later",
                          caller, retry_after)

    async def _mint(self, request: web.Request, name: str, endpoint: str) -> tuple[str, int, Target]:
        caller: Caller | None = None
        try:
            if len(name) > 253 or not TARGET_NAME.fullmatch(name):
                raise Refused(400, "invalid_target_name", "target names are lowercase DNS-style names")
            caller = await self._caller(request)
            self._limit(caller)
            target = self.targets.get(name)
            if target is None and not self.targets.synced.is_set():
                # Not "unknown" yet: the registry has not been listed (e.g. right after a restart).
                raise Refused(503, "registry_not_synced", "the broker is still loading its targets; retry shortly",
                              caller, 1.0)
            if target is None:
                raise Refused(404, "unknown_target", f"there is no broker target named {name!r}", caller)
            if caller.username not in target.allowed_callers and caller.username != self.settings.operator_identity:
                raise Refused(403, "caller_not_allowed", f"{caller.username} may not get tokens for {name!r}", caller)
            if self.targets.shares_audience(target):
                raise Refused(409, "audience_conflict", f"another broker target names the audience of {name!r}; "
                                                        f"no token is minted for it until only one does", caller)
            now = self.clock()
            signer = self.keys.signer(now)
            if signer is None:
                raise Refused(503, "no_signing_key", "the broker has no signing key yet; retry shortly", caller)
            cached = self._templates.get(name)
            if cached is None or cached[0] is not target:
                if len(self._templates) > 2 * len(self.targets.targets) + 16:
                    self._templates.clear()  # drop those of deleted targets
                cached = self._templates[name] = (target, ClaimsTemplate(
                    self.settings.issuer, target.username, target.audience, target.groups))
            payload, jti, expires = cached[1].payload(
                int(now), min(target.ttl_seconds, self.settings.max_token_ttl_seconds))
            token = signer.sign_payload(payload)
        except Refused as r:
            caller = caller or r.caller
            self.metrics.denials.labels(r.reason).inc()
            self.audit.decision(outcome="denied", reason=r.reason, status=r.status, target=name[:253],
                                caller=caller.username if caller else None, pod=caller.pod if caller else None,
                                remote=request.remote, endpoint=endpoint)
            raise
        counter = self._mint_counters.get(target.name)
        if counter is None:
            counter = self._mint_counters[target.name] = self.metrics.mints.labels(target.name)
        counter.inc()
        self.audit.decision(outcome="granted", reason="allowed", status=200, target=target.name,
                            caller=caller.username, pod=caller.pod, jti=jti, expires=expires,
                            remote=request.remote, endpoint=endpoint)
        return token, expires, target

    async def list_targets(self, request: web.Request) -> web.Response:
        try:
            caller = await self._caller(request)
            self._limit(caller)
        except Refused as r:
            self.metrics.denials.labels(r.reason).inc()
            return _error(r.status, r.reason, r.message, r.retry_after)
        if not self.targets.synced.is_set():
            # An empty list now would make agents delete every credential they hold.
            return _error(503, "registry_not_synced", "the broker is still loading its targets; retry shortly", 1.0)
        everything = caller.username == self.settings.operator_identity
        mine = [{"name": t.name, "tokenTTLSeconds": min(t.ttl_seconds, self.settings.max_token_ttl_seconds),
                 "audience": t.audience}
                for t in sorted(self.targets.targets.values(), key=lambda t: t.name)
                if everything or caller.username in t.allowed_callers]
        return _json(200, {"targets": mine})

    # ---- operations -----------------------------------------------------------------------------
    async def healthz(self, request: web.Request) -> web.Response:
        return _json(200, {"status": "ok"})

    def not_ready_because(self) -> str | None:
        if not self.keys.loaded.is_set():
            return "signing keys not loaded"
        if self.keys.signer(self.clock()) is None:
            return "no signing key is active"
        if not self.targets.synced.is_set():
            return "broker targets not listed yet"
        return None

    async def readyz(self, request: web.Request) -> web.Response:
        why = self.not_ready_because()
        if why:
            return _json(503, {"status": "not ready", "reason": why})
        return _json(200, {"status": "ok"})

    async def metrics_page(self, request: web.Request) -> web.Response:
        response = web.Response(body=self.render_metrics())
        response.headers["Content-Type"] = METRICS_CONTENT_TYPE
        return response

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=self._openapi, content_type="application/json")
