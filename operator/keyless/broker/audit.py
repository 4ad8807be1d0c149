"""One structured JSON line per minting decision. Holds identities and token ids, never a token."""
from __future__ import annotations

import asyncio
import sys
import time
from json.encoder import encode_basestring_ascii as _quote
from typing import TextIO

_seconds_cache: dict[int, str] = {}


def rfc3339(epoch: float, milliseconds: bool = False) -> str:
    """UTC RFC 3339 text; the per-second part is cached because this runs on every mint."""
    second = int(epoch)
    text = _seconds_cache.get(second)
    if text is None:
        if len(_seconds_cache) > 256:
            _seconds_cache.clear()
        text = _seconds_cache[second] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    if milliseconds:
        return f"{text}.{int((epoch - second) * 1000):03d}Z"
    return text + "Z"


def _text(value: str | None) -> str:
    return "null" if value is None else _quote(value)


# Writes to a pipe up to this size are atomic: several broker workers share one stdout (workers.py), and
# a line must never be torn by another worker's write.
PIPE_BUF = 4096


class AuditLog:
    """Collects lines and writes them every `flush_seconds` (minting is not held up by I/O), in writes of
    whole lines of at most PIPE_BUF bytes each."""

    def __init__(self, stream: TextIO | None = None, flush_seconds: float = 0.2):
        self.stream = stream or sys.stdout
        self.flush_seconds = flush_seconds
        self._lines: list[str] = []

    def decision(self, *, outcome: str, reason: str, status: int, target: str | None, caller: str | None,
                 pod: str | None, jti: str | None = None, expires: int | None = None,
                 remote: str | None = None, endpoint: str | None = None) -> None:
        # Hand-built JSON (every value quoted by the json module's own escaper): this runs per mint.
        self._lines.append(
            f'{{"ts":"{rfc3339(time.time(), True)}","audit":"token","outcome":{_text(outcome)},'
            f'"reason":{_text(reason)},"status":{int(status)},"target":{_text(target)},"caller":{_text(caller)},'
            f'"pod":{_text(pod)},"jti":{_text(jti)},"exp":{_text(rfc3339(expires) if expires else None)},'
            f'"remote":{_text(remote)},"endpoint":{_text(endpoint)}}}\n')

    def flush(self) -> None:
        lines, self._lines = self._lines, []
        try:
            for chunk in whole_line_chunks(lines, PIPE_BUF):
                self.stream.write(chunk)
                self.stream.flush()
        except (OSError, ValueError):
            pass

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.flush_seconds)
                self.flush()
        finally:
            self.flush()


def whole_line_chunks(lines: list[str], limit: int):
    """Consecutive lines joined into chunks of at most `limit` bytes (a longer line is a chunk alone)."""
    chunk: list[str] = []
    size = 0
    for line in lines:
        length = len(line.encode()) if not line.isascii() else len(line)
        if chunk and size + length > limit:
            yield "".join(chunk)
            chunk, size = [], 0
        chunk.append(line)
        size += length
    if chunk:
        yield "".join(chunk)
