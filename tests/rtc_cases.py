"""RemoteTenantCluster manifests the API server must refuse, and ones it must accept (shared by the schema tests
against a real API server and by the tests that `keyless render` gives the same verdict)."""
from __future__ import annotations

from .operator_fixtures import ca_data


def valid(namespace: str) -> dict:
    return {
        "apiVersion": "keyless.dev/v1alpha1", "kind": "RemoteTenantCluster",
        "metadata": {"name": "bad", "namespace": namespace},
        "spec": {
            "tenant": "tenant-a", "server": "https://proxy.tenant-a.example.com", "caData": ca_data(),
            "access": {"clusterRole": "cluster-admin"},
            "bootstrap": {"kubeconfigSecretRef": {"name": "boot"}},
        },
    }


DELETE = object()


def mutate(path: str, value):
    def apply_to(manifest: dict) -> dict:
        node = manifest["spec"]
        keys = path.split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        if value is DELETE:
            node.pop(keys[-1], None)
        else:
            node[keys[-1]] = value
        return manifest
    return apply_to


def _both(*changes):
    def apply_to(manifest: dict) -> dict:
        for change in changes:
            manifest = change(manifest)
        return manifest
    return apply_to


# case -> (change of valid(namespace), what the API server's message must contain)
BAD_INPUTS = {
    "http server": (mutate("server", "http://proxy.example.com"), "must start with https://"),
    "trailing slash": (mutate("server", "https://proxy.example.com/"), "must not end with '/'"),
    "in-cluster address": (mutate("server", "https://kubernetes.default.svc"), "must not be the in-cluster address"),
    "not a url": (mutate("server", "https://"), "valid URL with a host"),
    "ttl too short": (mutate("access.tokenTTLSeconds", 10), "tokenTTLSeconds"),
    "ttl too long": (mutate("access.tokenTTLSeconds", 7200), "tokenTTLSeconds"),
    "caData not base64": (mutate("caData", "not base64!!"), "caData"),
    "managed without bootstrap": (mutate("bootstrap", DELETE), "spec.bootstrap.kubeconfigSecretRef is required"),
    "system username": (mutate("access.username", "system:admin"), "must not start with 'system:'"),
    "argocd label key": (mutate("argocd.labels", {"argocd.argoproj.io/secret-type": "x"}), "Argo CD and Keyless own them"),
    "bad tenant name": (mutate("tenant", "Tenant_A"), "spec.tenant"),
    "unknown proxy mode": (mutate("proxy.mode", "Sidecar"), "spec.proxy.mode"),
    "missing clusterRole": (mutate("access.clusterRole", DELETE), "clusterRole"),
    "caller not a service account": (mutate("access.allowedCallers", ["alice"]), "allowedCallers"),
    "openunison without settings": (mutate("broker", {"kind": "OpenUnison"}), "spec.broker.openUnison"),
    "another tenant's username": (mutate("access.username", "keyless:tenant-b:argocd"), "must start with keyless:<tenant>:"),
    "another tenant's project": (mutate("argocd.project", "tenant-b"), "spec.argocd.project must be the tenant's name"),
    "project by prefix only": (mutate("argocd.project", "tenant-a-prod"), "spec.argocd.project must be the tenant's name"),
    "audience outside keyless:": (mutate("access.audience", "https://kubernetes.default.svc"),
                                  "spec.access.audience must start with keyless:<namespace>:"),
    "unicode tenant": (mutate("tenant", "tenant-\uff41"), "spec.tenant"),
    "external mode without caData": (_both(mutate("proxy", {"mode": "External"}), mutate("caData", DELETE)),
                                     "spec.caData is required for proxy modes External and Direct"),
}

# Refused too; the schema test above checks the messages, these only the verdict (refused by the API server
# and by `keyless render` alike).
MORE_BAD_INPUTS = {
    "server without scheme": mutate("server", "proxy.example.com:6443"),
    "in-cluster address with port": mutate("server", "https://kubernetes.default.svc:443"),
    "direct mode without caData": _both(mutate("proxy", {"mode": "Direct"}), mutate("caData", DELETE)),
    "system:masters group": mutate("access.groups", ["system:masters"]),
    "duplicate group": mutate("access.groups", ["ops", "ops"]),
    "ttl as a string": mutate("access.tokenTTLSeconds", "60"),
    "ttl as a float": mutate("access.tokenTTLSeconds", 60.5),
    "tenant with underscore": mutate("tenant", "A_Tenant"),
    "unknown spec field": mutate("colour", "blue"),
    "unknown nested field": mutate("access.role", "admin"),
    "replicas zero": mutate("proxy.replicas", 0),
    "nodePort with ClusterIP": mutate("proxy.service", {"nodePort": 30080}),
    "clusterIP not an IP": mutate("proxy.service", {"clusterIP": "10.0.0"}),
    "unknown service type": mutate("proxy.service", {"type": "ExternalName"}),
    "shard out of range": mutate("argocd.shard", 1024),
    "createAppProject a string": mutate("argocd.createAppProject", "yes"),
    "label value invalid": mutate("argocd.labels", {"tier": "gold!"}),
    "empty clusterRole": mutate("access.clusterRole", ""),
    "impersonation without name": mutate("access.impersonation", {"serviceAccounts": [{"namespace": "a"}]}),
    "bootstrap without secret name": mutate("bootstrap", {"kubeconfigSecretRef": {}}),
    "spec not an object": lambda m: {**m, "spec": "tenant-a"},
    "no spec": lambda m: {k: v for k, v in m.items() if k != "spec"},
    "bad name": lambda m: {**m, "metadata": {**m["metadata"], "name": "Bad_Name"}},
}

# Accepted by the API server (the CRD alone: its rules and schema), and rendered by `keyless render`.
GOOD_INPUTS = {
    "managed": lambda m: m,
    "external": _both(mutate("proxy", {"mode": "External"}), mutate("bootstrap", DELETE)),
    "direct": _both(mutate("proxy", {"mode": "Direct"}), mutate("bootstrap", DELETE)),
    "managed without caData": mutate("caData", DELETE),
    "server with port and path": mutate("server", "https://10.0.0.1:6443/k8s/clusters/c-1"),
    "everything": _both(
        mutate("argocd", {"namespace": "argocd", "clusterName": "Tenant_A.dev", "project": "tenant-a.prod",
                          "shard": 3, "createAppProject": False, "labels": {"environment": "dev", "example.com/tier": ""}}),
        mutate("access", {"clusterRole": "system:aggregate-to-view", "username": "keyless:tenant-a:deployer",
                          "allowedCallers": ["system:serviceaccount:argocd:argocd-application-controller"],
                          "tokenTTLSeconds": 3600, "groups": ["ops", "devs"],
                          "impersonation": {"serviceAccounts": [{"namespace": "apps", "name": "deployer"}]}}),
        mutate("proxy", {"mode": "Managed", "namespace": "oidc", "replicas": 1, "hostnames": ["proxy.internal"],
                         "service": {"type": "NodePort", "nodePort": 30443, "clusterIP": "10.96.0.100",
                                     "annotations": {"example.com/lb": "internal"}}}),
        mutate("bootstrap", {"kubeconfigSecretRef": {"name": "boot", "key": "config"}, "deleteAfterInstall": True})),
    "openunison": mutate("broker", {"kind": "OpenUnison",
                                    "openUnison": {"namespace": "openunison", "idp": "k8s", "host": "ou.example.com"}}),
}
