"""Pure functions for client-go exec credentials: the ExecCredential reply and when to refresh it.

Shared by the agent (credential files) and `keyless token` (stdout). No I/O, and only stdlib imports
that cost nothing at start-up, because `keyless token` runs on every kubectl token refresh.
"""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from ..brokerclient.reply import parse_timestamp

API_VERSION_V1 = "client.authentication.k8s.io/v1"
API_VERSION_V1BETA1 = "client.authentication.k8s.io/v1beta1"
SUPPORTED_API_VERSIONS = (API_VERSION_V1, API_VERSION_V1BETA1)
KIND = "ExecCredential"

# client-go uses a cached credential right up to status.expirationTimestamp and has no early-refresh
# margin of its own, so the timestamp we state is the token's real expiry minus this margin: clock
# skew to the tenant API server and request latency must not turn a "valid" credential into a 401.
MAX_SAFETY_MARGIN_SECONDS = 10.0
SAFETY_MARGIN_FRACTION = 0.2


class UnsupportedApiVersion(ValueError):
    """The exec config asked for an ExecCredential apiVersion we cannot echo."""


def check_api_version(api_version: str) -> str:
    if api_version not in SUPPORTED_API_VERSIONS:
        raise UnsupportedApiVersion(
            f"unsupported ExecCredential apiVersion {api_version!r}; use one of {', '.join(SUPPORTED_API_VERSIONS)}"
        )
    return api_version


def api_version_from_exec_info(exec_info: str | None, default: str = API_VERSION_V1) -> str:
    """The apiVersion to echo, from client-go's KUBERNETES_EXEC_INFO (absent: `default`)."""
    if not exec_info:
        return check_api_version(default)
    try:
        info = json.loads(exec_info)
    except ValueError:
        raise UnsupportedApiVersion("KUBERNETES_EXEC_INFO is not valid JSON") from None
    if not isinstance(info, dict) or not info.get("apiVersion"):
        raise UnsupportedApiVersion("KUBERNETES_EXEC_INFO has no apiVersion")
    return check_api_version(info["apiVersion"])


def safety_margin_seconds(lifetime_seconds: float) -> float:
    """How long before the real expiry the stated expirationTimestamp lies (a fifth, at most 10 s)."""
    return min(MAX_SAFETY_MARGIN_SECONDS, max(0.0, lifetime_seconds) * SAFETY_MARGIN_FRACTION)


def real_expiry(requested_at: datetime, expires_in_seconds: float, broker_expiration: datetime | None) -> datetime:
    """When the token really stops working, seen from this host's clock.

    `requested_at` is our clock when the request was sent, so `requested_at + expiresIn` is never later
    than the truth even if the broker's clock runs ahead; the broker's own timestamp caps it when our
    clock runs ahead. The earlier of the two wins.
    """
    by_lifetime = requested_at + timedelta(seconds=expires_in_seconds)
    if broker_expiration is None:
        return by_lifetime
    return min(by_lifetime, broker_expiration)


def stated_expiry(real_expiry_at: datetime, lifetime_seconds: float) -> datetime:
    """The expirationTimestamp to put in the ExecCredential: real expiry minus the safety margin,
    truncated to whole seconds (RFC 3339 without fractions, rounded towards earlier)."""
    stated = real_expiry_at - timedelta(seconds=safety_margin_seconds(lifetime_seconds))
    return stated.replace(microsecond=0)


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with a Z suffix and whole seconds, as metav1.Time marshals it."""
    if moment.tzinfo is None:
        raise ValueError("timestamp must be timezone-aware")
    return moment.astimezone(timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_exec_credential(token: str, expiration: datetime, api_version: str = API_VERSION_V1) -> dict:
    """The ExecCredential client-go expects back from an exec plugin (apiVersion echoes the config)."""
    check_api_version(api_version)
    if not token:
        raise ValueError("empty token")
    return {
        "apiVersion": api_version,
        "kind": KIND,
        "spec": {},
        "status": {"token": token, "expirationTimestamp": format_timestamp(expiration)},
    }


def credential_expiration(credential: dict) -> datetime:
    """The stated expiry of an ExecCredential dict; ValueError when it is not one."""
    if not isinstance(credential, dict) or credential.get("kind") != KIND:
        raise ValueError("not an ExecCredential")
    status = credential.get("status") or {}
    if not status.get("token") or not status.get("expirationTimestamp"):
        raise ValueError("ExecCredential without token or expirationTimestamp")
    return parse_timestamp(status["expirationTimestamp"])


def refresh_delay_seconds(lifetime_seconds: float, jitter: float) -> float:
    """Seconds after issue to refresh: half the lifetime, moved by `jitter` in [-1, 1] times a fiftieth of it.

    The refresh period stays (nearly) constant, so targets keep the phases spread_refresh_delay_seconds
    gave them; the small jitter keeps two targets from staying locked together forever.
    """
    jitter = max(-1.0, min(1.0, jitter))
    return max(0.0, lifetime_seconds * (0.5 + 0.02 * jitter))


def spread_refresh_delay_seconds(lifetime_seconds: float, draw: float) -> float:
    """Seconds after issue of a target's first refresh in this process (or its first after failures),
    `draw` in [0, 1]: anywhere in a window as wide as the refresh period (a tenth to six tenths of the
    lifetime).

    Targets minted together (an agent starting with thousands of them, or all of them as the broker comes
    back from an outage) would otherwise all come back together every half lifetime; spread over one whole
    period, and refreshed every period after that, they reach the broker as a flat ~N/(lifetime/2) per
    second. The window ends well before the stated expiry (at least eight tenths of the lifetime),
    leaving time for retries.
    """
    draw = max(0.0, min(1.0, draw))
    return max(0.0, lifetime_seconds * (0.1 + 0.5 * draw))
