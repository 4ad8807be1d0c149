"""A bad RemoteTenantCluster is refused by `kubectl apply` itself, with a message that says what to fix."""
from __future__ import annotations

import copy

import pytest
import yaml

from .conftest import ROOT
from .helpers import install_crds, kubectl
from .operator_fixtures import ca_data, remove_all_remote_tenant_clusters

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def crd_installed(control_plane):
    install_crds(control_plane, ROOT / "crds")
    yield control_plane
    remove_all_remote_tenant_clusters(control_plane)


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


DELETE = object()

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
    "external mode without caData": (lambda m: mutate("proxy", {"mode": "External"})(mutate("caData", DELETE)(m)),
                                     "spec.caData is required for proxy modes External and Direct"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_manifest_is_refused_with_a_message_that_says_what_to_fix(crd_installed, namespace, case):
    change, expected = BAD_INPUTS[case]
    manifest = change(copy.deepcopy(valid(namespace)))
    result = kubectl(crd_installed, "apply", "-f", "-", input=yaml.safe_dump(manifest), check=False)
    assert result.returncode != 0, f"{case} was accepted"
    assert expected in result.stderr, result.stderr


def test_valid_manifest_is_accepted(crd_installed, namespace):
    kubectl(crd_installed, "apply", "-f", "-", input=yaml.safe_dump(valid(namespace)))


IMMUTABLE = {
    "tenant": (mutate("tenant", "tenant-b"), "spec.tenant is immutable"),
    "argocd namespace": (mutate("argocd.namespace", "argocd-2"), "spec.argocd.namespace is immutable"),
    "audience": (mutate("access.audience", "other"), "spec.access.audience is immutable"),
    "proxy mode": (mutate("proxy", {"mode": "External"}), "spec.proxy.mode is immutable"),
    "broker kind": (mutate("broker", {"kind": "OpenUnison", "openUnison": {"namespace": "o", "idp": "k", "host": "h"}}),
                    "spec.broker.kind is immutable"),
}


@pytest.mark.parametrize("case", sorted(IMMUTABLE))
def test_fields_that_would_orphan_objects_are_immutable(crd_installed, namespace, case):
    manifest = valid(namespace)
    manifest["spec"]["argocd"] = {"namespace": "argocd"}
    manifest["spec"]["access"]["audience"] = "aud-1"
    kubectl(crd_installed, "apply", "-f", "-", input=yaml.safe_dump(manifest))
    change, expected = IMMUTABLE[case]
    result = kubectl(crd_installed, "apply", "-f", "-", input=yaml.safe_dump(change(manifest)), check=False)
    assert result.returncode != 0 and expected in result.stderr, result.stderr


def test_kubectl_explain_teaches_the_api(crd_installed):
    text = kubectl(crd_installed, "explain", "rtc.spec.access.allowedCallers").stdout
    assert "ServiceAccount usernames the broker mints tokens for" in text
