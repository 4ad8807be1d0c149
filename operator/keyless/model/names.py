"""Names, labels and annotations shared by the operator, broker, agent and webhooks.

These strings are an API between components (and with Argo CD): change them only with care.
"""
from __future__ import annotations

import hashlib
import re

GROUP = "keyless.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Labels on everything Keyless creates.
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "keyless"
LABEL_TENANT = "keyless.dev/tenant"
LABEL_CLUSTER_NAMESPACE = "keyless.dev/cluster-namespace"
LABEL_CLUSTER_NAME = "keyless.dev/cluster-name"
# Full owner reference for cross-namespace children (owner references cannot cross namespaces).
ANNOTATION_OWNER = "keyless.dev/owner"

FIELD_MANAGER_OPERATOR = "keyless-operator"
FIELD_MANAGER_BROKER = "keyless-broker"

# Argo CD's own keys.
ARGOCD_SECRET_TYPE_LABEL = "argocd.argoproj.io/secret-type"
# Never copied from a RemoteTenantCluster onto what Keyless creates: Argo CD would claim or prune it.
ARGOCD_TRACKING_KEYS = frozenset({
    "app.kubernetes.io/instance",
    "argocd.argoproj.io/tracking-id",
    "argocd.argoproj.io/installation-id",
    "kubectl.kubernetes.io/last-applied-configuration",
})

DEFAULT_CALLER_AUDIENCE = "keyless-broker"


def target_name(namespace: str, name: str) -> str:
    """The broker target (and credential file) name of a RemoteTenantCluster: unique per control plane."""
    return f"{namespace}.{name}"


def default_audience(namespace: str, name: str) -> str:
    """The token audience (kube-oidc-proxy --oidc-client-id) unique to one tenant cluster."""
    return f"keyless:{namespace}:{name}"


def owner_ref(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


_DNS_LABEL_UNSAFE = re.compile(r"[^a-z0-9-]+")


def dns_label(*parts: str, max_length: int = 63) -> str:
    """A DNS-1123 label built from parts; long names keep a hash suffix so they stay unique."""
    raw = "-".join(parts).lower()
    label = _DNS_LABEL_UNSAFE.sub("-", raw).strip("-")
    if len(label) > max_length:
        digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
        label = label[: max_length - 9].rstrip("-") + "-" + digest
    return label
