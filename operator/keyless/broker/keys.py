"""The broker's key set: rotation policy (pure), storage in a Secret, one writer elected by a Lease.

Every key carries the time it starts to sign. Which key signs is therefore a function of the key
set and the clock, so all replicas that read the same Secret agree without talking to each other.
Only the Lease holder changes the Secret (with optimistic concurrency); the others watch it.
"""
from __future__ import annotations

import asyncio
import base64
import bisect
import json
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass, field

import aiohttp

from ..kube.client import Kube, KubeError, resource_path
from ..kube.lease import try_acquire
from ..kube.watch import list_and_watch
from .signing import SigningKey, TokenSigner, load_private_key_pem, private_key_pem

log = logging.getLogger("keyless.broker.keys")

KEY_SECRET_NAME = "keyless-broker-signing-keys"
KEY_SECRET_LABEL = "keyless.dev/component"
KEY_SECRET_LABEL_VALUE = "broker-signing-keys"
LEASE_NAME = "keyless-broker-key-writer"
SECRET_DATA_KEY = "keys.json"


@dataclass(frozen=True)
class RotationPolicy:
    algorithm: str = "ES256"
    rotation_seconds: float = 86400.0
    # A new key is in the JWKS at least this long before it signs (verifiers cache JWKS).
    prepublish_seconds: float = 3600.0
    # Longest token lifetime the broker issues: a key stays published this long after it last signed.
    max_token_ttl_seconds: float = 3600.0
    # Allowance for clocks of replicas and verifiers that are slightly apart.
    clock_skew_seconds: float = 30.0

    @property
    def effective_prepublish(self) -> float:
        return min(self.prepublish_seconds, self.rotation_seconds)


@dataclass(frozen=True)
class KeySet:
    """Keys sorted by `signing_from`. Immutable: a change makes a new KeySet."""

    keys: tuple[SigningKey, ...] = ()
    _starts: tuple[float, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.keys, key=lambda k: k.signing_from))
        object.__setattr__(self, "keys", ordered)
        object.__setattr__(self, "_starts", tuple(k.signing_from for k in ordered))

    def signing_key(self, now: float) -> SigningKey | None:
        """The key that signs at `now`: the newest whose signing time has come."""
        index = bisect.bisect_right(self._starts, now) - 1
        return self.keys[index] if index >= 0 else None

    def successor(self, key: SigningKey) -> SigningKey | None:
        index = self.keys.index(key)
        return self.keys[index + 1] if index + 1 < len(self.keys) else None

    def signing_until(self, key: SigningKey) -> float | None:
        nxt = self.successor(key)
        return nxt.signing_from if nxt else None

    def jwks(self) -> dict:
        return {"keys": [k.jwk() for k in self.keys]}

    def algorithms(self) -> list[str]:
        return sorted({k.algorithm for k in self.keys})

    # ---- storage format -----------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"version": 1, "keys": [
            {"kid": k.kid, "algorithm": k.algorithm, "publishedAt": k.published_at,
             "signingFrom": k.signing_from, "privateKeyPem": private_key_pem(k.private_key)}
            for k in self.keys]})

    @classmethod
    def from_json(cls, text: str) -> "KeySet":
        data = json.loads(text)
        return cls(tuple(
            SigningKey(k["kid"], k["algorithm"], load_private_key_pem(k["privateKeyPem"]),
                       float(k["publishedAt"]), float(k["signingFrom"]))
            for k in data.get("keys", [])))


