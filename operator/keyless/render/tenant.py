"""Pure rendering of what Keyless installs on a tenant cluster: kube-oidc-proxy (Managed) or the
AuthenticationConfiguration an admin mounts (Direct). No I/O; the reconcile step applies the result."""
from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

import jinja2
import yaml

from ..model.spec import BrokerKind, RemoteTenantCluster, SpecError
from ..settings import DEFAULT_SIGNING_ALGORITHM, SIGNING_ALGORITHMS, OperatorSettings

TEMPLATES = Path(__file__).parent / "templates"

PROXY_NAME = "kube-oidc-proxy"
PROXY_SELECTOR = {"app.kubernetes.io/name": PROXY_NAME}
TLS_SECRET = f"{PROXY_NAME}-tls"
ISSUER_CA_CONFIG_MAP = f"{PROXY_NAME}-issuer-ca"
TLS_DIR = "/etc/kube-oidc-proxy/tls"
ISSUER_CA_DIR = "/etc/kube-oidc-proxy/issuer-ca"
ISSUER_CA_FILE = f"{ISSUER_CA_DIR}/ca.crt"
SECURE_PORT = 8443
# kube-oidc-proxy serves GET /ready on --readiness-probe-port (default 8080); we pass it explicitly.
READINESS_PORT = 8080
TRUST_CHECKSUM_ANNOTATION = "keyless.dev/trust-checksum"

# Every request through the proxy carries this group; the API server adds it too.
AUTHENTICATED_GROUP = "system:authenticated"
# Newer API servers add this extra for tokens with a `jti`; the proxy forwards it when impersonating.
CREDENTIAL_ID_EXTRA = "authentication.kubernetes.io/credential-id"


def _escape_for_yaml(char: str) -> str:
    code = ord(char)
    # YAML folds or refuses these inside a double-quoted scalar; JSON leaves them raw.
    if 0x7F <= code <= 0x9F or code in (0x2028, 0x2029, 0xFEFF, 0xFFFE, 0xFFFF) or 0xD800 <= code <= 0xDFFF:
        return f"\\u{code:04x}"
    return char


def _refuse_undefined(value: Any) -> Any:
    if isinstance(value, jinja2.Undefined):
        str(value)  # StrictUndefined raises jinja2.UndefinedError naming the missing value
    raise TypeError(f"cannot render a {type(value).__name__} into YAML")


def yaml_quote(value: Any) -> str:
    """Any value as a JSON literal, which is valid flow YAML: colons, quotes and newlines stay data.
    Characters beyond the BMP stay raw: YAML would not join JSON's surrogate-pair escapes."""
    text = json.dumps(value, ensure_ascii=False, sort_keys=True, default=_refuse_undefined)
    return "".join(_escape_for_yaml(c) for c in text)


def _combine(left: Mapping[str, Any], right: Mapping[str, Any]) -> dict[str, Any]:
    return {**left, **right}


_environment = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(TEMPLATES)),
    undefined=jinja2.StrictUndefined,
    autoescape=False,
    keep_trailing_newline=True,
)
_environment.filters["yaml_quote"] = yaml_quote
_environment.filters["combine"] = _combine


def render_template_text(template: str, **values: Any) -> str:
    """Renders one template; a value the template needs but was not given raises jinja2.UndefinedError."""
    return _environment.get_template(template).render(**values)


def render_template(template: str, **values: Any) -> list[dict]:
    """Renders one template into its (non-empty) YAML documents."""
    return [d for d in yaml.safe_load_all(render_template_text(template, **values)) if d]


def _check_algorithm(algorithm: str) -> str:
    if algorithm not in SIGNING_ALGORITHMS:
        raise ValueError(f"signing algorithm must be one of {', '.join(SIGNING_ALGORITHMS)}, not {algorithm!r}")
    return algorithm


def _pem_text(pem: bytes | str, what: str) -> str:
    text = pem.decode("ascii") if isinstance(pem, bytes) else pem
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise ValueError(f"{what} must be a PEM certificate bundle")
    return text


def issuer_for(cluster: RemoteTenantCluster, settings: OperatorSettings) -> str:
    """The `iss` of the tokens this cluster receives: the built-in broker's or OpenUnison's."""
    if cluster.broker_kind is BrokerKind.OPENUNISON and cluster.openunison is not None:
        return cluster.openunison.issuer
    return settings.broker_issuer


def proxy_service_hostnames(namespace: str) -> tuple[str, ...]:
    return (f"{PROXY_NAME}.{namespace}.svc", f"{PROXY_NAME}.{namespace}.svc.cluster.local",
            f"{PROXY_NAME}.{namespace}")


def proxy_serving_hostnames(cluster: RemoteTenantCluster) -> tuple[str, ...]:
    """Names the proxy's serving certificate must cover: the server Argo CD dials, the extra
    hostnames of the spec, and the Service's in-cluster names."""
    host = urlsplit(cluster.server).hostname
    names = [host] if host else []
    names += [*cluster.proxy.hostnames, *proxy_service_hostnames(cluster.proxy.namespace)]
    return tuple(dict.fromkeys(names))


def impersonator_role_name(cluster: RemoteTenantCluster) -> str:
    return f"keyless-proxy:{cluster.proxy.namespace}:impersonate"


def access_binding_name(cluster: RemoteTenantCluster) -> str:
    # The role is part of the name: roleRef is immutable, and a new binding must exist before the
    # old one is removed, or a role change through the proxy path would lock the operator out.
    return f"keyless-proxy:{cluster.proxy.namespace}:access:{cluster.access.cluster_role}"


