"""The local control plane behaves like a real cluster in the ways later features rely on."""
from __future__ import annotations

import socket
import subprocess

import pytest
from kubernetes import client as k
from kubernetes.client.rest import ApiException

from keyless.envtest.cluster import ClusterStartError, LocalCluster

from .conftest import TESTDATA
from .helpers import eventually, install_crds, kubectl

pytestmark = pytest.mark.cluster

WIDGET_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.example.keyless.dev}
spec:
  group: example.keyless.dev
  names: {kind: Widget, plural: widgets, singular: widget}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size: {type: integer, minimum: 1}
"""


def test_custom_resource_can_be_installed_validated_and_used(control_plane, namespace, tmp_path):
    crd = tmp_path / "widget.yaml"
    crd.write_text(WIDGET_CRD)
    install_crds(control_plane, crd)
    kubectl(control_plane, "-n", namespace, "apply", "-f", "-",
            input="apiVersion: example.keyless.dev/v1\nkind: Widget\nmetadata: {name: w1}\nspec: {size: 3}\n")
    got = kubectl(control_plane, "-n", namespace, "get", "widget", "w1", "-o", "jsonpath={.spec.size}")
    assert got.stdout == "3"
    refused = kubectl(control_plane, "-n", namespace, "apply", "-f", "-", check=False,
                      input="apiVersion: example.keyless.dev/v1\nkind: Widget\nmetadata: {name: w2}\nspec: {size: 0}\n")
    assert refused.returncode != 0 and "spec.size" in refused.stderr


def test_argocd_and_openunison_crds_install(control_plane):
    install_crds(control_plane, TESTDATA / "argocd-crds", TESTDATA / "openunison-crds")
    names = kubectl(control_plane, "get", "crd", "-o", "name").stdout
    for expected in ("applications.argoproj.io", "applicationsets.argoproj.io",
                     "appprojects.argoproj.io", "targets.openunison.tremolo.io"):
        assert expected in names


def _service_account_and_pod(api, namespace: str) -> k.V1Pod:
    core = k.CoreV1Api(api)
    core.create_namespaced_service_account(namespace, k.V1ServiceAccount(metadata=k.V1ObjectMeta(name="caller")))
    return core.create_namespaced_pod(namespace, k.V1Pod(
        metadata=k.V1ObjectMeta(name="caller"),
        spec=k.V1PodSpec(service_account_name="caller",
                         containers=[k.V1Container(name="c", image="example.invalid/none")]),
    ))


def _bound_token(api, namespace: str, pod: k.V1Pod, audience: str) -> str:
    request = k.AuthenticationV1TokenRequest(spec=k.V1TokenRequestSpec(
        audiences=[audience], expiration_seconds=600,
        bound_object_ref=k.V1BoundObjectReference(kind="Pod", api_version="v1",
                                                   name=pod.metadata.name, uid=pod.metadata.uid),
    ))
    return k.CoreV1Api(api).create_namespaced_service_account_token("caller", namespace, request).status.token


def _review(api, token: str, audience: str) -> k.V1TokenReviewStatus:
    review = k.V1TokenReview(spec=k.V1TokenReviewSpec(token=token, audiences=[audience]))
    return k.AuthenticationV1Api(api).create_token_review(review).status


def test_pod_bound_token_is_reviewed_with_audience_and_refused_after_pod_deletion(control_api, namespace):
    pod = _service_account_and_pod(control_api, namespace)
    token = _bound_token(control_api, namespace, pod, "keyless-broker")

    ok = _review(control_api, token, "keyless-broker")
    assert ok.authenticated is True
    assert ok.user.username == f"system:serviceaccount:{namespace}:caller"
    assert ok.user.extra["authentication.kubernetes.io/pod-name"] == ["caller"]
    assert ok.user.extra["authentication.kubernetes.io/pod-uid"] == [pod.metadata.uid]

    wrong = _review(control_api, token, "some-other-audience")
    assert not wrong.authenticated

    k.CoreV1Api(control_api).delete_namespaced_pod("caller", namespace, grace_period_seconds=0)
    # The API server caches successful authentications for ~10 s, so poll.
    eventually(lambda: not _review(control_api, token, "keyless-broker").authenticated,
               timeout=30, interval=1, message="token refused after its Pod was deleted")


def test_control_plane_and_tenant_are_independent_clusters(control_api, tenant_api, namespace):
    tenant_names = [n.metadata.name for n in k.CoreV1Api(tenant_api).list_namespace().items]
    assert namespace not in tenant_names


def test_admin_kubeconfig_works_with_real_kubectl(tenant_cluster):
    who = kubectl(tenant_cluster, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}")
    assert who.stdout == "keyless-admin"


def test_namespace_deletion_completes_through_the_controller_manager(control_api):
    core = k.CoreV1Api(control_api)
    core.create_namespace(k.V1Namespace(metadata=k.V1ObjectMeta(name="doomed")))
    core.create_namespaced_config_map("doomed", k.V1ConfigMap(metadata=k.V1ObjectMeta(name="x")))
    core.delete_namespace("doomed")

    def gone():
        try:
            core.read_namespace("doomed")
            return False
        except ApiException as e:
            return e.status == 404

    eventually(gone, timeout=60, interval=0.5, message="namespace finalized")


def test_port_in_use_gives_a_clear_error_without_starting_anything(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cluster = LocalCluster("busy", tmp_path / "busy", controller_manager=False, apiserver_port=port)
        with pytest.raises(ClusterStartError, match=f"port {port} on 127.0.0.1 is already in use"):
            cluster.start(timeout=30)
    assert not cluster.running("etcd")


def test_api_server_that_crashes_at_start_reports_its_log_and_leaves_no_process(tmp_path):
    cluster = LocalCluster("crashy", tmp_path / "crashy", controller_manager=False,
                           extra_apiserver_args=["--no-such-flag-exists"])
    with pytest.raises(ClusterStartError) as failure:
        cluster.start(timeout=60)
    message = str(failure.value)
    assert "kube-apiserver exited" in message and str(tmp_path / "crashy" / "kube-apiserver.log") in message
    assert "no-such-flag-exists" in message
    assert not cluster.running("etcd") and not cluster.running("kube-apiserver")
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path / "crashy")], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""
