"""Tenant clusters for the end-to-end harness: what the platform admin declares, and the tenant side that
trusts the broker, by proxy mode: Managed (the operator installs kube-oidc-proxy, which runs as Pods on
the tenant's real node) or Direct (the API server trusts the broker itself).
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..model import names
from ..render.tenant import render_authentication_configuration
from .cluster import LocalCluster

# What Argo CD's identity may do on a tenant: read what it deploys and watches, write namespaces and
# ConfigMaps; no Secrets (Argo CD skips what it may not list with resource.respectRBAC=normal).
DEPLOYER_ROLE = "keyless-deployer"
DEPLOYER_RULES = [
    {"apiGroups": [""], "resources": ["namespaces", "configmaps", "services", "serviceaccounts", "events", "pods"],
     "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["apps"], "resources": ["deployments", "replicasets"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["namespaces", "configmaps"], "verbs": ["create", "update", "patch", "delete"]},
]

# Every request except the admin's own (the harness reads with it), at Metadata level: who did what,
# the response code, and the token's credential id (user.extra) for JWTs.
AUDIT_POLICY = """apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: None
  users: [keyless-admin, system:apiserver]
- level: Metadata
"""
CREDENTIAL_ID_EXTRA = "authentication.kubernetes.io/credential-id"


@dataclass(frozen=True)
class TenantCluster:
    """One RemoteTenantCluster as the platform admin declares it (manifest namespace = the tenant)."""

    tenant: str
    name: str
    environment: str = "development"
    token_ttl_seconds: int = 60

    @property
    def namespace(self) -> str:
        return self.tenant

    @property
    def username(self) -> str:
        return f"keyless:{self.tenant}:argocd"

    @property
    def audience(self) -> str:
        return names.default_audience(self.namespace, self.name)

    @property
    def target(self) -> str:
        return names.target_name(self.namespace, self.name)

    @property
    def argocd_secret_name(self) -> str:
        return names.dns_label("keyless", self.namespace, self.name)

    def manifest(self, tenant_side_fields: dict) -> dict:
        spec = {"tenant": self.tenant,
                "argocd": {"labels": {"environment": self.environment}},
                "access": {"clusterRole": DEPLOYER_ROLE, "tokenTTLSeconds": self.token_ttl_seconds}}
        for key, value in tenant_side_fields.items():
            spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
        return {"apiVersion": names.API_VERSION, "kind": "RemoteTenantCluster",
                "metadata": {"name": self.name, "namespace": self.namespace}, "spec": spec}


@dataclass
class DirectTenant:
    """A tenant kube-apiserver that trusts the broker for exactly this cluster's audience, with the
    AuthenticationConfiguration the operator renders for Direct mode, and an audit log."""

    spec: TenantCluster
    base_dir: Path
    issuer: str
    issuer_ca_pem: bytes
    proxy_mode: str = field(default="Direct", init=False)

    def __post_init__(self) -> None:
        self.cluster = LocalCluster(
            self.spec.name, Path(self.base_dir), controller_manager=False,
            authentication_config=render_authentication_configuration(self.issuer, self.spec.audience,
                                                                      self.issuer_ca_pem),
            files={"audit/policy.yaml": AUDIT_POLICY})
        self.audit_log = self.cluster.dir / "audit" / "audit.log"
        self.cluster.extra_apiserver_args += [f"--audit-policy-file={self.cluster.dir / 'audit' / 'policy.yaml'}",
                                              f"--audit-log-path={self.audit_log}"]

    def rtc_fields(self) -> dict:
        """The RemoteTenantCluster fields this tenant side needs."""
        return {"server": self.cluster.server, "caData": base64.b64encode(self.cluster.ca_pem).decode(),
                "proxy": {"mode": "Direct"}}

    def control_plane_objects(self) -> list[dict]:
        """Objects to create on the control plane with the manifest (Managed: the bootstrap Secret)."""
        return []

    def tenant_admin_objects(self) -> list[dict]:
        """What the tenant's admin creates: the role, and (Direct mode) its binding to the one identity."""
        return [
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
             "metadata": {"name": DEPLOYER_ROLE}, "rules": DEPLOYER_RULES},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
             "metadata": {"name": f"{DEPLOYER_ROLE}-{self.spec.tenant}"},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": DEPLOYER_ROLE},
             "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": self.spec.username}]},
        ]

    def audit_events(self) -> list[dict]:
        """The tenant API server's audit events so far (one JSON object per line)."""
        try:
            text = self.audit_log.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


    def creators(self, resource: str, namespace: str) -> list[str]:
        """Who created `resource` objects in `namespace`, by the audit log."""
        return sorted({e["user"]["username"] for e in self.audit_events()
                       if e["verb"] == "create" and (e.get("objectRef") or {}).get("resource") == resource
                       and e["objectRef"].get("namespace") == namespace})


