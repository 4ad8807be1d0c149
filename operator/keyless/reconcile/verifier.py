"""The chain proof behind TokenVerified: mint a real broker token for the target and call the tenant API
with it, as Argo CD will. Verdicts are kept, so a steady state does not mint on every resync.

Success proves issuer, audience, TLS and RBAC together: the broker signed for this audience, the
tenant side (kube-oidc-proxy or the API server itself) trusts the issuer, the CA Argo CD will use
matches the endpoint, and the token's identity is the one configured.
"""
from __future__ import annotations

import hashlib
import ssl
import time
from dataclasses import dataclass

from ..brokerclient.aio import BrokerClient
from ..brokerclient.reply import BrokerError, BrokerRefused
from ..kube import Kube, KubeConfig, KubeError
from ..kube.client import API_ERRORS, UntrustedCertificate
from ..model import conditions as c
from ..model.spec import BrokerKind, RemoteTenantCluster
from ..settings import OperatorSettings


@dataclass
class _Verdict:
    key: tuple
    at: float
    condition: c.Condition


class Verifier:
    """Keeps recent verdicts, so a steady state does not mint every resync."""

    def __init__(self, settings: OperatorSettings, broker: BrokerClient | None):
        self.settings = settings
        self.broker = broker  # None: the operator runs without broker credentials
        self._verdicts: dict[str, _Verdict] = {}
        self._verified_since: dict[str, float] = {}  # ref -> when its current run of successes began
        self._contexts: dict[str, ssl.SSLContext] = {}

    def enabled(self) -> bool:
        return self.broker is not None

    def was_verified(self, ref: str) -> bool:
        """True when the last verification of this cluster succeeded (the proxy path works)."""
        verdict = self._verdicts.get(ref)
        return verdict is not None and verdict.condition.is_true

    def last_verdict(self, ref: str) -> c.Condition | None:
        """The last TokenVerified condition found for this cluster, if any."""
        verdict = self._verdicts.get(ref)
        return verdict.condition if verdict is not None else None

    def verified_for(self, ref: str) -> float:
        """Seconds since this cluster's chain has been proven without a failure in between (0: not verified).
        In memory: after a restart it counts from the first verdict again, which only waits longer."""
        since = self._verified_since.get(ref)
        return 0.0 if since is None else time.monotonic() - since

    def forget(self, ref: str) -> None:
        self._verdicts.pop(ref, None)
        self._verified_since.pop(ref, None)

    def _ssl(self, ca_pem: bytes | None) -> ssl.SSLContext:
        digest = hashlib.sha256(ca_pem or b"").hexdigest()
        if digest not in self._contexts:
            self._contexts[digest] = (ssl.create_default_context(cadata=ca_pem.decode()) if ca_pem
                                      else ssl.create_default_context())
        return self._contexts[digest]

    def tenant_client(self, server: str, ca_pem: bytes | None, token: str, user_agent: str) -> Kube:
        """A client of the tenant endpoint with a broker token, as Argo CD reaches it."""
        return Kube(KubeConfig(server=server, ca_pem=ca_pem, token=token), user_agent=user_agent,
                    timeout=self.settings.tenant_api_timeout_seconds, ssl_context=self._ssl(ca_pem))

    async def verify(self, cluster: RemoteTenantCluster, ca_pem: bytes | None, *, force: bool = False) -> c.Condition:
        kind = c.TOKEN_VERIFIED
        if cluster.broker_kind is BrokerKind.OPENUNISON:
            return c.Condition(kind, c.UNKNOWN, "NotVerifiedForOpenUnison",
                               "tokens come from OpenUnison; check its Target and the tenant's trust in its issuer")
        if self.broker is None:
            return c.Condition(kind, c.UNKNOWN, "VerificationDisabled",
                               "the operator runs without --broker-url/--broker-token-file, so it cannot prove the chain")
        key = (cluster.generation, hashlib.sha256(ca_pem or b"").hexdigest(), cluster.server)
        previous = self._verdicts.get(cluster.ref)
        fresh_for = self.settings.verify_seconds if (previous and previous.condition.is_true) else self.settings.retry_seconds
        if not force and previous and previous.key == key and time.monotonic() - previous.at < fresh_for:
            return previous.condition
        condition = await self._verify_now(self.broker, cluster, ca_pem)
        self._verdicts[cluster.ref] = _Verdict(key, time.monotonic(), condition)
        if condition.is_true:
            self._verified_since.setdefault(cluster.ref, time.monotonic())
        else:
            self._verified_since.pop(cluster.ref, None)
        return condition

    async def _verify_now(self, broker: BrokerClient, cluster: RemoteTenantCluster, ca_pem: bytes | None) -> c.Condition:
        kind = c.TOKEN_VERIFIED
        try:
            minted = await broker.mint(cluster.target_name)
        except BrokerRefused as e:
            return c.Condition(kind, c.FALSE, "BrokerRefused",
                               f"the broker refused to mint for target {cluster.target_name} "
                               f"(HTTP {e.status} {e.error}); check that the operator's identity is allowed and "
                               f"the BrokerTarget exists")
        except BrokerError as e:
            return c.Condition(kind, c.FALSE, "BrokerUnavailable", f"cannot reach the broker: {e}")
        try:
            async with self.tenant_client(cluster.server, ca_pem, minted.token, "keyless-operator-verify") as tenant:
                username = await tenant.who_am_i()
        except UntrustedCertificate:
            return c.Condition(kind, c.FALSE, "CAMismatch",
                               f"the certificate of {cluster.server} is not signed by the CA Argo CD is given "
                               f"(spec.caData or the operator-issued proxy CA); fix spec.caData or the endpoint's certificate")
        except KubeError as e:
            if e.status == 401:
                return c.Condition(kind, c.FALSE, "TokenRejected",
                                   f"{cluster.server} refused a broker token: it must trust issuer "
                                   f"{self.settings.broker_issuer} with audience {cluster.access.audience}")
            return c.Condition(kind, c.FALSE, "TenantError",
                               f"{cluster.server} answered HTTP {e.status} to a SelfSubjectReview")
        except ValueError:
            return c.Condition(kind, c.FALSE, "TenantError", f"{cluster.server} gave an unreadable SelfSubjectReview")
        except API_ERRORS as e:
            return c.Condition(kind, c.FALSE, "TenantUnreachable",
                               f"cannot reach {cluster.server} ({e.__class__.__name__}); is the tenant API/proxy up?")
        if username != cluster.access.username:
            return c.Condition(kind, c.FALSE, "WrongIdentity",
                               f"{cluster.server} saw the token as {username!r}, not {cluster.access.username!r}; "
                               f"check the username claim mapping (sub, no prefix)")
        return c.Condition(kind, c.TRUE, "Verified",
                           f"a broker token for {cluster.access.audience} reached {cluster.server} as {username}")
