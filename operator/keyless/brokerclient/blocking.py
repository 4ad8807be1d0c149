"""One token from the broker with the standard library only, for `keyless token` (it runs on every kubectl
token refresh, so start-up time matters more than anything else here)."""
from __future__ import annotations

import json
import socket
import ssl
from datetime import datetime, timezone
from urllib.parse import urlsplit

from .reply import BrokerError, BrokerUnavailable, MintedToken, refusal, token_path, token_reply

_MAX_REPLY_BYTES = 1 << 20


class BrokerUnreachable(BrokerUnavailable):
    """The connection (or its TLS) failed; the message names the broker, never a token."""


def _http_post(host: str, port: int, path: str, headers: dict[str, str], context: ssl.SSLContext,
               timeout: float) -> tuple[int, bytes]:
    """One HTTP/1.1 POST over TLS with `Connection: close`; returns (status, body).

    Hand-rolled because http.client (with the email package it pulls in) costs more start-up time
    than the whole request.
    """
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Length: 2", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    request = ("\r\n".join(lines) + "\r\n\r\n{}").encode()
    with socket.create_connection((host, port), timeout=timeout) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(request)
            chunks = []
            size = 0
            while size <= _MAX_REPLY_BYTES:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
    reply = b"".join(chunks)
    head, separator, body = reply.partition(b"\r\n\r\n")
    if not separator:
        raise ValueError("not HTTP")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split(" ", 2)[1])
    reply_headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    if "chunked" in reply_headers.get("transfer-encoding", "").lower():
        body = dechunk(body)
    elif "content-length" in reply_headers:
        body = body[: int(reply_headers["content-length"])]
    return status, body


def dechunk(data: bytes) -> bytes:
    """The body of a chunked HTTP/1.1 reply."""
    out = []
    while True:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return b"".join(out)
        out.append(rest[:size])
        data = rest[size + 2:]


def mint(broker_url: str, target: str, caller_token: str, ca_file: str | None, timeout: float) -> MintedToken:
    """POST /v1/targets/{target}/token. Raises BrokerRefused (a 4xx decision), BrokerUnreachable, or
    BrokerError for everything else the user must fix (a bad URL or CA file, a reply that is not HTTP)."""
    url = urlsplit(broker_url)
    if url.scheme != "https" or not url.hostname:
        raise BrokerError(f"--broker-url must be an https:// URL, got {broker_url!r}")
    try:
        context = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
    except (OSError, ssl.SSLError) as e:
        raise BrokerError(f"cannot load broker CA file {ca_file}: {getattr(e, 'strerror', None) or e}") from None
    requested_at = datetime.now(timezone.utc)
    try:
        status, body = _http_post(url.hostname, url.port or 443, url.path.rstrip("/") + token_path(target), {
            "Authorization": f"Bearer {caller_token}", "Content-Type": "application/json",
            "Accept": "application/json", "User-Agent": "keyless-token",
        }, context, timeout)
    except ssl.SSLError as e:
        raise BrokerUnreachable(f"TLS with the broker at {broker_url} failed: {e.reason or e}") from None
    except OSError as e:
        raise BrokerUnreachable(f"cannot reach the broker at {broker_url}: {e.strerror or e.__class__.__name__}") from None
    except (ValueError, IndexError):
        raise BrokerError(f"the broker at {broker_url} sent a malformed HTTP reply") from None
    if status >= 500 or status == 429:
        raise BrokerUnavailable(f"the broker at {broker_url} answered HTTP {status}")
    if status != 200:
        raise refusal(status, body)
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    return token_reply(data, target, requested_at)
