"""The operator's control-plane side against a real API server: Argo CD Secret, AppProject, status."""
from __future__ import annotations

import base64
import json
import re

import pytest
import yaml
from cryptography import x509
from kubernetes import client as k
from kubernetes.client.rest import ApiException

from .helpers import apiserver_requests, apiserver_writes, eventually, kubectl
from .operator_fixtures import (OperatorProcess, apply, assert_applied_as_rendered, prepare_control_plane,
                                remove_all_remote_tenant_clusters, render_as, rtc_manifest, tenant_namespace)

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
                           argocd={"labels": {"environment": "production"}, "project": "tenant-c.prod"},
                           access={"clusterRole": "view", "tokenTTLSeconds": 120})
    changed["spec"]["caData"] = get_rtc(control_api, namespace, "upd")["spec"]["caData"]
    apply(operator.cluster, changed)

    def followed():
        secret = argocd_secret(control_api, namespace, "upd")
        target = k.CustomObjectsApi(control_api).get_namespaced_custom_object(
            "keyless.dev", "v1alpha1", "keyless-system", "brokertargets", f"{namespace}.upd")
        return (secret.metadata.labels.get("environment") == "production"
                and decode(secret)["project"] == "tenant-c.prod"
                and target["spec"]["tokenTTLSeconds"] == 120)

    eventually(followed, message="Secret and BrokerTarget follow the spec")
    obj = wait_condition(control_api, namespace, "upd", "AppProjectReady", "True")
    assert obj["status"]["observedGeneration"] == 2
    k.CustomObjectsApi(control_api).get_namespaced_custom_object(
        "argoproj.io", "v1alpha1", "argocd", "appprojects", "tenant-c.prod")
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

    second = rtc_manifest("second", namespace, tenant="tenant-f", argocd={"clusterName": "shared-name"})
    apply(operator.cluster, second)
    obj = wait_condition(control_api, namespace, "second", "Ready", "False", "Conflict")
    assert f"{namespace}/first" in condition(obj, "ArgoClusterRegistered")["message"]
    third = rtc_manifest("third", namespace, tenant="tenant-f", server=first["spec"]["server"])
    apply(operator.cluster, third)
    wait_condition(control_api, namespace, "third", "Ready", "False", "Conflict")

    operator.wait_for_resyncs(2)  # the conflict is decided again, twice, and still touches nothing
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
    assert re.search(r'^keyless_operator_reconciles_total\{reason="[^"]+"\} [1-9]', text, re.M)
    assert re.search(r'^keyless_operator_reconcile_duration_seconds_count [1-9]', text, re.M)
    assert re.search(r'^keyless_operator_tenant_clusters\{condition="ArgoClusterRegistered",status="True"\} [1-9]', text, re.M)


def test_a_bad_manifest_gets_one_event_and_one_log_line_however_often_it_is_reconciled(operator, control_api,
                                                                                       namespace):
    """Issue 16 (7): a problem is reported once. Every resync reconciles the broken manifest again, but it
    gets exactly one Event (not one per condition, not one per round) and one INFO line that names
    namespace/name, the condition and the reason; a fix is one more line, and a new problem one more Event."""
    not_a_certificate = base64.b64encode(b"not a certificate").decode()
    manifest = rtc_manifest("broken", namespace, tenant="tenant-ev", caData=not_a_certificate)
    apply(operator.cluster, manifest)
    wait_condition(control_api, namespace, "broken", "Ready", "False", "InvalidSpec")
    operator.wait_for_resyncs(4)

    def events():
        text = kubectl(operator.cluster, "get", "events", "-n", namespace, "--field-selector",
                       "involvedObject.name=broken", "-o", "json").stdout
        return sorted(json.loads(text)["items"], key=lambda e: e["metadata"]["creationTimestamp"])

    found = events()
    assert [(e["type"], e["reason"]) for e in found] == [("Warning", "InvalidSpec")], \
        [(e["reason"], e["message"]) for e in found]
    assert "spec.caData" in found[0]["message"]

    def lines(*words):
        return [line for line in operator.log().splitlines()
                if " INFO keyless" in line and f"{namespace}/broken" in line and all(w in line for w in words)]

    logged = lines()
    assert len(logged) == 1, logged
    assert re.search(r"\b(ArgoClusterRegistered|Ready)=False\b", logged[0]) and "InvalidSpec" in logged[0], logged

    # A different problem: one more Event and one more line; still nothing repeated over resyncs.
    manifest["spec"]["caData"] = base64.b64encode(b"-----BEGIN CERTIFICATE-----\nbm9wZQ==\n"
                                                  b"-----END CERTIFICATE-----\n").decode()
    apply(operator.cluster, manifest)
    eventually(lambda: len(events()) == 2, timeout=30, message="an Event for the new problem")
    operator.wait_for_resyncs(3)
    assert [e["reason"] for e in events()] == ["InvalidSpec", "InvalidSpec"]
    assert "X.509" in events()[1]["message"]
    assert len(lines()) == 2, lines()

    # Fixed: one line saying what changed; no Warning.
    manifest["spec"]["caData"] = rtc_manifest("x", namespace)["spec"]["caData"]
    apply(operator.cluster, manifest)
    wait_condition(control_api, namespace, "broken", "ArgoClusterRegistered", "True")
    operator.wait_for_resyncs(2)
    reasons = [e["reason"] for e in events() if e["type"] == "Warning"]
    assert reasons.count("InvalidSpec") == 2 and len(reasons) == len(set(reasons)) + 1, reasons  # none repeated
    assert len(lines()) >= 3 and not [line for line in lines() if "Handler" in line]


