"""`keyless token`: the on-demand client-go exec plugin; asks the broker for one target's token.

It runs on every token refresh of kubectl and scripts, so start-up is kept short: only the standard
library, imported when needed (no aiohttp, no kubernetes client). Errors go to stderr with exit code 1
and never carry a token: not the caller's ServiceAccount token, not a minted one.
"""
from __future__ import annotations

import os
import re
import sys

DEFAULT_TOKEN_FILE = "/var/run/secrets/keyless.dev/broker/token"
TOKEN_FILE_ENV = "KEYLESS_TOKEN_FILE"
REQUEST_TIMEOUT_SECONDS = 15.0

# Anything shaped like a JWT (three base64url parts) or a long opaque secret is cut from error text.
_SECRET_LIKE = re.compile(r"[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*|[A-Za-z0-9+/_=-]{64,}")


class TokenCommandError(Exception):
    """A failure the user can act on; the message is safe to print."""


def redact(text: str) -> str:
    return _SECRET_LIKE.sub("[redacted]", text)


def read_caller_token(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except FileNotFoundError:
        raise TokenCommandError(
            f"token file {path} does not exist; pass --token-file (or set {TOKEN_FILE_ENV}) to a projected "
            f"ServiceAccount token with audience keyless-broker") from None
    except OSError as e:
        raise TokenCommandError(f"cannot read token file {path}: {e.strerror}") from None
    if not token:
        raise TokenCommandError(f"token file {path} is empty")
    return token


def _http_post(host: str, port: int, path: str, headers: dict[str, str], context, timeout: float) -> tuple[int, bytes]:
    """One HTTP/1.1 POST over TLS with `Connection: close`; returns (status, body).

    Hand-rolled because http.client (with the email package it pulls in) costs more start-up time
    than the whole request, and this command runs on every kubectl token refresh.
    """
    import socket

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
        raise TokenCommandError("the broker's reply is not HTTP")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(status_line.split(" ", 2)[1])
    except (IndexError, ValueError):
        raise TokenCommandError("the broker's reply is not HTTP") from None
    reply_headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    if "chunked" in reply_headers.get("transfer-encoding", "").lower():
        body = _dechunk(body)
    elif "content-length" in reply_headers:
        body = body[: int(reply_headers["content-length"])]
    return status, body


def _dechunk(data: bytes) -> bytes:
    out = []
    while True:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return b"".join(out)
        out.append(rest[:size])
        data = rest[size + 2:]


_MAX_REPLY_BYTES = 1 << 20


def request_token(broker_url: str, target: str, caller_token: str, ca_file: str | None,
                  timeout: float = REQUEST_TIMEOUT_SECONDS) -> tuple[dict, float]:
    """POST /v1/targets/{target}/token; returns (the broker's JSON reply, our clock when we asked)."""
    import json
    import ssl
    import time
    from urllib.parse import quote, urlsplit

    url = urlsplit(broker_url)
    if url.scheme != "https" or not url.hostname:
        raise TokenCommandError(f"--broker-url must be an https:// URL, got {broker_url!r}")
    try:
        context = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
    except (OSError, ssl.SSLError) as e:
        raise TokenCommandError(f"cannot load broker CA file {ca_file}: {getattr(e, 'strerror', None) or e}") from None
    path = f"{url.path.rstrip('/')}/v1/targets/{quote(target, safe='')}/token"
    requested_at = time.time()
    try:
        status, body = _http_post(url.hostname, url.port or 443, path, {
            "Authorization": f"Bearer {caller_token}", "Content-Type": "application/json",
            "Accept": "application/json", "User-Agent": "keyless-token",
        }, context, timeout)
    except ssl.SSLError as e:
        raise TokenCommandError(f"TLS with the broker at {broker_url} failed: {e.reason or e}") from None
    except OSError as e:
        raise TokenCommandError(f"cannot reach the broker at {broker_url}: {e.strerror or e.__class__.__name__}") from None
    except ValueError:
        raise TokenCommandError(f"the broker at {broker_url} sent a malformed HTTP reply") from None
    if status != 200:
        reason, message = "", ""
        try:
            error = json.loads(body)
            reason, message = str(error.get("error", "")), str(error.get("message", ""))
        except (ValueError, AttributeError):
            pass
        detail = f"{reason}: {message}" if reason or message else "no error details"
        raise TokenCommandError(
            f"the broker refused a token for target {target!r} (HTTP {status}) {redact(detail)[:300]}")
    try:
        reply = json.loads(body)
        if not isinstance(reply.get("token"), str) or not reply["token"]:
            raise ValueError
        float(reply["expiresIn"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise TokenCommandError("the broker's reply is not a token response (token, expiresIn)") from None
    return reply, requested_at


def exec_credential_json(reply: dict, requested_at: float, api_version: str) -> str:
    import json
    from datetime import datetime, timezone

    from keyless.agent.exec_credential import (build_exec_credential, parse_timestamp, real_expiry,
                                               stated_expiry)

    lifetime = float(reply["expiresIn"])
    broker_expiration = None
    if reply.get("expirationTimestamp"):
        try:
            broker_expiration = parse_timestamp(str(reply["expirationTimestamp"]))
        except ValueError:
            broker_expiration = None
    expiry = real_expiry(datetime.fromtimestamp(requested_at, timezone.utc), lifetime, broker_expiration)
    credential = build_exec_credential(reply["token"], stated_expiry(expiry, lifetime), api_version)
    return json.dumps(credential, separators=(",", ":"))


def run(broker_url: str, target: str, ca_file: str | None = None, token_file: str | None = None) -> int:
    from keyless.agent.exec_credential import UnsupportedApiVersion, api_version_from_exec_info

    try:
        api_version = api_version_from_exec_info(os.environ.get("KUBERNETES_EXEC_INFO"))
        caller_token = read_caller_token(token_file or os.environ.get(TOKEN_FILE_ENV) or DEFAULT_TOKEN_FILE)
        reply, requested_at = request_token(broker_url, target, caller_token, ca_file)
        output = exec_credential_json(reply, requested_at, api_version)
    except (TokenCommandError, UnsupportedApiVersion) as e:
        print(f"keyless token: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(output + "\n")
    sys.stdout.flush()
    return 0
