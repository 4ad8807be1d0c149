"""List, then watch, forever: the one loop behind every in-memory view of API objects (the operator's
informers, the broker's targets and keys, the webhooks' tenant directory).

A watch that ends normally resumes from the last version seen; an expired version (410) re-lists at
once; any other failure re-lists after an exponential back-off with jitter. It never gives up.
"""
from __future__ import annotations

import asyncio
import logging
import random
from typing import Callable

from ..backoff import backoff_delay_seconds
from .client import API_ERRORS, Kube, KubeError

log = logging.getLogger(__name__)


async def list_and_watch(kube: Kube, path: str, on_sync: Callable[[list[dict]], None],
                         on_event: Callable[[str, dict], None], *, label_selector: str | None = None,
                         field_selector: str | None = None, what: str = "objects",
                         retry_seconds: float = 0.5, max_retry_seconds: float = 30.0) -> None:
    """Calls on_sync(items) after every (re-)list and on_event(type, obj) for each change. Runs until cancelled."""
    failures = 0
    while True:
        try:
            listed = await kube.list(path, label_selector=label_selector, field_selector=field_selector)
            on_sync(listed.get("items") or [])
            failures = 0
            version = (listed.get("metadata") or {}).get("resourceVersion")
            while True:
                async for event in kube.watch(path, resource_version=version, label_selector=label_selector,
                                              field_selector=field_selector):
                    kind, obj = event.get("type"), event.get("object") or {}
                    if kind == "ERROR":
                        raise KubeError(obj.get("code", 500), obj.get("reason", ""), obj.get("message", ""))
                    version = (obj.get("metadata") or {}).get("resourceVersion") or version
                    if kind != "BOOKMARK":
                        on_event(kind, obj)
                # The server ended the stream normally: resume from the last version seen.
        except asyncio.CancelledError:
            raise
        except (*API_ERRORS, ValueError) as e:
            if isinstance(e, KubeError) and e.status == 410:
                continue  # the version expired: re-list at once
            failures += 1
            delay = backoff_delay_seconds(failures, random.random(), base=retry_seconds, cap=max_retry_seconds)
            log.info("listing/watching %s failed (%s); re-listing in %.1fs", what, e, delay)
            await asyncio.sleep(delay)