def test_steady_state_with_50_manifests_writes_nothing_while_20_resyncs_reconcile_each_of_them(
        operator, control_api, namespace):
    # Five tenants, each with its own namespace (the test's namespace is the first one's).
    namespaces = [namespace] + [tenant_namespace(operator.cluster, f"{namespace}-q{t}", f"quiet-{t}") for t in range(1, 5)]
    tenant_namespace(operator.cluster, namespace, "quiet-0")
    manifests = [rtc_manifest(f"quiet-{i}", namespaces[i % 5], tenant=f"quiet-{i % 5}") for i in range(50)]
    apply(operator.cluster, *manifests)

    def all_settled():
        items = [o for ns in namespaces for o in k.CustomObjectsApi(control_api).list_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL)["items"]]
        return len(items) == 50 and all(
            (condition(o, "BrokerTargetRegistered") or {}).get("status") == "True"
            and (condition(o, "AppProjectReady") or {}).get("status") == "True" for o in items)

    eventually(all_settled, timeout=120, interval=1, message="50 manifests reconciled")

    def no_namespace_terminating():
        # Earlier tests' namespaces are deleted in the background (the namespace controller's
        # DELETEs, and the operator finalizing their manifests); that is not steady state.
        return all(n.status.phase != "Terminating" for n in k.CoreV1Api(control_api).list_namespace().items)

    eventually(no_namespace_terminating, timeout=120, interval=1, message="earlier namespaces gone")
    # Two whole rounds, so the AppProject updates of the last members to join have landed.
    operator.wait_for_resyncs(2)
    resources = {"secrets", "remotetenantclusters", "appprojects", "brokertargets", "events", "targets"}
    before = apiserver_writes(operator.cluster, resources)
    reconciles_before = operator.metric("keyless_operator_reconciles_total")
    resyncs_before = operator.metric("keyless_operator_resyncs_total")
    # About a quiet minute at --resync-seconds=3: 20 rounds, each reconciling every manifest again.
    resyncs_after = operator.wait_for_resyncs(20, timeout=240)
    after = apiserver_writes(operator.cluster, resources)
    reconciles = operator.metric("keyless_operator_reconciles_total") - reconciles_before
    writes = {key: n - before.get(key, 0) for key, n in after.items() if n != before.get(key, 0)}
    assert not writes, f"API writes while nothing changed: {writes}"
    # The rounds really ran: every round reconciled all 50 (and any other manifest the operator knows).
    assert reconciles >= 50 * (resyncs_after - resyncs_before) >= 50 * 20, reconciles
    for extra in namespaces[1:]:
        k.CoreV1Api(control_api).delete_namespace(extra)


def test_keyless_render_with_the_operators_flags_prints_every_object_it_applied_byte_for_byte(
        operator, control_api, namespace, tmp_path):
    manifest = rtc_manifest("rendered", namespace, tenant="tenant-r", argocd={"labels": {"tier": "gold"}})
    apply(operator.cluster, manifest)
    wait_condition(control_api, namespace, "rendered", "AppProjectReady", "True")
    wait_condition(control_api, namespace, "rendered", "BrokerTargetRegistered", "True")
    rendered = render_as(operator, [manifest], tmp_path)
    assert [o["kind"] for o in rendered] == ["Secret", "AppProject", "BrokerTarget"]
    assert assert_applied_as_rendered(rendered, lambda _: operator.cluster) == 3