def impersonation_role_name(cluster: RemoteTenantCluster) -> str:
    return f"keyless-proxy:{cluster.proxy.namespace}:impersonate-serviceaccounts"


def impersonable_service_accounts(cluster: RemoteTenantCluster) -> dict[str, list[str]]:
    """spec.access.impersonation.serviceAccounts grouped by namespace, names sorted and unique."""
    grouped: dict[str, set[str]] = {}
    for namespace, name in cluster.access.impersonable_service_accounts:
        grouped.setdefault(namespace, set()).add(name)
    return {namespace: sorted(names_) for namespace, names_ in grouped.items()}


def impersonable_groups(cluster: RemoteTenantCluster) -> list[str]:
    """system:authenticated plus the groups the broker puts into this cluster's tokens; the proxy
    impersonates every group of a token, so a group missing here would fail every request."""
    reserved = sorted(g for g in cluster.access.groups if g.startswith("system:") and g != AUTHENTICATED_GROUP)
    if reserved:
        raise SpecError(f"spec.access.groups may not contain Kubernetes system groups ({', '.join(reserved)}): "
                        "the proxy would be allowed to impersonate them")
    return [AUTHENTICATED_GROUP] + sorted(set(cluster.access.groups) - {AUTHENTICATED_GROUP})


def proxy_args(issuer: str, audience: str, signing_algorithm: str = DEFAULT_SIGNING_ALGORITHM) -> list[str]:
    """kube-oidc-proxy's command line, exactly per DESIGN.md section 4 (no username prefix)."""
    return [
        f"--secure-port={SECURE_PORT}",
        f"--tls-cert-file={TLS_DIR}/tls.crt",
        f"--tls-private-key-file={TLS_DIR}/tls.key",
        f"--oidc-issuer-url={issuer}",
        f"--oidc-client-id={audience}",
        f"--oidc-ca-file={ISSUER_CA_FILE}",
        "--oidc-username-claim=sub",
        "--oidc-groups-claim=groups",
        f"--oidc-signing-algs={_check_algorithm(signing_algorithm)}",
        f"--readiness-probe-port={READINESS_PORT}",
    ]


def trust_checksum(issuer_ca_pem: bytes, serving_cert_pem: bytes) -> str:
    """Changes exactly when the issuer CA or the serving certificate changes; the proxy reads
    --oidc-ca-file only at start, so the pod template carries this to roll the pods."""
    digest = hashlib.sha256()
    for part in (issuer_ca_pem, serving_cert_pem):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def render_tenant_proxy(cluster: RemoteTenantCluster, settings: OperatorSettings, *, serving_cert_pem: bytes,
                        serving_key_pem: bytes, issuer_ca_pem: bytes) -> list[dict]:
    """Every object of a Managed proxy on the tenant cluster, in apply order."""
    namespace = cluster.proxy.namespace
    values = {
        "name": PROXY_NAME,
        "namespace": namespace,
        "labels": cluster.ownership_labels(),
        "annotations": cluster.ownership_annotations(),
        "selector": dict(PROXY_SELECTOR),
        "username": cluster.access.username,
        "cluster_role": cluster.access.cluster_role,
        "impersonable_groups": impersonable_groups(cluster),
        "impersonator_role": impersonator_role_name(cluster),
        "access_binding": access_binding_name(cluster),
        "tls_secret": TLS_SECRET,
        "issuer_ca_config_map": ISSUER_CA_CONFIG_MAP,
        "serving_cert_b64": base64.b64encode(serving_cert_pem).decode(),
        "serving_key_b64": base64.b64encode(serving_key_pem).decode(),
        "issuer_ca_pem": _pem_text(issuer_ca_pem, "the issuer CA"),
        "trust_checksum_annotation": TRUST_CHECKSUM_ANNOTATION,
        "trust_checksum": trust_checksum(issuer_ca_pem, serving_cert_pem),
        "credential_id_resource": f"userextras/{CREDENTIAL_ID_EXTRA}",
        "image": cluster.proxy.image or settings.proxy_image,
        "replicas": cluster.proxy.replicas,
        "service": cluster.proxy.service,
        "impersonable_service_accounts": impersonable_service_accounts(cluster),
        "impersonation_role": impersonation_role_name(cluster),
        "proxy_namespace": namespace,
        "args": proxy_args(issuer_for(cluster, settings), cluster.access.audience, settings.signing_algorithm),
        "secure_port": SECURE_PORT,
        "readiness_port": READINESS_PORT,
        "tls_dir": TLS_DIR,
        "issuer_ca_dir": ISSUER_CA_DIR,
    }
    objects: list[dict] = []
    for template in ("proxy-namespace.yaml.j2", "proxy-rbac.yaml.j2", "proxy-impersonation.yaml.j2",
                     "proxy-trust.yaml.j2", "proxy-deployment.yaml.j2", "proxy-service.yaml.j2"):
        objects.extend(render_template(template, **values))
    return objects


def render_authentication_configuration(issuer: str, audience: str, issuer_ca_pem: bytes | str,
                                        algorithm: str = DEFAULT_SIGNING_ALGORITHM) -> str:
    """Direct mode: a whole AuthenticationConfiguration (apiserver.config.k8s.io/v1) trusting the
    broker for this one cluster's audience, for kube-apiserver --authentication-config."""
    return render_template_text(
        "authentication-configuration.yaml.j2", issuer=issuer, audience=audience,
        issuer_ca_pem=_pem_text(issuer_ca_pem, "the issuer CA"), algorithm=_check_algorithm(algorithm),
    )