def plan_rotation(keys: KeySet, now: float, policy: RotationPolicy, *, force: bool = False) -> KeySet | None:
    """The key set the writer should store at `now`, or None when the stored one is still right.

    - bootstrap: the first key signs at once (nobody can hold an older token), a next key is published;
    - there is always one published key that has not signed yet (the next one);
    - a key is dropped only after max TTL (+ skew) has passed since its successor took over;
    - `force` brings the next key's turn forward, never earlier than its pre-publication allows, and so
      does a shorter rotation period than the one the next key was planned with.
    """
    prepublish = policy.effective_prepublish
    retention = policy.max_token_ttl_seconds + policy.clock_skew_seconds
    current = keys.signing_key(now)
    kept = []
    for key in keys.keys:
        until = keys.signing_until(key)
        if until is not None and until + retention <= now:
            continue  # retired: every token it signed has expired
        kept.append(key)
    changed = len(kept) != len(keys.keys)

    if current is None:
        if not kept:
            first = SigningKey.generate(policy.algorithm, now, now)
            kept.append(first)
            current = first
            changed = True
        # else: keys exist but none signs yet; wait for the earliest.
    future = [k for k in kept if k.signing_from > now]
    # A next key of another algorithm (configuration changed) is replaced; it never signed.
    for key in [k for k in future if k.algorithm != policy.algorithm]:
        kept.remove(key)
        future.remove(key)
        changed = True
    if future:
        # `force` brings the next key's turn forward; so does a rotation period shortened since the next
        # key was planned (a broker restarted with a smaller --key-rotation-seconds keeps its key set).
        nxt = future[0]
        earliest = nxt.published_at + prepublish
        due = max(earliest, now) if force or current is None \
            else max(earliest, now, current.signing_from + policy.rotation_seconds)
        if nxt.signing_from > due:
            kept.remove(nxt)
            future[0] = SigningKey(nxt.kid, nxt.algorithm, nxt.private_key, nxt.published_at, due)
            kept.append(future[0])
            changed = True
    if not future and current is not None:
        signing_from = max(current.signing_from + policy.rotation_seconds, now + prepublish)
        kept.append(SigningKey.generate(policy.algorithm, now, signing_from))
        changed = True
    return KeySet(tuple(kept)) if changed else None