def test_a_request_the_api_refuses_waits_for_a_change_of_the_manifest_instead_of_being_retried(
        operator, control_api, namespace):
    """A 422 from an admission policy is permanent: the condition carries the API's words, and neither the
    retry timer (--retry-seconds=1) nor the resync (3 s) sends the same refused write again; a new
    generation of the manifest is tried at once."""
    policy = {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
              "metadata": {"name": f"refuse-{namespace}"},
              "spec": {"failurePolicy": "Fail",
                       "matchConstraints": {"resourceRules": [{
                           "apiGroups": ["keyless.dev"], "apiVersions": ["v1alpha1"],
                           "operations": ["CREATE", "UPDATE"], "resources": ["brokertargets"]}]},
                       "validations": [{"expression": f"object.spec.audience != 'keyless:{namespace}:refused'",
                                        "message": "this platform refuses the audience", "reason": "Invalid"}]}}
    binding = {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
               "metadata": {"name": f"refuse-{namespace}"},
               "spec": {"policyName": f"refuse-{namespace}", "validationActions": ["Deny"]}}
    kubectl(operator.cluster, "apply", "-f", "-", input=yaml.safe_dump_all([policy, binding]))
    probe = {"apiVersion": "keyless.dev/v1alpha1", "kind": "BrokerTarget",
             "metadata": {"name": f"probe-{namespace}", "namespace": "keyless-system"},
             "spec": {"audience": f"keyless:{namespace}:refused", "username": "keyless:x:y",
                      "allowedCallers": ["system:serviceaccount:a:b"],
                      "tokenTTLSeconds": 60, "clusterRef": {"namespace": namespace, "name": "x"}}}
    def policy_refuses() -> bool:
        return "this platform refuses" in kubectl(operator.cluster, "apply", "--dry-run=server", "-f", "-",
                                                  input=yaml.safe_dump(probe), check=False).stderr

    eventually(policy_refuses, message="the admission policy in effect")
    try:
        manifest = rtc_manifest("refused", namespace, tenant="tenant-refused",
                                access={"clusterRole": "view", "audience": f"keyless:{namespace}:refused"})
        apply(operator.cluster, manifest)
        obj = wait_condition(control_api, namespace, "refused", "BrokerTargetRegistered", "False", "Invalid")
        refused = condition(obj, "BrokerTargetRegistered")
        assert "HTTP 422" in refused["message"] and "this platform refuses the audience" in refused["message"]
        assert condition(obj, "Ready")["reason"] == "Invalid"
        assert condition(obj, "ArgoClusterRegistered")["status"] == "True"  # the other steps went on

        def refusals() -> int:
            return sum(apiserver_requests(operator.cluster, {"brokertargets"}, code="422").values())

        attempts = refusals()
        assert attempts >= 1
        operator.wait_for_resyncs(3)
        assert refusals() == attempts, "a permanently refused write was sent again without a change"
        assert operator.metric("keyless_operator_reconcile_retries_total", kind="permanent") >= 1

        # A change of the manifest is tried at once (and refused again, with the new generation).
        manifest["spec"]["argocd"]["labels"]["touched"] = "1"
        manifest["spec"]["caData"] = obj["spec"]["caData"]
        apply(operator.cluster, manifest)
        eventually(lambda: refusals() == attempts + 1, message="the new generation tried")
        obj = wait_condition(control_api, namespace, "refused", "BrokerTargetRegistered", "False", "Invalid")
        assert condition(obj, "BrokerTargetRegistered")["observedGeneration"] == 2
    finally:
        kubectl(operator.cluster, "delete", "validatingadmissionpolicybinding,validatingadmissionpolicy",
                f"refuse-{namespace}", check=False)
    # The platform lifted its policy: the next change of the manifest goes through.
    eventually(lambda: not policy_refuses(), message="the admission policy lifted")
    manifest["spec"]["argocd"]["labels"]["touched"] = "2"
    apply(operator.cluster, manifest)
    wait_condition(control_api, namespace, "refused", "BrokerTargetRegistered", "True", "Registered")


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
