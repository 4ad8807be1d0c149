"""Compare-before-write server-side apply: a steady state costs reads, never writes."""
from __future__ import annotations

import hashlib
import json
from typing import Any

from ..model import names
from .client import Kube, object_path

ANNOTATION_APPLIED_HASH = "keyless.dev/applied-hash"


class OwnershipConflict(Exception):
    """The object exists but belongs to someone else; we must not overwrite it."""

    def __init__(self, kind: str, namespace: str | None, name: str, owner: str | None):
        where = f"{namespace}/{name}" if namespace else name
        who = f"RemoteTenantCluster {owner}" if owner else "something other than Keyless"
        super().__init__(f"{kind} {where} already exists and is owned by {who}")
        self.owner = owner


def intent_hash(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def contains(live: Any, desired: Any) -> bool:
    """True when every field of `desired` has the same value in `live` (live may have more)."""
    if isinstance(desired, dict):
        return isinstance(live, dict) and all(k in live and contains(live[k], v) for k, v in desired.items())
    if isinstance(desired, list):
        return isinstance(live, list) and len(live) == len(desired) and all(map(contains, live, desired))
    return live == desired


def _owned_by(live: dict, owner: str | None) -> bool:
    meta = live.get("metadata") or {}
    if (meta.get("labels") or {}).get(names.LABEL_MANAGED_BY) != names.MANAGED_BY:
        return False
    return owner is None or (meta.get("annotations") or {}).get(names.ANNOTATION_OWNER) == owner


async def apply_if_changed(kube: Kube, desired: dict, field_manager: str, *, owner: str | None = None,
                           check_owner: bool = True) -> str:
    """Applies `desired` unless the live object already matches it.

    Returns "created", "updated" or "unchanged". The hash annotation catches fields we stopped
    wanting (SSA then removes them); the containment check catches anyone else's edits (drift).
    Raises OwnershipConflict for an existing object Keyless does not own (or another owner's).
    """
    desired = json.loads(json.dumps(desired))
    annotations = desired["metadata"].setdefault("annotations", {})
    annotations.pop(ANNOTATION_APPLIED_HASH, None)
    digest = intent_hash(desired)
    annotations[ANNOTATION_APPLIED_HASH] = digest
    live = await kube.get(object_path(desired))
    if live is not None:
        if check_owner and not _owned_by(live, owner):
            meta = live.get("metadata") or {}
            raise OwnershipConflict(desired["kind"], meta.get("namespace"), meta.get("name", ""),
                                    (meta.get("annotations") or {}).get(names.ANNOTATION_OWNER))
        if contains(live, desired):
            return "unchanged"
    await kube.apply(desired, field_manager)
    return "created" if live is None else "updated"


async def delete_if_owned(kube: Kube, api_version: str, kind: str, namespace: str | None, name: str,
                          owner: str | None) -> bool:
    """Deletes an object only if Keyless (and, when given, this owner) created it."""
    from .client import resource_path

    path = resource_path(api_version, kind, namespace, name)
    live = await kube.get(path)
    if live is None or not _owned_by(live, owner):
        return False
    uid = live["metadata"]["uid"]
    return await kube.delete(path, preconditions={"uid": uid})
