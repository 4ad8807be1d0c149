"""TokenVerified: mint a real broker token for the target and call the tenant API with it.

Success proves issuer, audience, TLS and RBAC together: the broker signed for this audience, the
tenant side (kube-oidc-proxy or the API server itself) trusts the issuer, the CA Argo CD will use
matches the endpoint, and the token's identity is the one configured.
"""
from __future__ import annotations

import hashlib
import json
import ssl
import time
from dataclasses import dataclass

import aiohttp

from ..model import conditions as c
from ..model.spec import BrokerKind, RemoteTenantCluster

SELF_SUBJECT_REVIEW = "/apis/authentication.k8s.io/v1/selfsubjectreviews"


@dataclass
class _Verdict:
    key: tuple
    at: float
    condition: c.Condition


class Verifier:
    """Keeps the broker client and recent verdicts, so a steady state does not mint every resync."""

    def __init__(self, settings):
        self.settings = settings
        self._broker = None
        self._verdicts: dict[str, _Verdict] = {}
        self._contexts: dict[str, ssl.SSLContext] = {}

    def enabled(self) -> bool:
        return bool(self.settings.broker_url and self.settings.broker_token_file)

    def _broker_client(self):
        if self._broker is None:
            from ..agent.broker_client import BrokerClient

            self._broker = BrokerClient(self.settings.broker_url, self.settings.broker_ca_file,
                                        self.settings.broker_token_file, timeout=10.0)
        return self._broker

    async def close(self) -> None:
        if self._broker is not None:
            await self._broker.close()

    def was_verified(self, ref: str) -> bool:
        """True when the last verification of this cluster succeeded (the proxy path works)."""
        verdict = self._verdicts.get(ref)
        return verdict is not None and verdict.condition.is_true

    def mark_verified_from_status(self, ref: str, key: tuple, condition: c.Condition) -> None:
        self._verdicts.setdefault(ref, _Verdict(key, 0.0, condition))

    def forget(self, ref: str) -> None:
        self._verdicts.pop(ref, None)

    def _ssl(self, ca_pem: bytes | None) -> ssl.SSLContext:
        digest = hashlib.sha256(ca_pem or b"").hexdigest()
        if digest not in self._contexts:
            self._contexts[digest] = (ssl.create_default_context(cadata=ca_pem.decode()) if ca_pem
                                      else ssl.create_default_context())
        return self._contexts[digest]

    async def verify(self, cluster: RemoteTenantCluster, ca_pem: bytes | None, *, force: bool = False) -> c.Condition:
        kind = c.TOKEN_VERIFIED
        if cluster.broker_kind is BrokerKind.OPENUNISON:
            return c.Condition(kind, c.UNKNOWN, "NotVerifiedForOpenUnison",
                               "tokens come from OpenUnison; check its Target and the tenant's trust in its issuer")
        if not self.enabled():
            return c.Condition(kind, c.UNKNOWN, "VerificationDisabled",
                               "the operator runs without --broker-url/--broker-token-file, so it cannot prove the chain")
        key = (cluster.generation, hashlib.sha256(ca_pem or b"").hexdigest(), cluster.server)
        previous = self._verdicts.get(cluster.ref)
        fresh_for = self.settings.verify_seconds if (previous and previous.condition.is_true) else self.settings.retry_seconds
        if not force and previous and previous.key == key and time.monotonic() - previous.at < fresh_for:
            return previous.condition
        condition = await self._verify_now(cluster, ca_pem)
        self._verdicts[cluster.ref] = _Verdict(key, time.monotonic(), condition)
        return condition

    async def _verify_now(self, cluster: RemoteTenantCluster, ca_pem: bytes | None) -> c.Condition:
        from ..agent.broker_client import BrokerError, BrokerRefused

        kind = c.TOKEN_VERIFIED
        try:
            minted = await self._broker_client().mint(cluster.target_name)
        except BrokerRefused as e:
            return c.Condition(kind, c.FALSE, "BrokerRefused",
                               f"the broker refused to mint for target {cluster.target_name} "
                               f"(HTTP {e.status} {e.error}); check that the operator's identity is allowed and "
                               f"the BrokerTarget exists")
        except BrokerError as e:
            return c.Condition(kind, c.FALSE, "BrokerUnavailable", f"cannot reach the broker: {e}")
        timeout = aiohttp.ClientTimeout(total=self.settings.tenant_api_timeout_seconds, connect=5)
        headers = {"Authorization": f"Bearer {minted.token}", "Content-Type": "application/json",
                   "Accept": "application/json", "User-Agent": "keyless-operator-verify"}
        body = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.post(cluster.server + SELF_SUBJECT_REVIEW, data=body, headers=headers,
                                        ssl=self._ssl(ca_pem)) as response:
                    status = response.status
                    text = await response.text()
        except aiohttp.ClientConnectorCertificateError:
            return c.Condition(kind, c.FALSE, "CAMismatch",
                               f"the certificate of {cluster.server} is not signed by the CA Argo CD is given "
                               f"(spec.caData or the operator-issued proxy CA); fix spec.caData or the endpoint's certificate")
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            return c.Condition(kind, c.FALSE, "TenantUnreachable",
                               f"cannot reach {cluster.server} ({e.__class__.__name__}); is the tenant API/proxy up?")
        if status == 401:
            return c.Condition(kind, c.FALSE, "TokenRejected",
                               f"{cluster.server} refused a broker token: it must trust issuer "
                               f"{self.settings.broker_issuer} with audience {cluster.access.audience}")
        if status != 201 and status != 200:
            return c.Condition(kind, c.FALSE, "TenantError", f"{cluster.server} answered HTTP {status} to a SelfSubjectReview")
        try:
            username = json.loads(text)["status"]["userInfo"]["username"]
        except (ValueError, KeyError, TypeError):
            return c.Condition(kind, c.FALSE, "TenantError", f"{cluster.server} gave an unreadable SelfSubjectReview")
        if username != cluster.access.username:
            return c.Condition(kind, c.FALSE, "WrongIdentity",
                               f"{cluster.server} saw the token as {username!r}, not {cluster.access.username!r}; "
                               f"check the username claim mapping (sub, no prefix)")
        return c.Condition(kind, c.TRUE, "Verified",
                           f"a broker token for {cluster.access.audience} reached {cluster.server} as {username}")
