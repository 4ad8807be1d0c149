"""What the operator registers for a cluster (BrokerTargetRegistered) is what the API servers and the broker accept:
the BrokerTarget passes its CRD and is served by the broker; the OpenUnison Target passes OpenUnison's CRD."""
from __future__ import annotations

import uuid

import pytest
from kubernetes import client as k

from keyless.broker.targets import Target
from keyless.model.names import default_audience, target_name
from keyless.render.broker_target import render_broker_target, render_openunison_target

from .conftest import TESTDATA
from .broker_fixtures import CRD_DIR, ensure_namespace
from .helpers import install_crds, kubectl

pytestmark = pytest.mark.cluster

LABELS = {"app.kubernetes.io/managed-by": "keyless", "keyless.dev/tenant": "tenant-a"}


def _broker_target(namespace: str) -> dict:
    return render_broker_target(
        name=target_name("tenants", "tenant-a-dev"), namespace=namespace,
        audience=default_audience("tenants", "tenant-a-dev"), username="keyless:tenant-a:argocd",
        groups=[], allowed_callers=["system:serviceaccount:argocd:argocd-application-controller"], ttl_seconds=60,
        cluster_namespace="tenants", cluster_name="tenant-a-dev", labels=LABELS,
        annotations={"keyless.dev/owner": "tenants/tenant-a-dev"})


def test_rendered_broker_target_is_accepted_by_its_crd_and_read_back_as_the_broker_target(control_plane, control_api):
    install_crds(control_plane, CRD_DIR / "brokertargets.keyless.dev.yaml")
    ns = f"krender-{uuid.uuid4().hex[:6]}"
    ensure_namespace(control_api, ns)
    body = _broker_target(ns)
    stored = k.CustomObjectsApi(control_api).create_namespaced_custom_object(
        "keyless.dev", "v1alpha1", ns, "brokertargets", body)
    assert Target.from_object(stored) == Target(
        "tenants.tenant-a-dev", "keyless:tenants:tenant-a-dev", "keyless:tenant-a:argocd",
        frozenset({"system:serviceaccount:argocd:argocd-application-controller"}), 60, ())
    assert stored["spec"]["clusterRef"] == {"namespace": "tenants", "name": "tenant-a-dev"}
    shown = kubectl(control_plane, "-n", ns, "get", "kbt", "--no-headers").stdout
    assert "keyless:tenants:tenant-a-dev" in shown and "60" in shown


def test_broker_target_crd_refuses_a_ttl_below_its_minimum(control_plane, control_api):
    install_crds(control_plane, CRD_DIR / "brokertargets.keyless.dev.yaml")
    ns = f"krender-{uuid.uuid4().hex[:6]}"
    ensure_namespace(control_api, ns)
    body = _broker_target(ns)
    body["spec"]["tokenTTLSeconds"] = 5
    with pytest.raises(k.ApiException) as refused:
        k.CustomObjectsApi(control_api).create_namespaced_custom_object(
            "keyless.dev", "v1alpha1", ns, "brokertargets", body)
    assert refused.value.status == 422 and "tokenTTLSeconds" in refused.value.body


def test_rendered_openunison_target_is_accepted_by_openunisons_crd_without_pruning(control_plane, control_api):
    install_crds(control_plane, TESTDATA / "openunison-crds")
    ns = f"krender-{uuid.uuid4().hex[:6]}"
    ensure_namespace(control_api, ns)
    ca_pem = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    body = render_openunison_target(
        name="tenants-tenant-a-dev", namespace=ns, url="https://proxy.tenant-a.example.com", ca_pem=ca_pem,
        issuer="https://openunison.example.com/auth/idp/k8sIdp", idp="k8sIdp", username="keyless:tenant-a:argocd",
        audience="keyless:tenants:tenant-a-dev", labels=LABELS)
    created = k.CustomObjectsApi(control_api).create_namespaced_custom_object(
        "openunison.tremolo.io", "v1", ns, "targets", body)
    spec = created["spec"]
    # A structural schema prunes unknown fields silently: what was sent must come back unchanged.
    assert spec == body["spec"]
    assert spec["className"] == "com.tremolosecurity.unison.openshiftv3.OpenShiftTarget"
    params = {p["name"]: p["value"] for p in spec["params"]}
    assert params["tokenType"] == "oidc" and params["useToken"] == "true"
    assert params["oidcSub"] == "keyless:tenant-a:argocd" and params["oidcAudience"] == "keyless:tenants:tenant-a-dev"
    assert params["oidcIdp"] == "k8sIdp" and params["url"] == "https://proxy.tenant-a.example.com"
    assert all(isinstance(p["value"], str) for p in spec["params"])
