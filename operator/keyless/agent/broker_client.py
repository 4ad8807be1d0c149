"""The agent's view of the broker HTTP API: list my targets, mint a token for one of them."""
from __future__ import annotations

import json
import ssl
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

import aiohttp

from .exec_credential import parse_timestamp


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
        self.reason = {401: "unauthorized", 403: "forbidden", 404: "not_found"}.get(status, "refused")


class CallerTokenUnreadable(BrokerError):
    """Our own projected ServiceAccount token file is missing or empty."""

    reason = "token_file"


@dataclass(frozen=True)
class TargetInfo:
    name: str
    token_ttl_seconds: float
    audience: str = ""


@dataclass(frozen=True)
class MintedToken:
    token: str
    requested_at: datetime
    expires_in: float
    broker_expiration: datetime | None

    def __repr__(self) -> str:  # never show the token
        return f"MintedToken(expires_in={self.expires_in})"


class BrokerClient:
    """Async client. The caller token file is read on every request: the kubelet rotates it."""

    def __init__(self, broker_url: str, ca_file: str | None, token_file: str | Path, *,
                 timeout: float = 10.0):
        self._base = broker_url.rstrip("/")
        self._ssl = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
        self._token_file = Path(token_file)
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=min(5.0, timeout))
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=16), timeout=self._timeout)
        return self._session

    def _caller_token(self) -> str:
        try:
            token = self._token_file.read_text().strip()
        except OSError as e:
            raise CallerTokenUnreadable(f"cannot read token file {self._token_file}: {e.strerror}") from None
        if not token:
            raise CallerTokenUnreadable(f"token file {self._token_file} is empty")
        return token

    async def _request(self, method: str, path: str) -> dict:
        headers = {"Authorization": f"Bearer {self._caller_token()}", "Accept": "application/json",
                   "User-Agent": "keyless-agent"}
        try:
            async with self._client().request(method, self._base + path, headers=headers,
                                              json={} if method == "POST" else None) as response:
                body = await response.read()
                status = response.status
                retry_after = response.headers.get("Retry-After", "")
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise BrokerUnavailable(f"{method} {path}: {e.__class__.__name__}") from None
        if status >= 500 or status == 429:
            seconds = float(retry_after) if retry_after.isdigit() else None
            raise BrokerUnavailable(f"{method} {path}: HTTP {status}", min(seconds, 60.0) if seconds else None)
        try:
            data = json.loads(body) if body else {}
        except ValueError:
            data = {}
        if status != 200:
            if not isinstance(data, dict):
                data = {}
            raise BrokerRefused(status, str(data.get("error", "")), str(data.get("message", ""))[:300])
        if not isinstance(data, dict):
            raise BrokerUnavailable(f"{method} {path}: reply is not a JSON object")
        return data

    async def ready(self) -> bool:
        """The broker's /readyz: true once it has loaded its keys and its whole target registry."""
        try:
            async with self._client().get(self._base + "/readyz", headers={"User-Agent": "keyless-agent"}) as r:
                await r.read()
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def list_targets(self) -> list[TargetInfo]:
        data = await self._request("GET", "/v1/targets")
        targets = []
        for item in data.get("targets") or []:
            try:
                targets.append(TargetInfo(str(item["name"]), float(item.get("tokenTTLSeconds") or 60),
                                          str(item.get("audience", ""))))
            except (KeyError, TypeError, ValueError):
                continue
        return targets

    async def mint(self, target: str) -> MintedToken:
        requested_at = datetime.now(timezone.utc)
        data = await self._request("POST", f"/v1/targets/{quote(target, safe='')}/token")
        try:
            token = data["token"]
            expires_in = float(data["expiresIn"])
            if not isinstance(token, str) or not token or expires_in <= 0:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise BrokerUnavailable(f"token reply for {target} lacks token/expiresIn") from None
        broker_expiration = None
        if data.get("expirationTimestamp"):
            try:
                broker_expiration = parse_timestamp(str(data["expirationTimestamp"]))
            except ValueError:
                pass
        return MintedToken(token, requested_at, expires_in, broker_expiration)
