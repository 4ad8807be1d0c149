"""A small asyncio Kubernetes client over aiohttp: get/list/watch, server-side apply, delete.

Why not the `kubernetes` package here: it is synchronous (a thread per call) and heavy; the
operator and broker make many small calls and must stay small in memory at 1,000 tenants.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator
from urllib.parse import quote, urlencode

import aiohttp
import yaml

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")

# kind -> (plural, namespaced). Only the kinds Keyless touches.
_RESOURCES: dict[str, tuple[str, bool]] = {
    "Namespace": ("namespaces", False),
    "Secret": ("secrets", True),
    "ConfigMap": ("configmaps", True),
    "ServiceAccount": ("serviceaccounts", True),
    "Service": ("services", True),
    "Pod": ("pods", True),
    "Event": ("events", True),
    "Deployment": ("deployments", True),
    "PodDisruptionBudget": ("poddisruptionbudgets", True),
    "ClusterRole": ("clusterroles", False),
    "ClusterRoleBinding": ("clusterrolebindings", False),
    "Role": ("roles", True),
    "RoleBinding": ("rolebindings", True),
    "Lease": ("leases", True),
    "TokenReview": ("tokenreviews", False),
    "SelfSubjectReview": ("selfsubjectreviews", False),
    "CustomResourceDefinition": ("customresourcedefinitions", False),
    "AppProject": ("appprojects", True),
    "Application": ("applications", True),
    "ApplicationSet": ("applicationsets", True),
    "RemoteTenantCluster": ("remotetenantclusters", True),
    "BrokerTarget": ("brokertargets", True),
    "Target": ("targets", True),
    "ClusterProfile": ("clusterprofiles", True),
    "ValidatingWebhookConfiguration": ("validatingwebhookconfigurations", False),
    "MutatingWebhookConfiguration": ("mutatingwebhookconfigurations", False),
}


def resource_path(api_version: str, kind: str, namespace: str | None = None, name: str | None = None,
                  subresource: str | None = None) -> str:
    plural, namespaced = _RESOURCES[kind]
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if namespaced and namespace:
        base += f"/namespaces/{quote(namespace)}"
    path = f"{base}/{plural}"
    if name:
        path += f"/{quote(name)}"
    if subresource:
        path += f"/{subresource}"
    return path


def object_path(obj: dict, subresource: str | None = None) -> str:
    meta = obj["metadata"]
    return resource_path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"], subresource)


class UntrustedCertificate(ConnectionError):
    """The server's certificate is not signed by the CA we were given (or the system's)."""


class KubeError(Exception):
    """An API error. The message holds only the server's status text, never request bodies."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


