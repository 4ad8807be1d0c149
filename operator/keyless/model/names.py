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
# On a bootstrap kubeconfig Secret: the name of the RemoteTenantCluster (same namespace) that may
# delete it after install. Without it `deleteAfterInstall` deletes nothing (no confused deputy).
ANNOTATION_BOOTSTRAP_FOR = "keyless.dev/bootstrap-for"
# On an Argo CD cluster Secret Keyless did not create (e.g. a static bearer token): the RemoteTenantCluster
# (`<namespace>/<name>`) that may take it over once its own chain is verified. Set by whoever may write
# Secrets in the Argo CD namespace (an admin), never by a tenant: the migration to Keyless without downtime.
ANNOTATION_ADOPT_BY = "keyless.dev/adopt-by"
# Written by `kubectl apply`: a copy of the whole object, i.e. of a static credential too.
ANNOTATION_LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"

FIELD_MANAGER_OPERATOR = "keyless-operator"

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
# Where a caller's projected token (audience keyless-broker) is mounted, in Keyless and Argo CD pods.
DEFAULT_CALLER_TOKEN_FILE = "/var/run/secrets/keyless.dev/broker/token"


def target_name(namespace: str, name: str) -> str:
    """The broker target (and credential file) name of a RemoteTenantCluster: unique per control plane."""
    return f"{namespace}.{name}"


def default_audience(namespace: str, name: str) -> str:
    """The token audience (kube-oidc-proxy --oidc-client-id) unique to one tenant cluster."""
    return f"{audience_prefix(namespace)}{name}"


def audience_prefix(namespace: str) -> str:
    """Every audience of a manifest in `namespace` starts with this. Namespace names hold no ':', and
    a namespace belongs to one tenant, so no two tenants can ever name the same audience."""
    return f"keyless:{namespace}:"


def username_prefix(tenant: str) -> str:
    """Every identity a tenant's tokens carry starts with this (tenant names hold no ':')."""
    return f"keyless:{tenant}:"


def project_of_tenant(project: str, tenant: str) -> bool:
    """A tenant's Argo CD projects are `<tenant>` and `<tenant>.<anything>`: tenant names hold no
    '.', so a project name can belong to one tenant only."""
    return project == tenant or project.startswith(tenant + ".")


def tenant_of_project_name(project: str) -> str:
    """The only tenant that may own this project name (see project_of_tenant)."""
    return project.split(".", 1)[0]


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
