"""HTTP(S) listeners a slow or hostile client cannot exhaust: the broker, the webhooks, the agent.

aiohttp accepts every connection and waits for a request head for as long as the client likes, and
each TLS connection holds asyncio's 256 KiB SSL buffer from the moment it is accepted: 1,500
half-sent requests took the broker from 48 to 467 MiB. `GuardedSite` (a drop-in for
`aiohttp.web.TCPSite`) accounts for every connection from accept to close:

- at most `max_connections` at once. One more evicts a connection that waits for a request (an idle
  keep-alive or a slow sender), else one whose request has run longer than `busy_grace`, else it is
  closed at once; among those, one from the address holding the most connections, the longest
  waiting first. A client whose requests complete quickly always gets in, and a flood from a few
  addresses evicts itself rather than the others;
- TLS reads use a 32 KiB buffer per connection (a TLS record is at most 16 KiB), not asyncio's 256 KiB;
- the TLS handshake and the first request head (`\\r\\n\\r\\n`) must arrive within `head_timeout` of
  accept; a later request head within `head_timeout` of its first byte; a head holds at most
  `max_head_bytes`;
- an idle keep-alive connection is closed after `idle_timeout`;
- a request must be answered (the response's first write) within `request_timeout`.

The clock is a deadline per connection, checked by one sweep per site every `tick` (a tenth of the
shortest limit, at most a second): a timer per request cost more than the TLS write of its answer.

Bodies are bounded by each app's `client_max_size`.
"""
from __future__ import annotations

import asyncio
import logging
import re
import ssl
from asyncio import sslproto
from collections import Counter
from dataclasses import dataclass
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

_HEAD_END = b"\r\n\r\n"


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 256
    head_timeout: float = 10.0
    idle_timeout: float = 30.0
    request_timeout: float = 60.0
    max_head_bytes: int = 32768
    busy_grace: float = 1.0


_CONTENT_LENGTH = re.compile(rb"\r\n[ \t]*content-length[ \t]*:([^\r\n]*)", re.IGNORECASE)


def _content_length(head: bytes) -> int:
    """The body length a request head announces (0 when none or malformed: aiohttp refuses those)."""
    found = _CONTENT_LENGTH.search(head)
    if found is None:
        return 0
    value = found.group(1).strip()
    return int(value) if value.isdigit() else 0


class _SmallBufferSSLProtocol(sslproto.SSLProtocol):
    max_size = 32 * 1024  # asyncio reads (and allocates per connection) 256 KiB; a TLS record is <= 16 KiB


async def _start_tls(transport: asyncio.Transport, protocol: asyncio.Protocol, context: ssl.SSLContext,
                     handshake_timeout: float) -> asyncio.Transport:
    """asyncio's loop.start_tls (server side), with the smaller read buffer."""
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    tls = _SmallBufferSSLProtocol(loop, protocol, context, waiter, server_side=True,
                                  ssl_handshake_timeout=handshake_timeout, call_connection_made=False)
    transport.pause_reading()
    transport.set_protocol(tls)
    made = loop.call_soon(tls.connection_made, transport)
    resumed = loop.call_soon(transport.resume_reading)
    try:
        await waiter
    except BaseException:
        transport.close()
        made.cancel()
        resumed.cancel()
        raise
    return tls._app_transport


