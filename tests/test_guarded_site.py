"""GuardedSite in process: what a slow or hostile client can still cost the broker, the webhooks and
the agent (one aiohttp app, real sockets on loopback, no cluster)."""
from __future__ import annotations

import asyncio
import contextlib
import ssl
import tempfile
from pathlib import Path

import aiohttp
from aiohttp import web

from keyless import pki
from keyless.guarded_site import ConnectionLimits, GuardedSite

HALF_A_HEAD = b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Slow: "


@contextlib.asynccontextmanager
async def serving(limits: ConnectionLimits, ssl_context: ssl.SSLContext | None = None, handler=None):
    """An app answering GET /hello, and POST /echo with its body's length, behind a GuardedSite on a free
    loopback port."""
    async def hello(_: web.Request) -> web.Response:
        return web.Response(text="hello")

    async def echo(request: web.Request) -> web.Response:
        return web.Response(text=str(len(await request.read())))

    app = web.Application()
    app.router.add_get("/hello", handler or hello)
    app.router.add_post("/echo", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = GuardedSite(runner, "127.0.0.1", 0, ssl_context=ssl_context, limits=limits)
    await site.start()
    try:
        yield site
    finally:
        await runner.cleanup()


async def _half_sent(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(HALF_A_HEAD)
    await writer.drain()
    return reader, writer


async def _closed_by_server(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), timeout=20) == b""
    except (ConnectionError, asyncio.TimeoutError):
        return False


def test_a_request_head_that_never_completes_is_closed():
    async def scenario():
        async with serving(ConnectionLimits(head_timeout=0.3)) as site:
            reader, writer = await _half_sent(site.port)
            assert await _closed_by_server(reader)
            assert site.timed_out == 1 and not site.connections
            writer.close()

    asyncio.run(scenario())


def test_at_the_cap_a_newcomer_evicts_the_longest_waiting_connection_and_is_answered():
    async def scenario():
        async with serving(ConnectionLimits(max_connections=4, head_timeout=300)) as site:
            slow = [await _half_sent(site.port) for _ in range(4)]
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{site.port}/hello") as response:
                    assert response.status == 200 and await response.text() == "hello"
            assert await _closed_by_server(slow[0][0]), "the oldest slow connection made room"
            assert site.evicted == 1
            for reader, writer in slow[1:]:
                assert not reader.at_eof()
                writer.close()

    asyncio.run(scenario())


def test_a_flood_from_one_address_evicts_its_own_connections_not_an_older_one_from_elsewhere():
    async def scenario():
        async with serving(ConnectionLimits(max_connections=4, head_timeout=300)) as site:
            quiet = await _half_sent(site.port)  # 127.0.0.1, the oldest
            flood = []
            for _ in range(6):
                reader, writer = await asyncio.open_connection("127.0.0.1", site.port, local_addr=("127.0.0.2", 0))
                writer.write(HALF_A_HEAD)
                await writer.drain()
                flood.append((reader, writer))
            assert all([await _closed_by_server(r) for r, _ in flood[:3]]) and site.evicted == 3
            assert not quiet[0].at_eof() and quiet[0].exception() is None
            for _, writer in [quiet, *flood]:
                writer.close()

    asyncio.run(scenario())


def test_requests_answering_within_their_grace_are_never_evicted_a_newcomer_is_refused_instead():
    async def scenario():
        release = asyncio.Event()

        async def slow_answer(_: web.Request) -> web.Response:
            await release.wait()
            return web.Response(text="late")

        async with serving(ConnectionLimits(max_connections=2, busy_grace=300), handler=slow_answer) as site:
            async with aiohttp.ClientSession() as session:
                url = f"http://127.0.0.1:{site.port}/hello"
                busy = [asyncio.create_task(session.get(url)) for _ in range(2)]
                while len(site.connections) < 2 or any(c.state != c.REQUEST for c in site.connections):
                    await asyncio.sleep(0.01)
                reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
                assert await _closed_by_server(reader) and site.refused == 1 and site.evicted == 0
                writer.close()
                release.set()
                for task in busy:
                    response = await task
                    assert await response.text() == "late"
                    response.release()

    asyncio.run(scenario())


def test_a_request_head_larger_than_allowed_is_closed():
    async def scenario():
        async with serving(ConnectionLimits(max_head_bytes=1024)) as site:
            reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
            writer.write(b"GET /hello HTTP/1.1\r\nX-Big: " + b"a" * 2048)
            await writer.drain()
            assert await _closed_by_server(reader) and site.too_large == 1
            writer.close()

    asyncio.run(scenario())


def test_an_idle_keep_alive_connection_is_closed_and_an_active_one_keeps_being_answered():
    async def scenario():
        async with serving(ConnectionLimits(idle_timeout=0.3)) as site:
            reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
            for _ in range(3):  # several requests on one connection, each answered
                writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
                await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200")
                assert await reader.readexactly(5) == b"hello"
            assert await _closed_by_server(reader)  # then idle: closed
            writer.close()

    asyncio.run(scenario())


def test_tls_clients_are_answered_including_a_request_sent_with_the_end_of_the_handshake():
    ca, _ = pki.new_ca("guarded-site-test")
    certificate = pki.issue_certificate(ca, "localhost", server=True, ip_addresses=("127.0.0.1",))

    async def scenario(tmp_cert, tmp_key):
        server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_context.load_cert_chain(tmp_cert, tmp_key)
        client_context = ssl.create_default_context(cadata=ca.cert_pem.decode())
        async with serving(ConnectionLimits(max_connections=1, head_timeout=300), ssl_context=server_context) as site:
            slow_raw = await asyncio.open_connection("127.0.0.1", site.port)  # never even starts TLS
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context)) as session:
                for _ in range(5):  # TLS 1.3 sends the request right behind the client's Finished
                    async with session.get(f"https://127.0.0.1:{site.port}/hello") as response:
                        assert await response.text() == "hello"
            assert await _closed_by_server(slow_raw[0]) and site.evicted == 1, "the silent connection made room"

    with tempfile.TemporaryDirectory() as directory:
        cert, key = Path(directory) / "tls.crt", Path(directory) / "tls.key"
        cert.write_bytes(certificate.cert_pem)
        key.write_bytes(certificate.key_pem)
        asyncio.run(scenario(str(cert), str(key)))


