"""The asyncio client of the broker (aiohttp): list my targets, mint a token for one of them.
Used by the agent, the operator (verification, the proxy path to a tenant) and `keyless doctor`."""
from __future__ import annotations

import json
import ssl
from datetime import datetime, timezone
from pathlib import Path

import aiohttp

from .reply import (TARGETS_PATH, BrokerUnavailable, MintedToken, TargetInfo, read_caller_token, refusal,
                    targets_reply, token_path, token_reply)


class BrokerClient:
    """The caller token file is read on every request: the kubelet rotates it."""

    def __init__(self, broker_url: str, ca_file: str | None, token_file: str | Path, *,
                 timeout: float = 10.0, user_agent: str = "keyless"):
        self._base = broker_url.rstrip("/")
        self._ssl = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
        self._token_file = str(token_file)
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=min(5.0, timeout))
        self._user_agent = user_agent
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

    async def _request(self, method: str, path: str) -> dict:
        headers = {"Authorization": f"Bearer {read_caller_token(self._token_file)}", "Accept": "application/json",
                   "User-Agent": self._user_agent}
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
        if status != 200:
            raise refusal(status, body)
        try:
            data = json.loads(body) if body else {}
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise BrokerUnavailable(f"{method} {path}: reply is not a JSON object")
        return data

    async def ready(self) -> bool:
        """The broker's /readyz: true once it has loaded its keys and its whole target registry."""
        try:
            async with self._client().get(self._base + "/readyz", headers={"User-Agent": self._user_agent}) as r:
                await r.read()
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def list_targets(self) -> list[TargetInfo]:
        return targets_reply(await self._request("GET", TARGETS_PATH))

    async def mint(self, target: str) -> MintedToken:
        requested_at = datetime.now(timezone.utc)
        return token_reply(await self._request("POST", token_path(target)), target, requested_at)