class _Connection(asyncio.Protocol):
    """Sits between the (TLS) transport and aiohttp's handler and keeps the connection's clock."""

    NEW, HEAD, REQUEST, IDLE = "new", "head", "request", "idle"

    def __init__(self, site: "GuardedSite", raw: asyncio.Transport):
        self.site = site
        self.raw = raw  # the TCP transport: aborting it frees everything, TLS state included
        peer = raw.get_extra_info("peername")
        self.address = peer[0] if isinstance(peer, tuple) and peer else ""
        self.loop = asyncio.get_running_loop()
        self.handler: Any = None
        self.state = self.NEW
        self.since = self.loop.time()  # when the current state began
        self._head = bytearray()  # the request head so far (at most max_head_bytes)
        self._body_left = 0  # bytes of the current request's body (Content-Length) not yet received
        self._early: list[bytes] = []  # decrypted bytes that arrived before aiohttp took over
        self.deadline = self.since + site.limits.head_timeout  # checked by the site's sweep
        self.closed = False

    def eviction_class(self, now: float) -> int | None:
        """0: waits for a request; 1: its request runs past its grace; None: must not be evicted."""
        if self.closed:
            return None
        if self.state != self.REQUEST:
            return 0
        if now - self.since > self.site.limits.busy_grace:
            return 1
        return None

    # ---- the clock ----------------------------------------------------------------------------
    def _enter(self, state: str, seconds: float) -> None:
        self.state, self.since = state, self.loop.time()
        self.deadline = self.since + seconds

    def abort(self) -> None:
        if not self.closed:
            self.raw.abort()

    def response_started(self) -> None:
        if self.state == self.REQUEST:
            self._enter(self.IDLE, self.site.limits.idle_timeout)

    def _watch_head(self, data: bytes) -> bool:
        """Advances the clock on request bytes; False when the head outgrew its limit. The rest of a body
        (Content-Length) is that request's, even after it was answered (a 413 goes out before an oversized
        body has all arrived): only bytes after it can start the next head."""
        if self._body_left:
            skipped = min(self._body_left, len(data))
            self._body_left -= skipped
            data = data[skipped:]
            if not data:
                return True
        if self.state == self.IDLE:
            self._enter(self.HEAD, self.site.limits.head_timeout)
        if self.state in (self.NEW, self.HEAD):
            self.state = self.HEAD if self.state == self.NEW else self.state
            if self._head:
                start = max(0, len(self._head) - len(_HEAD_END) + 1)
                self._head += data
                received = self._head
            else:  # the common case, a whole head in one read: no copy
                start, received = 0, data
            end = received.find(_HEAD_END, start)
            if (len(received) if end < 0 else end + len(_HEAD_END)) > self.site.limits.max_head_bytes:
                return False
            if end < 0 and received is data:
                self._head += data
            if end >= 0:
                head, rest = bytes(received[:end]), bytes(received[end + len(_HEAD_END):])
                self._head = bytearray()
                self._enter(self.REQUEST, self.site.limits.request_timeout)
                self._body_left = _content_length(head)
                return self._watch_head(rest) if rest else True
        return True

    # ---- asyncio.Protocol, forwarded to aiohttp's handler ---------------------------------------
    def attach(self, handler: Any, transport: asyncio.Transport) -> None:
        self.handler = handler
        handler.connection_made(_WatchedTransport(transport, self))
        early, self._early = self._early, []
        for data in early:
            handler.data_received(data)

    def data_received(self, data: bytes) -> None:
        if not self._watch_head(data):
            self.site.too_large += 1
            self.abort()
            return
        if self.handler is None:
            self._early.append(data)  # TLS delivered the request before aiohttp's handler was attached
        else:
            self.handler.data_received(data)

    def eof_received(self):
        return self.handler.eof_received() if self.handler is not None else None

    def pause_writing(self) -> None:
        if self.handler is not None:
            self.handler.pause_writing()

    def resume_writing(self) -> None:
        if self.handler is not None:
            self.handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.site.release(self)
        if self.handler is not None:
            self.handler.connection_lost(exc)


class _WatchedTransport:
    """The transport aiohttp's handler writes to: the first write of a response stops the request
    clock; everything else is the (TLS) transport's own."""

    def __init__(self, inner: asyncio.Transport, connection: _Connection):
        self._inner = inner
        self._connection = connection

    def write(self, data) -> None:
        self._connection.response_started()
        self._inner.write(data)

    def writelines(self, list_of_data) -> None:
        self._connection.response_started()
        self._inner.writelines(list_of_data)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


