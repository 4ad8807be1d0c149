"""The admission webhook's HTTPS server: kopf's aiohttp server with a certificate that is reloaded
in place when its mounted files change, plus /healthz and /readyz.

kopf's own `WebhookServer` restarts the listener when certificate files change (a short window of
refused connections, and a new client config each time). Here the listener stays up: the files are
re-read into the same `ssl.SSLContext`, which every new TLS handshake uses. A Secret volume updates
cert and key together (atomic symlink swap); if a half-written pair fails to load, the old pair
keeps serving and the next check tries again. Connections are bounded like the broker's
(`keyless.guarded_site`): a slow client cannot hold the webhook, which every tenant write waits for.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import ssl
from pathlib import Path
from typing import AsyncIterator, Callable

import aiohttp.web
import kopf

from keyless.guarded_site import ConnectionLimits, GuardedSite

log = logging.getLogger(__name__)


def _digest(paths: list[Path]) -> str:
    # Only a hash is kept in memory, never the key material itself.
    hasher = hashlib.sha256()
    for path in paths:
        hasher.update(path.read_bytes())
        hasher.update(b"\0")
    return hasher.hexdigest()


class ReloadingWebhookServer(kopf.WebhookServer):
    """`settings.admission.server` for kopf: TLS from cert/key files, hot-reloaded.

    `ready` (a callable) drives /readyz, e.g. "the tenant directory has synced".
    `on_start` / `on_stop` (coroutine functions) run with the server, e.g. the directory watch.
    """

    def __init__(self, *, addr: str, port: int, certfile: str | Path, pkeyfile: str | Path,
                 cafile: str | Path | None = None, host: str | None = None,
                 file_check_interval: float = 10.0,
                 ready: Callable[[], bool] = lambda: True,
                 on_start: Callable[[], "asyncio.Future | None"] | None = None,
                 on_stop: Callable[[], "asyncio.Future | None"] | None = None):
        super().__init__(addr=addr, port=port, host=host, certfile=str(certfile), pkeyfile=str(pkeyfile),
                         cafile=str(cafile) if cafile else None, file_check_interval=file_check_interval)
        self._ready = ready
        self._on_start = on_start
        self._on_stop = on_stop
        self.reloads = 0  # how many times new certificate files were loaded

    def _files(self) -> list[Path]:
        return [Path(self.certfile), Path(self.pkeyfile)]  # type: ignore[arg-type]

    def build_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(purpose=ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(self.certfile), str(self.pkeyfile))
        return context

    async def __call__(self, fn) -> AsyncIterator[dict]:  # type: ignore[override]
        async def review(request: aiohttp.web.Request) -> aiohttp.web.Response:
            return await self._serve(fn, request)

        async def healthz(_: aiohttp.web.Request) -> aiohttp.web.Response:
            return aiohttp.web.Response(text="ok")

        async def readyz(_: aiohttp.web.Request) -> aiohttp.web.Response:
            if self._ready():
                return aiohttp.web.Response(text="ok")
            return aiohttp.web.Response(status=503, text="tenant directory not synced yet")

        digest = _digest(self._files())
        context = self.build_context()
        app = aiohttp.web.Application(client_max_size=3 * 1024 * 1024)  # API server's request limit
        app.add_routes([
            aiohttp.web.get("/healthz", healthz),
            aiohttp.web.get("/readyz", readyz),
            aiohttp.web.post("/{id:.*}", review),
        ])
        runner = aiohttp.web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        if self._on_start is not None:
            await self._on_start()
        try:
            # The API server answers well within its webhook timeout (5 s here, 30 s at most).
            site = GuardedSite(runner, self.addr, self.port, ssl_context=context, reuse_address=True,
                               limits=ConnectionLimits(request_timeout=30.0))
            await site.start()
            log.info("Admission webhooks listening on https://%s:%s", self.addr, self.port)
            config: dict = {"url": self._build_url("https", self.host or self.addr or "localhost",
                                                   self.port or 443, "")}
            if self.cafile:
                config["caBundle"] = base64.b64encode(Path(self.cafile).read_bytes()).decode()
            yield config
            while True:
                await asyncio.sleep(self.file_check_interval)
                digest = self._reload_if_changed(context, digest)
        finally:
            if self._on_stop is not None:
                await self._on_stop()
            await runner.cleanup()

    def _reload_if_changed(self, context: ssl.SSLContext, digest: str) -> str:
        try:
            current = _digest(self._files())
        except OSError as e:
            log.warning("Cannot read the webhook certificate files (%s); keeping the loaded ones.", e.strerror)
            return digest
        if current == digest:
            return digest
        try:
            # Try the pair in a throw-away context first, so the live one only ever loads a pair
            # known to match (OpenSSL loads certificate and key in two steps).
            self.build_context()
            context.load_cert_chain(str(self.certfile), str(self.pkeyfile))
        except (ssl.SSLError, OSError) as e:
            log.warning("New webhook certificate files do not load yet (%s); keeping the old pair.",
                        type(e).__name__)
            return digest
        self.reloads += 1
        log.info("Reloaded the webhook serving certificate.")
        return current