# The fixed ClusterIP of the proxy's Service: .100 of the tenant's Service range, so spec.server names it
# before the proxy exists (spec.proxy.service.clusterIP). The host reaches it through the node's kube-proxy.
PROXY_SERVICE_HOST = 100


@dataclass
class ManagedTenant(DirectTenant):
    """A tenant cluster with a real node: the operator installs kube-oidc-proxy with the bootstrap
    credential (deleted once the chain is verified), and Argo CD reaches the cluster through the proxy's
    Service. The identity gets cluster-admin: once the bootstrap credential is gone the operator manages
    the proxy through the chain as that identity (as in the seed's recipe; a vCluster tenant owns its cluster)."""

    network: object = None  # NodeNetwork
    proxy_mode: str = field(default="Managed", init=False)

    def __post_init__(self) -> None:
        from .node import proxy_image

        self.cluster = LocalCluster(self.spec.name, Path(self.base_dir), node_network=self.network,
                                    files={"audit/policy.yaml": AUDIT_POLICY})
        self.audit_log = self.cluster.dir / "audit" / "audit.log"
        self.cluster.extra_apiserver_args += [f"--audit-policy-file={self.cluster.dir / 'audit' / 'policy.yaml'}",
                                              f"--audit-log-path={self.audit_log}"]
        self.server = f"https://{self.cluster.node.addresses.service_ip(PROXY_SERVICE_HOST)}"
        self.image = proxy_image()

    def rtc_fields(self) -> dict:
        return {"server": self.server,
                "access": {"clusterRole": "cluster-admin"},
                "proxy": {"mode": "Managed", "image": self.image,
                          "service": {"clusterIP": self.server.removeprefix("https://")}},
                "bootstrap": {"kubeconfigSecretRef": {"name": self.bootstrap_secret}, "deleteAfterInstall": True}}

    @property
    def bootstrap_secret(self) -> str:
        return f"{self.spec.name}-bootstrap"

    def control_plane_objects(self) -> list[dict]:
        """The bootstrap Secret, marked as this manifest's (only such a Secret is deleted after install)."""
        return [{"apiVersion": "v1", "kind": "Secret",
                 "metadata": {"name": self.bootstrap_secret, "namespace": self.spec.namespace,
                              "annotations": {names.ANNOTATION_BOOTSTRAP_FOR: self.spec.name}},
                 "stringData": {"kubeconfig": self.cluster.kubeconfig.read_text()}}]

    def tenant_admin_objects(self) -> list[dict]:
        return []  # the operator binds the identity to spec.access.clusterRole

    def creators(self, resource: str, namespace: str) -> list[str]:
        """The proxy impersonates the identity: the audit log names it as the impersonated user."""
        return sorted({(e.get("impersonatedUser") or e["user"])["username"] for e in self.audit_events()
                       if e["verb"] == "create" and (e.get("objectRef") or {}).get("resource") == resource
                       and e["objectRef"].get("namespace") == namespace})


TENANT_SIDES = {"Direct": DirectTenant, "Managed": ManagedTenant}


def tenant_side(mode: str, spec: TenantCluster, base_dir: Path, issuer: str, issuer_ca_pem: bytes, network=None):
    """The tenant side for a proxy mode; Managed needs a NodeNetwork (kube-oidc-proxy runs as Pods)."""
    try:
        factory = TENANT_SIDES[mode]
    except KeyError:
        raise ValueError(f"no tenant side for proxy mode {mode!r} (have: {', '.join(TENANT_SIDES)})") from None
    if factory is ManagedTenant:
        return ManagedTenant(spec, base_dir, issuer, issuer_ca_pem, network)
    return factory(spec, base_dir, issuer, issuer_ca_pem)
