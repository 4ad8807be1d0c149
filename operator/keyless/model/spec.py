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

from . import claims, names

# The Argo CD components that dial managed clusters (argocd-values.yaml gives each the agent): the
# application controller, and argocd-server (live manifests, logs, terminal, actions), in the cluster's
# Argo CD namespace. The ApplicationSet controller of Argo CD v3.5 only reads cluster Secrets; list it
# where a generator of yours needs more.
DEFAULT_CALLER_ACCOUNTS = ("argocd-application-controller", "argocd-server")
DEFAULT_ALLOWED_CALLERS = tuple(f"system:serviceaccount:argocd:{a}" for a in DEFAULT_CALLER_ACCOUNTS)


DEFAULT_TTL_SECONDS = 60
DEFAULT_PROXY_NAMESPACE = "kube-oidc-proxy"
DEFAULT_PROXY_REPLICAS = 2


def default_allowed_callers(argocd_namespace: str) -> tuple[str, ...]:
    return tuple(f"system:serviceaccount:{argocd_namespace}:{a}" for a in DEFAULT_CALLER_ACCOUNTS)


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
    shard: int | None = None  # Argo CD controller shard (the cluster Secret's `shard` key)


@dataclass(frozen=True)
class Access:
    username: str
    cluster_role: str
    allowed_callers: tuple[str, ...]
    token_ttl_seconds: int
    audience: str
    groups: tuple[str, ...]
    # (namespace, name) of tenant ServiceAccounts a proxy client may impersonate (Managed mode)
    impersonable_service_accounts: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ProxyService:
    """How the Managed proxy's Service is exposed (spec.proxy.service)."""

    type: str = "ClusterIP"
    cluster_ip: str | None = None
    node_port: int | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Proxy:
    mode: ProxyMode
    namespace: str
    image: str | None
    replicas: int
    hostnames: tuple[str, ...]
    service: ProxyService = field(default_factory=ProxyService)


@dataclass(frozen=True)
class Bootstrap:
    secret_name: str
    secret_key: str
    delete_after_install: bool


@dataclass(frozen=True)
class ClusterProfileRequest:
    """spec.clusterProfile: None fields mean "the operator's default"."""

    enabled: bool | None = None
    namespace: str | None = None


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
    cluster_profile: ClusterProfileRequest = field(default_factory=ClusterProfileRequest)

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


def _proxy_service(raw: Mapping[str, Any]) -> ProxyService:
    return ProxyService(
        type=raw.get("type") or "ClusterIP",
        cluster_ip=raw.get("clusterIP") or None,
        node_port=int(raw["nodePort"]) if raw.get("nodePort") else None,
        annotations={str(k): str(v) for k, v in (raw.get("annotations") or {}).items()},
    )


def parse(obj: Mapping[str, Any]) -> RemoteTenantCluster:
    """Parses a raw RemoteTenantCluster. Raises SpecError, and only SpecError, for anything unusable:
    input the schema could not refuse, and input that skipped the schema (`keyless render`, old objects)."""
    try:
        return _parse(obj)
    except SpecError:
        raise
    except KeyError as e:
        raise SpecError(f"spec is incomplete: the required field {e.args[0]!r} is missing "
                        f"(see `kubectl explain rtc.spec`)") from None
    except (ValueError, TypeError, AttributeError) as e:
        raise SpecError(f"spec is malformed: {e}") from None


def _parse(obj: Mapping[str, Any]) -> RemoteTenantCluster:
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
        shard=int(argocd_raw["shard"]) if argocd_raw.get("shard") is not None else None,
    )
    access_raw = spec.get("access") or {}
    access = Access(
        username=access_raw.get("username") or f"keyless:{tenant}:argocd",
        cluster_role=access_raw["clusterRole"],
        allowed_callers=tuple(access_raw.get("allowedCallers") or default_allowed_callers(argocd.namespace)),
        token_ttl_seconds=int(access_raw.get("tokenTTLSeconds") or DEFAULT_TTL_SECONDS),
        audience=access_raw.get("audience") or names.default_audience(namespace, name),
        groups=tuple(access_raw.get("groups") or ()),
        impersonable_service_accounts=tuple(
            (str(sa["namespace"]), str(sa["name"]))
            for sa in ((access_raw.get("impersonation") or {}).get("serviceAccounts") or ())),
    )
    proxy_raw = spec.get("proxy") or {}
    proxy = Proxy(
        mode=ProxyMode(proxy_raw.get("mode") or ProxyMode.MANAGED.value),
        namespace=proxy_raw.get("namespace") or DEFAULT_PROXY_NAMESPACE,
        image=proxy_raw.get("image"),
        replicas=int(proxy_raw.get("replicas") or DEFAULT_PROXY_REPLICAS),
        hostnames=tuple(proxy_raw.get("hostnames") or ()),
        service=_proxy_service(proxy_raw.get("service") or {}),
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
    if not access.username.startswith(names.username_prefix(tenant)):
        raise SpecError(f"spec.access.username must start with {names.username_prefix(tenant)}, so one tenant's "
                        f"manifest can never name another tenant's identity")
    # The CRD and the admission policy refuse these too; a cluster without that policy still never
    # derives anything from a manifest that names what its namespace does not own.
    problems = claims.ownership_problems(namespace, tenant, access.audience, argocd.project)
    if problems:
        raise SpecError("; ".join(problems))

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
        cluster_profile=ClusterProfileRequest(
            enabled=(spec.get("clusterProfile") or {}).get("enabled"),
            namespace=(spec.get("clusterProfile") or {}).get("namespace") or None),
    )