class KeyStore:
    """Keeps `keys` in step with the Secret; when holding the Lease, also writes rotations."""

    def __init__(self, kube: Kube, namespace: str, policy: RotationPolicy, *, identity: str | None = None,
                 lease_seconds: int = 15, tick_seconds: float | None = None, writer: bool = True,
                 clock=time.time):
        self.kube = kube
        # False: only follow the Secret, never compete for the Lease (broker workers 1..N-1 of a pod).
        self.writer = writer
        self.namespace = namespace
        self.policy = policy
        self.identity = identity or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.lease_seconds = lease_seconds
        self.tick_seconds = tick_seconds or max(0.5, min(5.0, policy.effective_prepublish / 4,
                                                         policy.rotation_seconds / 8))
        self.clock = clock
        self.keys = KeySet()
        self.is_writer = False
        self.loaded = asyncio.Event()
        self._resource_version: str | None = None
        self._signer: TokenSigner | None = None
        self._signer_until: float = 0.0
        self._signer_from: float = float("inf")
        self._jwks_json = b'{"keys":[]}'
        self._changed = asyncio.Event()
        self.rotations = 0  # keys that took over signing, as seen by this replica

    @property
    def secret_path(self) -> str:
        return resource_path("v1", "Secret", self.namespace, KEY_SECRET_NAME)

    # ---- the hot path ---------------------------------------------------------------------------
    def signer(self, now: float) -> TokenSigner | None:
        signer = self._signer
        if signer is not None and self._signer_from <= now < self._signer_until:
            return signer
        key = self.keys.signing_key(now)
        if key is None:
            return None
        if signer is None or signer.key.kid != key.kid:
            if signer is not None:
                self.rotations += 1
            self._signer = signer = TokenSigner(key)
        self._signer_from = key.signing_from
        self._signer_until = self.keys.signing_until(key) or float("inf")
        return signer

    @property
    def jwks_json(self) -> bytes:
        return self._jwks_json

    def current_key_age(self) -> float:
        key = self.keys.signing_key(self.clock())
        return self.clock() - key.signing_from if key else 0.0

    # ---- following the Secret -------------------------------------------------------------------
    def _adopt(self, secret: dict | None) -> None:
        if secret is None or secret.get("metadata", {}).get("name") != KEY_SECRET_NAME:
            return
        raw = (secret.get("data") or {}).get(SECRET_DATA_KEY)
        if not raw:
            return
        version = secret["metadata"].get("resourceVersion")
        if version == self._resource_version:
            return
        try:
            keys = KeySet.from_json(base64.b64decode(raw).decode())
        except (ValueError, KeyError) as e:
            log.error("key Secret %s/%s is unreadable (%s); keeping the previous key set",
                      self.namespace, KEY_SECRET_NAME, type(e).__name__)
            return
        self._resource_version = version
        self.keys = keys
        self._signer_until = 0.0  # re-pick the signer on next use
        self._signer_from = float("inf")
        self._jwks_json = json.dumps(keys.jwks(), separators=(",", ":")).encode()
        log.info("key set loaded: %s", ", ".join(f"{k.kid[:8]}@{int(k.signing_from)}" for k in keys.keys))
        if keys.keys:
            self.loaded.set()
        self._changed.set()

    async def _follow(self) -> None:
        path = resource_path("v1", "Secret", self.namespace)
        # By name: RBAC can then limit the broker's list/watch of Secrets to this one.
        selector = f"metadata.name={KEY_SECRET_NAME}"

        def on_sync(items: list[dict]) -> None:
            for item in items:
                self._adopt(item)

        def on_event(kind: str, obj: dict) -> None:
            if kind in ("ADDED", "MODIFIED"):
                self._adopt(obj)
            elif kind == "DELETED" and (obj.get("metadata") or {}).get("name") == KEY_SECRET_NAME:
                # Keep signing with the keys in memory; the writer stores them again.
                log.warning("key Secret %s/%s was deleted; the writer restores it", self.namespace, KEY_SECRET_NAME)
                self._resource_version = None

        await list_and_watch(self.kube, path, on_sync, on_event, field_selector=selector,
                                   what="broker key Secret")

    # ---- writing (Lease holder only) -------------------------------------------------------------
    async def _hold_lease(self) -> bool:
        return await try_acquire(self.kube, self.namespace, LEASE_NAME, self.identity,
                                 lease_seconds=self.lease_seconds, now=self.clock())

    async def _write(self, keys: KeySet) -> None:
        body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": KEY_SECRET_NAME, "namespace": self.namespace,
                             "labels": {KEY_SECRET_LABEL: KEY_SECRET_LABEL_VALUE,
                                        "app.kubernetes.io/managed-by": "keyless"}},
                "data": {SECRET_DATA_KEY: base64.b64encode(keys.to_json().encode()).decode()}}
        try:
            if self._resource_version is None:
                stored = await self.kube.create(resource_path("v1", "Secret", self.namespace), body)
            else:
                body["metadata"]["resourceVersion"] = self._resource_version
                stored = await self.kube.request("PUT", self.secret_path, body=body)
        except KubeError as e:
            if e.status in (404, 409):
                # 409: someone else wrote first; 404: the Secret was deleted (the keys in memory are
                # still the published ones, so the next round writes them back). Re-read, plan again.
                self._resource_version = None
                self._adopt(await self.kube.get(self.secret_path))
                return
            raise
        log.info("key set written (%d keys)", len(keys.keys))
        self._adopt(stored)

    async def step(self, *, force: bool = False) -> None:
        """One writer round: hold the Lease, then store the rotation plan if it differs."""
        self.is_writer = await self._hold_lease()
        if not self.is_writer:
            return
        if self._resource_version is None:
            self._adopt(await self.kube.get(self.secret_path))
        plan = plan_rotation(self.keys, self.clock(), self.policy, force=force)
        if plan is None and self._resource_version is None and self.keys.keys:
            plan = self.keys  # the Secret is gone: store the keys verifiers already trust, not new ones
        if plan is not None:
            await self._write(plan)

    async def run(self) -> None:
        if not self.writer:
            await self._follow()
            return
        follower = asyncio.create_task(self._follow())
        try:
            while True:
                try:
                    await self.step()
                except (KubeError, OSError, asyncio.TimeoutError, aiohttp.ClientError) as e:
                    log.warning("key writer round failed: %s", e)
                await asyncio.sleep(self.tick_seconds if self.is_writer else min(self.tick_seconds, self.lease_seconds / 3))
        finally:
            follower.cancel()
