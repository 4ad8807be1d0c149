"""Installation-wide operator settings (from `keyless operator` flags), parsed once."""
from __future__ import annotations

from dataclasses import dataclass, field

from .render.argocd import ExecSettings


@dataclass(frozen=True)
class OperatorSettings:
    argocd_namespaces: tuple[str, ...] = ("argocd",)
    broker_namespace: str = "keyless-system"
    # Where the per-cluster proxy CAs live. Keep it apart from the broker's namespace in production:
    # RBAC cannot exclude one name, so write access there would also let the operator read the
    # broker's signing keys.
    pki_namespace: str = "keyless-system"
    broker_issuer: str = "https://keyless-broker.keyless-system.svc"
    broker_url: str | None = None  # where the operator itself mints verification tokens
    broker_ca_file: str | None = None
    broker_token_file: str | None = None  # the operator's own Pod-bound token for the broker
    exec: ExecSettings = field(default_factory=ExecSettings)
    resync_seconds: float = 60.0
    retry_seconds: float = 5.0
    proxy_image: str = "ghcr.io/tremolosecurity/kube-oidc-proxy:1.0.11"
    tenant_api_timeout_seconds: float = 10.0
    deletion_give_up_seconds: float = 120.0
    verify_seconds: float = 300.0  # how often a verified chain is proven again
    signing_algorithm: str = "ES256"
