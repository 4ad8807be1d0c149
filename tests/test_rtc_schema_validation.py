"""A bad RemoteTenantCluster is refused by `kubectl apply` itself, with a message that says what to fix."""
from __future__ import annotations

import copy

import pytest
import yaml

from .conftest import ROOT
from .helpers import install_crds, kubectl
from .operator_fixtures import label_tenant_namespaces, remove_all_remote_tenant_clusters
from .rtc_cases import BAD_INPUTS, DELETE, mutate, valid

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def crd_installed(control_plane):
    install_crds(control_plane, ROOT / "crds")
    yield control_plane
    remove_all_remote_tenant_clusters(control_plane)


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_manifest_is_refused_with_a_message_that_says_what_to_fix(crd_installed, namespace, case):
    change, expected = BAD_INPUTS[case]
    manifest = change(copy.deepcopy(valid(namespace)))
    label_tenant_namespaces(crd_installed, valid(namespace))
    result = kubectl(crd_installed, "apply", "-f", "-", input=yaml.safe_dump(manifest), check=False)
    assert result.returncode != 0, f"{case} was accepted"
    assert expected in result.stderr, result.stderr


def test_valid_manifest_is_accepted(crd_installed, namespace):
    label_tenant_namespaces(crd_installed, valid(namespace))
    kubectl(crd_installed, "apply", "-f", "-", input=yaml.safe_dump(valid(namespace)))


IMMUTABLE = {
    "tenant": (mutate("tenant", "tenant-b"), "spec.tenant is immutable"),
    "argocd namespace": (mutate("argocd.namespace", "argocd-2"), "spec.argocd.namespace is immutable"),
    "argocd namespace removed": (mutate("argocd.namespace", DELETE), None),  # the default is argocd: no change
    "audience": (mutate("access.audience", "keyless:x:other"), "spec.access.audience is immutable"),
    "audience removed": (mutate("access.audience", DELETE), "spec.access.audience is immutable"),
    "server": (mutate("server", "https://proxy.tenant-b.example.com"), "spec.server is immutable"),
    "proxy mode": (mutate("proxy", {"mode": "External"}), "spec.proxy.mode is immutable"),
    "broker kind": (mutate("broker", {"kind": "OpenUnison", "openUnison": {"namespace": "o", "idp": "k", "host": "h"}}),
                    "spec.broker.kind is immutable"),
}


@pytest.mark.parametrize("case", sorted(IMMUTABLE))
def test_fields_that_would_orphan_objects_are_immutable(crd_installed, namespace, case):
    manifest = valid(namespace)
    manifest["spec"]["argocd"] = {"namespace": "argocd"}
    manifest["spec"]["access"]["audience"] = f"keyless:{namespace}:aud-1"
    label_tenant_namespaces(crd_installed, manifest)
    kubectl(crd_installed, "apply", "-f", "-", input=yaml.safe_dump(manifest))
    change, expected = IMMUTABLE[case]
    result = kubectl(crd_installed, "apply", "-f", "-", input=yaml.safe_dump(change(copy.deepcopy(manifest))),
                     check=False)
    if expected is None:
        assert result.returncode == 0, result.stderr
    else:
        assert result.returncode != 0 and expected in result.stderr, result.stderr


ADDED_LATER = {
    # Each starts unset (the default applies) and is then set: the value in effect would change.
    "audience added": (mutate("access.audience", "keyless:{namespace}:taken"), "spec.access.audience"),
    "argocd namespace added": (mutate("argocd.namespace", "argocd-2"), "spec.argocd.namespace"),
    "cluster name added": (mutate("argocd.clusterName", "someone-elses"), "spec.argocd.clusterName"),
    "proxy namespace added": (mutate("proxy", {"namespace": "elsewhere"}), "spec.proxy.namespace"),
}


@pytest.mark.parametrize("case", sorted(ADDED_LATER))
def test_an_immutable_field_cannot_be_removed_and_added_back_with_another_value(crd_installed, namespace, case):
    """Finding 3: `self == oldSelf` on a field does not fire when the field is absent on one side."""
    manifest = valid(namespace)
    label_tenant_namespaces(crd_installed, manifest)
    kubectl(crd_installed, "apply", "-f", "-", input=yaml.safe_dump(manifest))
    change, expected = ADDED_LATER[case]
    changed = change(copy.deepcopy(manifest))
    text = yaml.safe_dump(changed).replace("{namespace}", namespace)
    result = kubectl(crd_installed, "apply", "-f", "-", input=text, check=False)
    assert result.returncode != 0 and expected in result.stderr and "immutable" in result.stderr, result.stderr


def test_kubectl_explain_teaches_the_api(crd_installed):
    text = kubectl(crd_installed, "explain", "rtc.spec.access.allowedCallers").stdout
    assert "ServiceAccount usernames the broker mints tokens for" in text
