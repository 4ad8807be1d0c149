"""The broker's API as its clients see it: paths, what a reply means, and the errors. Standard library only
(and no dataclasses: `keyless token` imports this on every kubectl token refresh)."""
from __future__ import annotations

import json
import re
from datetime import datetime
from urllib.parse import quote

TARGETS_PATH = "/v1/targets"
# Anything shaped like a JWT (three base64url parts) or a long opaque secret is cut from error text.
_SECRET_LIKE = re.compile(r"[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*|[A-Za-z0-9+/_=-]{64,}")


def token_path(target: str) -> str:
    return f"{TARGETS_PATH}/{quote(target, safe='')}/token"


def redact(text: str) -> str:
    """`text` without anything that looks like a token or key (for error messages and reports)."""
    return _SECRET_LIKE.sub("[redacted]", text)


class BrokerError(Exception):
    """Base of broker failures. `reason` is a short label for metrics; messages never hold tokens."""

    reason = "error"


class BrokerUnavailable(BrokerError):
    """No answer, a timeout, or a 5xx/429: try again later (not before `retry_after` s, if given)."""

    reason = "unavailable"

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class BrokerRefused(BrokerError):
    """The broker answered with a 4xx decision (401 unauthenticated, 403 not allowed, 404 unknown)."""

    def __init__(self, status: int, error: str, message: str):
        super().__init__(f"HTTP {status} {error}: {message}")
        self.status = status
        self.error = error  # the broker's reason, e.g. caller_not_allowed
        self.message = message
        self.reason = {401: "unauthorized", 403: "forbidden", 404: "not_found"}.get(status, "refused")


class CallerTokenUnreadable(BrokerError):
    """Our own projected ServiceAccount token file is missing or empty."""

    reason = "token_file"


def read_caller_token(path: str, missing_hint: str = "") -> str:
    """The caller's projected ServiceAccount token, read anew on every request (the kubelet rotates it)."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except FileNotFoundError:
        raise CallerTokenUnreadable(f"token file {path} does not exist{missing_hint}") from None
    except OSError as e:
        raise CallerTokenUnreadable(f"cannot read token file {path}: {e.strerror}") from None
    if not token:
        raise CallerTokenUnreadable(f"token file {path} is empty")
    return token


def parse_timestamp(text: str) -> datetime:
    """Parses an RFC 3339 timestamp (Z or offset, optional fractions) into an aware datetime."""
    value = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if value.tzinfo is None:
        raise ValueError(f"timestamp {text!r} has no time zone")
    return value


class TargetInfo:
    __slots__ = ("name", "token_ttl_seconds", "audience")

    def __init__(self, name: str, token_ttl_seconds: float, audience: str = ""):
        self.name, self.token_ttl_seconds, self.audience = name, token_ttl_seconds, audience

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TargetInfo) and (self.name, self.token_ttl_seconds, self.audience) == (
            other.name, other.token_ttl_seconds, other.audience)

    def __repr__(self) -> str:
        return f"TargetInfo({self.name!r}, {self.token_ttl_seconds!r}, {self.audience!r})"


class MintedToken:
    """A token the broker minted; `requested_at` is our clock when we asked (see exec_credential.real_expiry)."""

    __slots__ = ("token", "requested_at", "expires_in", "broker_expiration")

    def __init__(self, token: str, requested_at: datetime, expires_in: float, broker_expiration: datetime | None):
        self.token, self.requested_at = token, requested_at
        self.expires_in, self.broker_expiration = expires_in, broker_expiration

    def __repr__(self) -> str:  # never show the token
        return f"MintedToken(expires_in={self.expires_in})"


def refusal(status: int, body: bytes) -> BrokerRefused:
    """The broker's JSON error ({"error", "message"}) of a 4xx answer, as an exception."""
    try:
        data = json.loads(body) if body else {}
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    return BrokerRefused(status, str(data.get("error", "")), redact(str(data.get("message", "")))[:300])


def token_reply(data: object, target: str, requested_at: datetime) -> MintedToken:
    """A 200 answer to POST /v1/targets/{target}/token; BrokerUnavailable when it is not a token reply."""
    try:
        token = data["token"]  # type: ignore[index]
        expires_in = float(data["expiresIn"])  # type: ignore[index]
        if not isinstance(token, str) or not token or expires_in <= 0:
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise BrokerUnavailable(f"the token reply for {target} lacks token/expiresIn") from None
    broker_expiration = None
    if data.get("expirationTimestamp"):  # type: ignore[union-attr]
        try:
            broker_expiration = parse_timestamp(str(data["expirationTimestamp"]))  # type: ignore[index]
        except ValueError:
            pass
    return MintedToken(token, requested_at, expires_in, broker_expiration)


def targets_reply(data: dict) -> list[TargetInfo]:
    """A 200 answer to GET /v1/targets; malformed entries are skipped."""
    targets = []
    for item in data.get("targets") or []:
        try:
            targets.append(TargetInfo(str(item["name"]), float(item.get("tokenTTLSeconds") or 60),
                                      str(item.get("audience", ""))))
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
    return targets