class _Accepted(asyncio.Protocol):
    """The protocol of a freshly accepted TCP connection: admits it, then hands it to TLS + aiohttp."""

    def __init__(self, site: "GuardedSite"):
        self.site = site
        self.connection: _Connection | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        transport.pause_reading()  # nothing may be read before TLS (or aiohttp) owns the stream
        self.connection = _Connection(self.site, transport)
        if self.site.admit(self.connection):
            self.site.begin(self.connection)

    def data_received(self, data: bytes) -> None:  # only before the hand-over, which paused reading
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        # Only reached when the connection died before TLS or aiohttp took the transport over.
        if self.connection is not None and self.connection.handler is None:
            self.connection.connection_lost(exc)


class GuardedSite(web.TCPSite):
    """`aiohttp.web.TCPSite` with the connection limits above (see the module docstring)."""

    def __init__(self, runner: web.BaseRunner, host: str | None = None, port: int | None = None, *,
                 ssl_context: ssl.SSLContext | None = None, limits: ConnectionLimits = ConnectionLimits(),
                 backlog: int = 128, reuse_address: bool | None = None, reuse_port: bool | None = None):
        super().__init__(runner, host, port, ssl_context=ssl_context, backlog=backlog, reuse_address=reuse_address,
                         reuse_port=reuse_port)
        self.limits = limits
        self.connections: set[_Connection] = set()
        self._handshakes: set[asyncio.Task] = set()
        self.tick = min(1.0, min(limits.head_timeout, limits.idle_timeout, limits.request_timeout) / 10)
        self._sweeper: asyncio.Task | None = None
        # Counters, for metrics and tests.
        self.evicted = 0
        self.refused = 0
        self.timed_out = 0
        self.too_large = 0

    async def start(self) -> None:
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Accepted(self), self._host, self._port,
                                                backlog=self._backlog, reuse_address=self._reuse_address,
                                                reuse_port=self._reuse_port)
        self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port
        self._sweeper = loop.create_task(self._sweep())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        await super().stop()
        for task in list(self._handshakes):
            task.cancel()
        for connection in list(self.connections):
            if connection.handler is None:
                connection.abort()

    async def _sweep(self) -> None:
        """Closes every connection past its deadline (head, request, idle), once per tick."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.tick)
            now = loop.time()
            for connection in [c for c in self.connections if c.deadline <= now]:
                self.timed_out += 1
                connection.deadline = float("inf")  # counted once; its connection_lost follows
                try:
                    connection.abort()
                except Exception:  # the sweep must outlive any one connection
                    log.exception("closing a timed-out connection failed")
                    self.connections.discard(connection)

    # ---- admission ------------------------------------------------------------------------------
    def admit(self, connection: _Connection) -> bool:
        if len(self.connections) >= self.limits.max_connections:
            now = asyncio.get_running_loop().time()
            per_address = Counter(c.address for c in self.connections)
            ranked = [((kind, -per_address[c.address], c.since), c) for c in self.connections
                      if (kind := c.eviction_class(now)) is not None]
            if not ranked:
                self.refused += 1
                connection.closed = True
                connection.raw.abort()
                return False
            _, victim = min(ranked, key=lambda pair: pair[0])
            self.evicted += 1
            victim.abort()
            self.connections.discard(victim)  # its connection_lost follows; do not count it twice
        self.connections.add(connection)
        return True

    def release(self, connection: _Connection) -> None:
        self.connections.discard(connection)

    def begin(self, connection: _Connection) -> None:
        handler = self._runner.server()
        if self._ssl_context is None:
            connection.raw.set_protocol(connection)
            connection.attach(handler, connection.raw)
            connection.raw.resume_reading()
            return
        task = asyncio.get_running_loop().create_task(self._start_tls(connection, handler))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _start_tls(self, connection: _Connection, handler: Any) -> None:
        try:
            transport = await _start_tls(connection.raw, connection, self._ssl_context, self.limits.head_timeout)
        except (OSError, ssl.SSLError, ConnectionError, asyncio.TimeoutError, asyncio.CancelledError):
            connection.abort()
            connection.connection_lost(None)
            return
        if connection.closed or transport is None:
            return
        connection.attach(handler, transport)
