"""List-then-watch loop (a tiny informer) that survives expired resource versions and dropped streams."""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

import aiohttp

from ..kube.client import Kube, KubeError

log = logging.getLogger("keyless.broker.watch")


async def list_and_watch(kube: Kube, path: str, on_sync: Callable[[list[dict]], None],
                         on_event: Callable[[str, dict], None], *, label_selector: str | None = None,
                         field_selector: str | None = None,
                         what: str = "objects", retry_seconds: float = 1.0) -> None:
    """Calls on_sync(items) after every (re-)list and on_event(type, obj) for each change. Runs forever."""
    while True:
        try:
            listed = await kube.list(path, label_selector=label_selector, field_selector=field_selector)
            on_sync(listed.get("items") or [])
            version = (listed.get("metadata") or {}).get("resourceVersion")
            while True:
                expired = False
                async for event in kube.watch(path, resource_version=version, label_selector=label_selector,
                                              field_selector=field_selector):
                    kind, obj = event.get("type"), event.get("object") or {}
                    if kind == "ERROR":
                        expired = obj.get("code") == 410
                        if not expired:
                            log.warning("watch of %s reported an error: %s", what, obj.get("message"))
                        break
                    version = (obj.get("metadata") or {}).get("resourceVersion") or version
                    if kind != "BOOKMARK":
                        on_event(kind, obj)
                if expired:
                    break  # re-list
                # The server ended the stream normally: resume from the last version seen.
        except asyncio.CancelledError:
            raise
        except (KubeError, OSError, asyncio.TimeoutError, aiohttp.ClientError, ValueError) as e:
            log.warning("listing/watching %s failed (%s); retrying", what, e)
            await asyncio.sleep(retry_seconds)