@dataclass
class KubeConfig:
    server: str
    ca_pem: bytes | None = None
    client_cert_pem: bytes | None = None
    client_key_pem: bytes | None = None
    token: str | None = None
    token_file: Path | None = None
    insecure: bool = False

    def __repr__(self) -> str:  # never show credentials
        return f"KubeConfig(server={self.server!r})"

    @classmethod
    def from_kubeconfig(cls, path: str | os.PathLike, context: str | None = None) -> "KubeConfig":
        return cls.from_kubeconfig_dict(yaml.safe_load(Path(path).read_text()), context, Path(path).parent)

    @classmethod
    def from_kubeconfig_dict(cls, data: dict, context: str | None = None,
                             relative_to: Path | None = None, *, untrusted: bool = False) -> "KubeConfig":
        """Reads a kubeconfig. `untrusted` (a kubeconfig someone else wrote, e.g. a bootstrap Secret):
        only inline credentials and verified TLS, so it cannot make us read our own files (a token
        file, a key) and send them to a server of its choosing."""
        if not isinstance(data, dict) or not data.get("contexts"):
            raise ValueError("kubeconfig has no contexts")
        context_name = context or data.get("current-context") or data["contexts"][0]["name"]
        ctx = next((c["context"] for c in data["contexts"] if c["name"] == context_name), None)
        if ctx is None:
            raise ValueError(f"kubeconfig has no context named {context_name!r}")
        cluster = next((c["cluster"] for c in data.get("clusters", []) if c["name"] == ctx["cluster"]), None)
        user = next((u["user"] for u in data.get("users", []) if u["name"] == ctx.get("user")), {}) or {}
        if cluster is None or "server" not in cluster:
            raise ValueError(f"kubeconfig context {context_name!r} names no usable cluster")
        if untrusted:
            refused = [k for k in ("certificate-authority", "insecure-skip-tls-verify", "proxy-url") if cluster.get(k)]
            refused += [k for k in ("client-certificate", "client-key", "tokenFile", "exec", "auth-provider",
                                    "as", "as-groups", "username", "password") if user.get(k)]
            if refused:
                raise ValueError(f"kubeconfig uses {', '.join(refused)}; only inline *-data credentials, a token "
                                 f"and verified TLS are accepted here")
            if not str(cluster["server"]).startswith("https://"):
                raise ValueError("kubeconfig server must be https")

        def blob(section: dict, key: str) -> bytes | None:
            if section.get(f"{key}-data"):
                return base64.b64decode(section[f"{key}-data"])
            if section.get(key):
                p = Path(section[key])
                if relative_to and not p.is_absolute():
                    p = relative_to / p
                return p.read_bytes()
            return None

        return cls(
            server=cluster["server"].rstrip("/"),
            ca_pem=blob(cluster, "certificate-authority"),
            client_cert_pem=blob(user, "client-certificate"),
            client_key_pem=blob(user, "client-key"),
            token=user.get("token"),
            token_file=Path(user["tokenFile"]) if user.get("tokenFile") else None,
            insecure=bool(cluster.get("insecure-skip-tls-verify")),
        )

    @classmethod
    def in_cluster(cls) -> "KubeConfig":
        host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
        if ":" in host:
            host = f"[{host}]"
        return cls(server=f"https://{host}:{port}", ca_pem=(SERVICE_ACCOUNT_DIR / "ca.crt").read_bytes(),
                   token_file=SERVICE_ACCOUNT_DIR / "token")

    @classmethod
    def default(cls, kubeconfig: str | None = None) -> "KubeConfig":
        """--kubeconfig, then $KUBECONFIG, then the in-cluster ServiceAccount."""
        path = kubeconfig or os.environ.get("KUBECONFIG")
        if path:
            return cls.from_kubeconfig(path)
        return cls.in_cluster()

    def ssl_context(self) -> ssl.SSLContext | bool:
        if self.insecure:
            return False
        context = ssl.create_default_context()
        if self.ca_pem:
            context = ssl.create_default_context(cadata=self.ca_pem.decode())
        if self.client_cert_pem and self.client_key_pem:
            # ssl only loads key material from files: use a private, immediately removed temp dir.
            with tempfile.TemporaryDirectory(prefix="keyless-tls-") as d:
                cert, key = Path(d) / "c", Path(d) / "k"
                cert.write_bytes(self.client_cert_pem)
                key.touch(mode=0o600)
                key.write_bytes(self.client_key_pem)
                context.load_cert_chain(str(cert), str(key))
        return context


