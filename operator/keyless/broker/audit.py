"""One structured JSON line per minting decision. Holds identities and token ids, never a token."""
from __future__ import annotations

import asyncio
import datetime
import json
import sys
from typing import TextIO

_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode


class AuditLog:
    """Writes lines to a stream; flushes at most every `flush_seconds` so minting is not held up by I/O."""

    def __init__(self, stream: TextIO | None = None, flush_seconds: float = 0.2):
        self.stream = stream or sys.stdout
        self.flush_seconds = flush_seconds
        self._dirty = False

    def decision(self, *, outcome: str, reason: str, status: int, target: str | None, caller: str | None,
                 pod: str | None, jti: str | None = None, expires: int | None = None,
                 remote: str | None = None, endpoint: str | None = None) -> None:
        now = datetime.datetime.now(datetime.timezone.utc)
        record = {"ts": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"), "audit": "token",
                  "outcome": outcome, "reason": reason, "status": status, "target": target,
                  "caller": caller, "pod": pod, "jti": jti,
                  "exp": (datetime.datetime.fromtimestamp(expires, datetime.timezone.utc)
                          .isoformat().replace("+00:00", "Z") if expires else None),
                  "remote": remote, "endpoint": endpoint}
        self.stream.write(_encode(record) + "\n")
        self._dirty = True

    def flush(self) -> None:
        if self._dirty:
            self._dirty = False
            try:
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
