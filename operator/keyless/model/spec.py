"""The RemoteTenantCluster spec as a typed model, parsed once from the raw object, defaults applied.

Defaults live here, not in the CRD schema: schema defaults would be written into the stored object
and show up as drift for a GitOps tool that syncs the manifest.
"""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping

from cryptography import x509

from . import names

DEFAULT_ALLOWED_CALLERS = ("system:serviceaccount:argocd:argocd-application-controller",)
DEFAULT_TTL_SECONDS = 60
DEFAULT_PROXY_NAMESPACE = "kube-oidc-proxy"
DEFAULT_PROXY_REPLICAS = 2


class ProxyMode(str, Enum):
    MANAGED = "Managed"
    EXTERNAL = "External"
    DIRECT = "Direct"


class BrokerKind(str, Enum):
    BUILTIN = "Builtin"
    OPENUNISON = "OpenUnison"


class SpecError(ValueError):
    """The spec is well-formed for the schema but unusable; the message says what to fix."""


@dataclass(frozen=True)
class ArgoCD:
    namespace: str
    cluster_name: str
    project: str
    create_app_project: bool
    labels: Mapping[str, str]


@dataclass(frozen=True)
class Access:
    username: str
    cluster_role: str
    allowed_callers: tuple[str, ...]
    token_ttl_seconds: int
    audience: str
    groups: tuple[str, ...]


@dataclass(frozen=True)
class Proxy:
    mode: ProxyMode
    namespace: str
    image: str | None
    replicas: int
    hostnames: tuple[str, ...]


@dataclass(frozen=True)
class Bootstrap:
    secret_name: str
    secret_key: str
    delete_after_install: bool


@dataclass(frozen=True)
class OpenUnison:
    namespace: str
    idp: str
    host: str

    @property
    def issuer(self) -> str:
        return f"https://{self.host}/auth/idp/{self.idp}"


@dataclass(frozen=True)
class RemoteTenantCluster:
    """One parsed RemoteTenantCluster: identity + spec with every default resolved."""

    namespace: str
    name: str
    uid: str
    generation: int
    creation_timestamp: str
    tenant: str
    server: str
    ca_pem: bytes | None
    argocd: ArgoCD
    access: Access
    proxy: Proxy
    bootstrap: Bootstrap | None
    broker_kind: BrokerKind
    openunison: OpenUnison | None
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def target_name(self) -> str:
        return names.target_name(self.namespace, self.name)

    @property
    def ref(self) -> str:
        return names.owner_ref(self.namespace, self.name)

    @property
    def ca_data(self) -> str | None:
        """base64 of the PEM, as Argo CD's tlsClientConfig.caData wants it."""
        return base64.b64encode(self.ca_pem).decode() if self.ca_pem else None

    def ownership_labels(self) -> dict[str, str]:
        return {
            names.LABEL_MANAGED_BY: names.MANAGED_BY,
            names.LABEL_TENANT: self.tenant,
            names.LABEL_CLUSTER_NAMESPACE: names.dns_label(self.namespace),
            names.LABEL_CLUSTER_NAME: names.dns_label(self.name),
        }

    def ownership_annotations(self) -> dict[str, str]:
        return {names.ANNOTATION_OWNER: self.ref}


def _pem_from_ca_data(value: str) -> bytes:
    try:
        pem = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise SpecError("spec.caData is not valid base64; it must be base64 of a PEM CA bundle") from None
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise SpecError("spec.caData must be base64 of a PEM certificate bundle (no BEGIN CERTIFICATE found)")
    try:
        x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise SpecError("spec.caData holds a PEM block that is not a valid X.509 certificate") from None
    return pem


def parse(obj: Mapping[str, Any]) -> RemoteTenantCluster:
    """Parses a raw RemoteTenantCluster. Raises SpecError for input the schema could not refuse."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    namespace, name = meta.get("namespace", ""), meta.get("name", "")
    tenant = spec["tenant"]

    argocd_raw = spec.get("argocd") or {}
    argocd = ArgoCD(
        namespace=argocd_raw.get("namespace") or "argocd",
        cluster_name=argocd_raw.get("clusterName") or name,
        project=argocd_raw.get("project") or tenant,
        create_app_project=argocd_raw.get("createAppProject", True),
        labels=dict(argocd_raw.get("labels") or {}),
    )
    access_raw = spec.get("access") or {}
    access = Access(
        username=access_raw.get("username") or f"keyless:{tenant}:argocd",
        cluster_role=access_raw["clusterRole"],
        allowed_callers=tuple(access_raw.get("allowedCallers") or DEFAULT_ALLOWED_CALLERS),
        token_ttl_seconds=int(access_raw.get("tokenTTLSeconds") or DEFAULT_TTL_SECONDS),
        audience=access_raw.get("audience") or names.default_audience(namespace, name),
        groups=tuple(access_raw.get("groups") or ()),
    )
    proxy_raw = spec.get("proxy") or {}
    proxy = Proxy(
        mode=ProxyMode(proxy_raw.get("mode") or ProxyMode.MANAGED.value),
        namespace=proxy_raw.get("namespace") or DEFAULT_PROXY_NAMESPACE,
        image=proxy_raw.get("image"),
        replicas=int(proxy_raw.get("replicas") or DEFAULT_PROXY_REPLICAS),
        hostnames=tuple(proxy_raw.get("hostnames") or ()),
    )
    bootstrap_raw = spec.get("bootstrap")
    bootstrap = None
    if bootstrap_raw:
        ref = bootstrap_raw.get("kubeconfigSecretRef") or {}
        bootstrap = Bootstrap(
            secret_name=ref["name"],
            secret_key=ref.get("key") or "kubeconfig",
            delete_after_install=bool(bootstrap_raw.get("deleteAfterInstall", False)),
        )
    broker_raw = spec.get("broker") or {}
    broker_kind = BrokerKind(broker_raw.get("kind") or BrokerKind.BUILTIN.value)
    openunison = None
    if broker_kind is BrokerKind.OPENUNISON:
        ou = broker_raw.get("openUnison") or {}
        openunison = OpenUnison(namespace=ou["namespace"], idp=ou["idp"], host=ou["host"])
    if proxy.mode is ProxyMode.MANAGED and bootstrap is None:
        raise SpecError("spec.bootstrap.kubeconfigSecretRef is required when spec.proxy.mode is Managed")

    return RemoteTenantCluster(
        namespace=namespace,
        name=name,
        uid=meta.get("uid", ""),
        generation=int(meta.get("generation") or 0),
        creation_timestamp=meta.get("creationTimestamp", ""),
        tenant=tenant,
        server=spec["server"],
        ca_pem=_pem_from_ca_data(spec["caData"]) if spec.get("caData") else None,
        argocd=argocd,
        access=access,
        proxy=proxy,
        bootstrap=bootstrap,
        broker_kind=broker_kind,
        openunison=openunison,
        labels=dict(meta.get("labels") or {}),
    )