class Kube:
    """Async API client. One aiohttp session per instance; close() when done."""

    def __init__(self, config: KubeConfig, *, user_agent: str = "keyless", timeout: float = 30.0,
                 connections: int = 50, ssl_context: ssl.SSLContext | None = None):
        self.config = config
        self._user_agent = user_agent
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None
        # A caller that talks to many servers of one CA may share one context (building one costs).
        self._ssl = ssl_context or config.ssl_context()
        self._token_cache: tuple[float, str] | None = None
        self.requests = 0  # total requests sent; tests and benchmarks read it

    async def __aenter__(self) -> "Kube":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _bearer(self) -> str | None:
        if self.config.token_file:
            # Projected tokens are rotated by the kubelet: re-read when the file changes.
            mtime = self.config.token_file.stat().st_mtime
            if not self._token_cache or self._token_cache[0] != mtime:
                self._token_cache = (mtime, self.config.token_file.read_text().strip())
            return self._token_cache[1]
        return self.config.token

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=self._connections),
                timeout=self._timeout,
            )
        return self._session

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {"User-Agent": self._user_agent, "Accept": "application/json"}
        token = self._bearer()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    async def request(self, method: str, path: str, *, params: dict | None = None, body: Any = None,
                      content_type: str = "application/json", timeout: float | None = None) -> dict:
        url = self.config.server + path
        if params:
            url += "?" + urlencode({k: v for k, v in params.items() if v is not None})
        data = None if body is None else json.dumps(body)
        self.requests += 1
        kwargs = {}
        if timeout is not None:
            kwargs["timeout"] = aiohttp.ClientTimeout(total=timeout)
        try:
            async with self._client().request(
                method, url, data=data, headers=self._headers(content_type if body is not None else None), **kwargs
            ) as response:
                text = await response.text()
                if response.status >= 400:
                    raise _error(response.status, text)
                return json.loads(text) if text else {}
        except aiohttp.ClientConnectorCertificateError as e:
            raise UntrustedCertificate(f"the certificate of {self.config.server} is not trusted: "
                                       f"{e.certificate_error}") from None

    async def get(self, path: str, **kwargs) -> dict | None:
        """The object, or None when it does not exist."""
        try:
            return await self.request("GET", path, **kwargs)
        except KubeError as e:
            if e.status == 404:
                return None
            raise

    async def list(self, path: str, label_selector: str | None = None, field_selector: str | None = None) -> dict:
        return await self.request("GET", path, params={"labelSelector": label_selector, "fieldSelector": field_selector})

    async def create(self, path: str, body: dict, **kwargs) -> dict:
        return await self.request("POST", path, body=body, **kwargs)

    async def apply(self, obj: dict, field_manager: str, *, force: bool = True, subresource: str | None = None,
                    dry_run: bool = False) -> dict:
        """Server-side apply of a full intent object."""
        params = {"fieldManager": field_manager, "force": "true" if force else None,
                  "dryRun": "All" if dry_run else None}
        return await self.request("PATCH", object_path(obj, subresource), params=params, body=obj,
                                  content_type="application/apply-patch+yaml")

    async def merge_patch(self, path: str, patch: dict, field_manager: str | None = None) -> dict:
        return await self.request("PATCH", path, params={"fieldManager": field_manager}, body=patch,
                                  content_type="application/merge-patch+json")

    async def json_patch(self, path: str, ops: list, field_manager: str | None = None) -> dict:
        return await self.request("PATCH", path, params={"fieldManager": field_manager}, body=ops,
                                  content_type="application/json-patch+json")

    async def delete(self, path: str, *, preconditions: dict | None = None,
                     propagation: str | None = "Background") -> bool:
        """Deletes; False when it was already gone."""
        body: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if propagation:
            body["propagationPolicy"] = propagation
        if preconditions:
            body["preconditions"] = preconditions
        try:
            await self.request("DELETE", path, body=body)
            return True
        except KubeError as e:
            if e.status == 404:
                return False
            raise

    async def who_am_i(self) -> str:
        """The username the server sees for our credentials (a SelfSubjectReview): with a broker token,
        proof that the server trusts the broker's issuer for that audience and maps `sub` as configured."""
        answer = await self.create(resource_path("authentication.k8s.io/v1", "SelfSubjectReview"),
                                   {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
        try:
            return str(answer["status"]["userInfo"]["username"])
        except (KeyError, TypeError):
            raise ValueError("the SelfSubjectReview answer holds no username") from None

    async def watch(self, path: str, resource_version: str | None = None, label_selector: str | None = None,
                    timeout_seconds: int = 300, field_selector: str | None = None) -> AsyncIterator[dict]:
        """Yields watch events until the server closes the stream. Callers re-list on 410."""
        params = {"watch": "true", "resourceVersion": resource_version, "labelSelector": label_selector,
                  "fieldSelector": field_selector,
                  "timeoutSeconds": str(timeout_seconds), "allowWatchBookmarks": "true"}
        url = self.config.server + path + "?" + urlencode({k: v for k, v in params.items() if v is not None})
        self.requests += 1
        async with self._client().get(url, headers=self._headers(),
                                      timeout=aiohttp.ClientTimeout(total=None, sock_read=timeout_seconds + 30)) as r:
            if r.status >= 400:
                raise _error(r.status, await r.text())
            async for line in r.content:
                if line.strip():
                    yield json.loads(line)


# What a call to an API server can fail with, short of a bug: report, never crash. Whether trying again
# can help is the caller's decision (reconcile/errors.py: a 403 or 422 will not change by itself).
API_ERRORS = (KubeError, OSError, TimeoutError, aiohttp.ClientError)


def _error(status: int, text: str) -> KubeError:
    try:
        body = json.loads(text)
        return KubeError(status, body.get("reason", ""), body.get("message", ""))
    except (ValueError, AttributeError):
        return KubeError(status, "", text[:200])


async def wait_for(predicate, timeout: float, interval: float = 0.2):
    """Polls an async predicate until truthy (helper for callers that must not hang)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            return value
        await asyncio.sleep(interval)