def test_the_rest_of_a_body_answered_early_is_not_taken_for_the_next_request_head():
    """A body over client_max_size is answered (413) before it has all arrived. The bytes still coming
    are that body, not a next request head: counting them as a head over max_head_bytes reset the
    connection, and the client saw a TLS EOF instead of its 413 (a flaky broker test). A real next head
    over the limit is still closed."""
    async def answer(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=20)
        length = int([line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")][0])
        return head, await reader.readexactly(length)

    def post(payload: bytes) -> bytes:
        return b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload)

    async def scenario():
        async with serving(ConnectionLimits(max_head_bytes=1024)) as site:
            reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
            writer.write(post(b" " * 200_000))  # under aiohttp's 1 MiB client_max_size: read whole
            head, body = await answer(reader)
            assert head.startswith(b"HTTP/1.1 200") and body == b"200000", head
            writer.write(post(b" " * 3_000_000))  # over it: answered before the body has all arrived
            await writer.drain()
            head, _ = await answer(reader)
            assert head.startswith(b"HTTP/1.1 413"), head
            assert site.too_large == 0
            writer.close()

            reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
            writer.write(post(b"abc"))
            head, body = await answer(reader)
            assert head.startswith(b"HTTP/1.1 200") and body == b"3", head
            writer.write(b"GET /hello HTTP/1.1\r\nX-Big: " + b"a" * 2048)
            await writer.drain()
            assert await _closed_by_server(reader) and site.too_large == 1, "a real next head is still bounded"
            writer.close()

    asyncio.run(scenario())
