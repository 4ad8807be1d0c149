"""The operator's control-plane side against a real API server: Argo CD Secret, AppProject, status."""
from __future__ import annotations

import base64
import json
import re
import time

import pytest
import yaml
from cryptography import x509
from kubernetes import client as k
from kubernetes.client.rest import ApiException

from .helpers import eventually, kubectl
from .operator_fixtures import (OperatorProcess, apply, prepare_control_plane, remove_all_remote_tenant_clusters,
                                rtc_manifest)

pytestmark = pytest.mark.cluster

GROUP, VERSION, PLURAL = "keyless.dev", "v1alpha1", "remotetenantclusters"


@pytest.fixture(scope="module")
def operator(control_plane, run_dir):
    prepare_control_plane(control_plane)
    process = OperatorProcess(control_plane, run_dir / "operator-control-plane").start()
    yield process
    remove_all_remote_tenant_clusters(control_plane)
    process.stop()


def get_rtc(api, namespace, name):
    return k.CustomObjectsApi(api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def condition(obj, kind):
    for c in (obj.get("status") or {}).get("conditions", []):
        if c["type"] == kind:
            return c
    return None


def wait_condition(api, namespace, name, kind, status, reason=None, timeout=30):
    def check():
        obj = get_rtc(api, namespace, name)
        c = condition(obj, kind)
        ok = c and c["status"] == status and (reason is None or c["reason"] == reason)
        assert ok, c
        return obj
    return eventually(check, timeout=timeout, message=f"{kind}={status} on {namespace}/{name}")


def argocd_secret(api, namespace, name):
    return k.CoreV1Api(api).read_namespaced_secret(f"keyless-{namespace}-{name}", "argocd")


def argocd_secret_data(api, namespace, name) -> dict | None:
    try:
        return decode(argocd_secret(api, namespace, name))
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def decode(secret) -> dict:
    return {key: base64.b64decode(value).decode() for key, value in secret.data.items()}


def not_found(fn, *args):
    try:
        fn(*args)
        return False
    except ApiException as e:
        return e.status == 404


def test_created_manifest_registers_the_cluster_the_way_argocd_reads_it(operator, control_api, namespace):
    manifest = rtc_manifest("dev", namespace, argocd={"labels": {"environment": "development", "tier": "gold"}})
    apply(operator.cluster, manifest)
    obj = wait_condition(control_api, namespace, "dev", "ArgoClusterRegistered", "True", "Registered")

    secret = argocd_secret(control_api, namespace, "dev")
    assert secret.metadata.labels["argocd.argoproj.io/secret-type"] == "cluster"
    assert secret.metadata.labels["environment"] == "development" and secret.metadata.labels["tier"] == "gold"
    assert secret.metadata.labels["keyless.dev/tenant"] == "tenant-a"
    data = decode(secret)
    assert data["name"] == "dev"
    assert data["server"] == manifest["spec"]["server"] and not data["server"].endswith("/")
    assert data["project"] == "tenant-a"
    # Decode `config` exactly as Argo CD does (JSON into ClusterConfig): only known fields, right types.
    config = json.loads(data["config"])
    assert set(config) == {"tlsClientConfig", "execProviderConfig"}
    assert config["tlsClientConfig"]["insecure"] is False
    pem = base64.b64decode(config["tlsClientConfig"]["caData"])
    assert x509.load_pem_x509_certificates(pem)
    assert pem == base64.b64decode(manifest["spec"]["caData"])
    exec_config = config["execProviderConfig"]
    assert set(exec_config) <= {"command", "args", "env", "apiVersion", "installHint"}
    assert exec_config["apiVersion"] in ("client.authentication.k8s.io/v1", "client.authentication.k8s.io/v1beta1")
    assert exec_config["command"] == "cat"
    assert exec_config["args"] == [f"/var/run/keyless/credentials/{namespace}.dev.json"]

    project = k.CustomObjectsApi(control_api).get_namespaced_custom_object(
        "argoproj.io", "v1alpha1", "argocd", "appprojects", "tenant-a")
    assert project["spec"]["permitOnlyProjectScopedClusters"] is True
    assert {"server": manifest["spec"]["server"], "name": "dev", "namespace": "*"} in project["spec"]["destinations"]

    target = k.CustomObjectsApi(control_api).get_namespaced_custom_object(
        "keyless.dev", "v1alpha1", "keyless-system", "brokertargets", f"{namespace}.dev")
    assert target["spec"]["audience"] == f"keyless:{namespace}:dev"
    assert target["spec"]["username"] == "keyless:tenant-a:argocd"
    assert target["spec"]["tokenTTLSeconds"] == 60

    # Ready reflects reality: the chain is not verified (no tenant side in this test), so not Ready.
    ready = condition(obj, "Ready")
    assert ready["status"] == "False" and ready["observedGeneration"] == 1
    assert obj["status"]["observedGeneration"] == 1
    table = kubectl(operator.cluster, "get", "rtc", "-n", namespace).stdout
    assert re.search(r"NAME\s+TENANT\s+SERVER\s+READY\s+REASON\s+AGE", table)
    assert re.search(r"dev\s+tenant-a\s+https://proxy\.dev\S+\s+False\s+\S+", table)


def test_two_clusters_get_distinct_exec_args_and_share_the_tenant_project(operator, control_api, namespace):
    apply(operator.cluster, rtc_manifest("one", namespace, tenant="tenant-b"),
          rtc_manifest("two", namespace, tenant="tenant-b"))
    for name in ("one", "two"):
        wait_condition(control_api, namespace, name, "AppProjectReady", "True")
    args = {json.dumps(json.loads(decode(argocd_secret(control_api, namespace, n))["config"])["execProviderConfig"]["args"])
            for n in ("one", "two")}
    assert len(args) == 2

    def two_destinations():
        project = k.CustomObjectsApi(control_api).get_namespaced_custom_object(
            "argoproj.io", "v1alpha1", "argocd", "appprojects", "tenant-b")
        return {d["name"] for d in project["spec"]["destinations"]} == {"one", "two"}

    eventually(two_destinations, message="AppProject lists both clusters")


def test_updates_to_labels_project_and_ttl_reach_every_object(operator, control_api, namespace):
    apply(operator.cluster, rtc_manifest("upd", namespace, tenant="tenant-c"))
    wait_condition(control_api, namespace, "upd", "BrokerTargetRegistered", "True")
    changed = rtc_manifest("upd", namespace, tenant="tenant-c",
                           argocd={"labels": {"environment": "production"}, "project": "tenant-c-prod"},
                           access={"clusterRole": "view", "tokenTTLSeconds": 120})
    changed["spec"]["caData"] = get_rtc(control_api, namespace, "upd")["spec"]["caData"]
    apply(operator.cluster, changed)

    def followed():
        secret = argocd_secret(control_api, namespace, "upd")
        target = k.CustomObjectsApi(control_api).get_namespaced_custom_object(
            "keyless.dev", "v1alpha1", "keyless-system", "brokertargets", f"{namespace}.upd")
        return (secret.metadata.labels.get("environment") == "production"
                and decode(secret)["project"] == "tenant-c-prod"
                and target["spec"]["tokenTTLSeconds"] == 120)

    eventually(followed, message="Secret and BrokerTarget follow the spec")
    obj = wait_condition(control_api, namespace, "upd", "AppProjectReady", "True")
    assert obj["status"]["observedGeneration"] == 2
    k.CustomObjectsApi(control_api).get_namespaced_custom_object(
        "argoproj.io", "v1alpha1", "argocd", "appprojects", "tenant-c-prod")
    # The old project had only this cluster: it is gone rather than left granting anything.
    eventually(lambda: not_found(k.CustomObjectsApi(control_api).get_namespaced_custom_object,
                                 "argoproj.io", "v1alpha1", "argocd", "appprojects", "tenant-c") or True)


def test_deleting_the_manifest_removes_everything_it_created(operator, control_api, namespace):
    apply(operator.cluster, rtc_manifest("gone", namespace, tenant="tenant-d"))
    wait_condition(control_api, namespace, "gone", "BrokerTargetRegistered", "True")
    kubectl(operator.cluster, "delete", "rtc", "gone", "-n", namespace, "--wait=true", "--timeout=30s")
    assert not_found(k.CoreV1Api(control_api).read_namespaced_secret, f"keyless-{namespace}-gone", "argocd")
    assert not_found(k.CustomObjectsApi(control_api).get_namespaced_custom_object,
                     "keyless.dev", "v1alpha1", "keyless-system", "brokertargets", f"{namespace}.gone")
    assert not_found(k.CustomObjectsApi(control_api).get_namespaced_custom_object,
                     "argoproj.io", "v1alpha1", "argocd", "appprojects", "tenant-d")


def test_edited_or_deleted_argocd_secret_is_repaired(operator, control_api, namespace):
    apply(operator.cluster, rtc_manifest("drift", namespace, tenant="tenant-e"))
    wait_condition(control_api, namespace, "drift", "ArgoClusterRegistered", "True")
    core = k.CoreV1Api(control_api)
    name = f"keyless-{namespace}-drift"
    original = decode(argocd_secret(control_api, namespace, "drift"))
    core.patch_namespaced_secret(name, "argocd", {"data": {"server": base64.b64encode(b"https://evil.example.com").decode()}})
    eventually(lambda: decode(argocd_secret(control_api, namespace, "drift"))["server"] == original["server"],
               timeout=30, message="edited Secret restored")
    core.delete_namespaced_secret(name, "argocd")
    eventually(lambda: argocd_secret_data(control_api, namespace, "drift") == original,
               timeout=30, message="deleted Secret recreated")


def test_second_manifest_claiming_the_same_cluster_gets_conflict_and_touches_nothing(operator, control_api, namespace):
    first = rtc_manifest("first", namespace, tenant="tenant-f", argocd={"clusterName": "shared-name"})
    apply(operator.cluster, first)
    wait_condition(control_api, namespace, "first", "ArgoClusterRegistered", "True")
    before = argocd_secret(control_api, namespace, "first")

    second = rtc_manifest("second", namespace, tenant="tenant-g", argocd={"clusterName": "shared-name"})
    apply(operator.cluster, second)
    obj = wait_condition(control_api, namespace, "second", "Ready", "False", "Conflict")
    assert f"{namespace}/first" in condition(obj, "ArgoClusterRegistered")["message"]
    third = rtc_manifest("third", namespace, tenant="tenant-g", server=first["spec"]["server"])
    apply(operator.cluster, third)
    wait_condition(control_api, namespace, "third", "Ready", "False", "Conflict")

    time.sleep(4)  # at least one resync
    after = argocd_secret(control_api, namespace, "first")
    assert after.metadata.resource_version == before.metadata.resource_version
    for loser in ("second", "third"):
        assert not_found(k.CoreV1Api(control_api).read_namespaced_secret, f"keyless-{namespace}-{loser}", "argocd")
    events = kubectl(operator.cluster, "get", "events", "-n", namespace, "--field-selector",
                     "involvedObject.name=second", "-o", "json").stdout
    assert any(e["reason"] == "Conflict" and e["type"] == "Warning" for e in json.loads(events)["items"])


def test_preexisting_secret_not_created_by_keyless_is_never_overwritten(operator, control_api, namespace):
    core = k.CoreV1Api(control_api)
    server = f"https://hand-made.{namespace}.example.com"
    core.create_namespaced_secret("argocd", k.V1Secret(
        metadata=k.V1ObjectMeta(name=f"hand-made-{namespace}", labels={"argocd.argoproj.io/secret-type": "cluster"}),
        string_data={"name": "hand-made", "server": server, "config": "{}"}))
    apply(operator.cluster, rtc_manifest("claims", namespace, tenant="tenant-h", server=server))
    obj = wait_condition(control_api, namespace, "claims", "ArgoClusterRegistered", "False", "Conflict")
    assert f"hand-made-{namespace}" in condition(obj, "ArgoClusterRegistered")["message"]
    kept = core.read_namespaced_secret(f"hand-made-{namespace}", "argocd")
    assert base64.b64decode(kept.data["config"]) == b"{}"


def test_operator_never_mutates_spec_so_gitops_stays_synced(operator, control_api, namespace):
    manifest = rtc_manifest("gitops", namespace, tenant="tenant-i")
    apply(operator.cluster, manifest)
    obj = wait_condition(control_api, namespace, "gitops", "BrokerTargetRegistered", "True")
    assert obj["spec"] == manifest["spec"]  # no schema defaults were stored either
    assert obj["metadata"]["generation"] == 1
    assert not any(key.startswith("kopf.") for key in (obj["metadata"].get("annotations") or {}))
    assert "kopf" not in obj["status"]
    # Argo CD's own diff: a server-side dry-run apply of the same manifest changes nothing.
    dry = kubectl(operator.cluster, "diff", "-f", "-", input=yaml.safe_dump(manifest), check=False)
    assert dry.returncode == 0, dry.stdout


def test_unchanged_conditions_keep_their_transition_time(operator, control_api, namespace):
    apply(operator.cluster, rtc_manifest("stamp", namespace, tenant="tenant-j"))
    obj = wait_condition(control_api, namespace, "stamp", "BrokerTargetRegistered", "True")
    first = condition(obj, "ArgoClusterRegistered")["lastTransitionTime"]
    kubectl(operator.cluster, "label", "rtc", "stamp", "-n", namespace, "touched=yes")
    changed = get_rtc(control_api, namespace, "stamp")
    manifest = rtc_manifest("stamp", namespace, tenant="tenant-j", access={"clusterRole": "edit"})
    manifest["spec"]["caData"] = changed["spec"]["caData"]
    apply(operator.cluster, manifest)
    obj = eventually(lambda: (o := get_rtc(control_api, namespace, "stamp"))["status"]["observedGeneration"] == 2 and o)
    assert condition(obj, "ArgoClusterRegistered")["lastTransitionTime"] == first


def test_metrics_count_reconciles_and_tenants_by_condition(operator, control_api, namespace):
    apply(operator.cluster, rtc_manifest("metrics", namespace, tenant="tenant-k"))
    wait_condition(control_api, namespace, "metrics", "BrokerTargetRegistered", "True")
    text = operator.metrics()
    assert re.search(r'^keyless_reconcile_total\{reason="[^"]+"\} [1-9]', text, re.M)
    assert re.search(r'^keyless_reconcile_duration_seconds_count [1-9]', text, re.M)
    assert re.search(r'^keyless_tenant_clusters\{condition="ArgoClusterRegistered",status="True"\} [1-9]', text, re.M)


def test_steady_state_with_50_manifests_writes_nothing_for_a_quiet_minute(operator, control_api, namespace):
    from .helpers import apiserver_writes

    manifests = [rtc_manifest(f"quiet-{i}", namespace, tenant=f"quiet-{i % 5}") for i in range(50)]
    apply(operator.cluster, *manifests)

    def all_settled():
        items = k.CustomObjectsApi(control_api).list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
        return len(items) == 50 and all(
            (condition(o, "BrokerTargetRegistered") or {}).get("status") == "True"
            and (condition(o, "AppProjectReady") or {}).get("status") == "True" for o in items)

    eventually(all_settled, timeout=120, interval=1, message="50 manifests reconciled")

    def no_namespace_terminating():
        # Earlier tests' namespaces are deleted in the background (the namespace controller's
        # DELETEs, and the operator finalizing their manifests); that is not steady state.
        return all(n.status.phase != "Terminating" for n in k.CoreV1Api(control_api).list_namespace().items)

    eventually(no_namespace_terminating, timeout=120, interval=1, message="earlier namespaces gone")
    time.sleep(5)  # let in-flight AppProject updates of the last members land
    resources = {"secrets", "remotetenantclusters", "appprojects", "brokertargets", "events", "targets"}
    before = apiserver_writes(operator.cluster, resources)
    time.sleep(60)  # a quiet minute: ~20 resyncs of all 50 manifests at --resync-seconds=3
    after = apiserver_writes(operator.cluster, resources)
    writes = {key: n - before.get(key, 0) for key, n in after.items() if n != before.get(key, 0)}
    assert not writes, f"API writes in a quiet minute: {writes}"
    assert re.search(r'^keyless_reconcile_total\{reason="[^"]+"\} ([0-9.e+]+)', operator.metrics(), re.M)


def test_render_prints_exactly_what_the_operator_applies(operator, control_api, namespace, tmp_path):
    import subprocess

    from .operator_fixtures import KEYLESS

    manifest = rtc_manifest("rendered", namespace, tenant="tenant-r")
    apply(operator.cluster, manifest)
    wait_condition(control_api, namespace, "rendered", "BrokerTargetRegistered", "True")
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(manifest))
    out = subprocess.run([KEYLESS, "render", "-f", str(path)], capture_output=True, text=True, check=True).stdout
    rendered = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(out)}
    secret = rendered[("Secret", f"keyless-{namespace}-rendered")]
    live = argocd_secret(control_api, namespace, "rendered")
    assert secret["data"] == live.data
    assert {k: v for k, v in live.metadata.labels.items()} == secret["metadata"]["labels"]
    target = rendered[("BrokerTarget", f"{namespace}.rendered")]
    live_target = k.CustomObjectsApi(control_api).get_namespaced_custom_object(
        "keyless.dev", "v1alpha1", "keyless-system", "brokertargets", f"{namespace}.rendered")
    assert target["spec"] == live_target["spec"]


def test_secret_orphaned_by_a_force_deleted_manifest_is_removed_instead_of_blocking(operator, control_api, namespace):
    first = rtc_manifest("orphaner", namespace, tenant="tenant-o", argocd={"clusterName": "orphan-name"})
    apply(operator.cluster, first)
    wait_condition(control_api, namespace, "orphaner", "ArgoClusterRegistered", "True")
    operator.stop()  # the operator is down while someone removes the finalizer by hand
    try:
        kubectl(operator.cluster, "patch", "rtc", "orphaner", "-n", namespace, "--type=merge",
                "-p", '{"metadata":{"finalizers":null}}')
        kubectl(operator.cluster, "delete", "rtc", "orphaner", "-n", namespace, "--wait=true", "--timeout=30s")
        assert argocd_secret_data(control_api, namespace, "orphaner") is not None  # left behind
    finally:
        operator.start()
    apply(operator.cluster, rtc_manifest("successor", namespace, tenant="tenant-o", argocd={"clusterName": "orphan-name"}))
    wait_condition(control_api, namespace, "successor", "ArgoClusterRegistered", "True", timeout=60)
    assert argocd_secret_data(control_api, namespace, "orphaner") is None
