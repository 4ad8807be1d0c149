"""Migrating a cluster registered with a static bearer token to Keyless without downtime (docs/OPERATIONS.md).

An admin marks the existing Argo CD cluster Secret `keyless.dev/adopt-by: <namespace>/<name>`; the manifest
of that name registers the same server; once its chain is verified, the operator replaces the Secret's
credential in place, applies its own Secret and deletes the marked one. A watch started before the migration
records every event of the Argo CD cluster Secrets: at no moment is the server without a Secret holding a
credential, and at the end Keyless's Secret (exec, no token) is the only one. A tenant cannot make the
operator take over a Secret not marked for its manifest, nor one of another server.
"""
from __future__ import annotations

import base64
import json
import threading
import time
import uuid

import pytest
from kubernetes import client as k
from kubernetes import watch as kwatch
from kubernetes.client.rest import ApiException

from keyless.model.spec import parse
from keyless.reconcile.conflicts import adoptable, adoption_problem, find_secret_conflict
from keyless.reconcile.context import ArgoClusterSecret
from keyless.render.argocd import render_adoption_patch, render_argocd_cluster_secret
from keyless.settings import ExecSettings

from .chain_fixtures import running_chain
from .helpers import eventually, kubectl
from .operator_fixtures import apply, rtc_manifest, tenant_namespace

NAMESPACE = "tenants-adopt"
TENANT = "tenant-adopt"
SELECTOR = "argocd.argoproj.io/secret-type=cluster"


# ---- the pure rules ---------------------------------------------------------------------------------------------
def _cluster(name="prod", namespace=NAMESPACE, server="https://prod.example.com", **argocd):
    return parse({"apiVersion": "keyless.dev/v1alpha1", "kind": "RemoteTenantCluster",
                  "metadata": {"name": name, "namespace": namespace},
                  "spec": {"tenant": TENANT, "server": server, "argocd": argocd, "proxy": {"mode": "External"},
                           "access": {"clusterRole": "view"}}})


def _static_secret(name="cluster-prod", server="https://prod.example.com", cluster_name="prod",
                   adopt_by: str | None = f"{NAMESPACE}/prod", **extra_data) -> dict:
    data = {"name": cluster_name, "server": server,
            "config": json.dumps({"bearerToken": "static-token", "tlsClientConfig": {"insecure": False}}), **extra_data}
    annotations = {"kubectl.kubernetes.io/last-applied-configuration": json.dumps({"data": data})}
    if adopt_by:
        annotations["keyless.dev/adopt-by"] = adopt_by
    return {"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": "argocd", "uid": "u-1", "resourceVersion": "42",
                         "labels": {"argocd.argoproj.io/secret-type": "cluster"}, "annotations": annotations},
            "data": {key: base64.b64encode(value.encode()).decode() for key, value in data.items()}}


def test_only_a_secret_marked_for_this_manifest_with_its_server_and_cluster_name_is_adoptable():
    cluster = _cluster()
    assert adoptable(cluster, ArgoClusterSecret.of(_static_secret()))
    assert find_secret_conflict(cluster, "keyless-x", [ArgoClusterSecret.of(_static_secret())]) is None
    # Marked for another manifest (another namespace, i.e. another tenant's or no one's): in the way.
    for mark in (None, "tenants-mallory/prod", f"{NAMESPACE}/other", f"{NAMESPACE}/prod/x"):
        secret = ArgoClusterSecret.of(_static_secret(adopt_by=mark))
        assert not adoptable(cluster, secret)
        assert "already registers server" in find_secret_conflict(cluster, "keyless-x", [secret])
    # Marked for this manifest but for another server: never adopted, and not in the way.
    other_server = ArgoClusterSecret.of(_static_secret(server="https://elsewhere.example.com", cluster_name="else"))
    assert not adoptable(cluster, other_server) and "not spec.server" in adoption_problem(cluster, other_server)
    assert find_secret_conflict(cluster, "keyless-x", [other_server]) is None
    # Same server under another cluster name: Applications naming the cluster would lose it.
    renamed = ArgoClusterSecret.of(_static_secret(cluster_name="legacy-prod"))
    assert "set spec.argocd.clusterName to 'legacy-prod'" in find_secret_conflict(cluster, "keyless-x", [renamed])
    assert adoptable(_cluster(clusterName="legacy-prod"), renamed)
    # A Secret Keyless owns is never "adopted", whatever its annotations say.
    owned = _static_secret()
    owned["metadata"]["labels"]["app.kubernetes.io/managed-by"] = "keyless"
    owned["metadata"]["annotations"]["keyless.dev/owner"] = "tenants-mallory/prod"
    assert ArgoClusterSecret.of(owned).adopt_by is None and not adoptable(cluster, ArgoClusterSecret.of(owned))


def test_the_takeover_patch_replaces_every_credential_in_one_write_of_exactly_the_version_read():
    cluster = _cluster()
    live = _static_secret(namespaces="default", clusterResources="false")
    desired = render_argocd_cluster_secret(cluster, ExecSettings(), None)
    patch = render_adoption_patch(live, desired)
    assert patch["metadata"]["uid"] == "u-1" and patch["metadata"]["resourceVersion"] == "42"
    assert patch["data"]["namespaces"] is None and patch["data"]["clusterResources"] is None
    assert {k: v for k, v in patch["data"].items() if v is not None} == desired["data"]
    config = json.loads(base64.b64decode(patch["data"]["config"]))
    assert "bearerToken" not in config and "execProviderConfig" in config
    annotations = patch["metadata"]["annotations"]
    assert annotations["kubectl.kubernetes.io/last-applied-configuration"] is None
    assert annotations["keyless.dev/adopt-by"] is None and annotations["keyless.dev/owner"] == cluster.ref
    assert patch["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "keyless"
    assert "static-token" not in json.dumps(patch)


# ---- against the real API server and operator ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def chain(control_plane, control_api, run_dir):
    with running_chain(control_plane, control_api, run_dir / "adopt-chain", NAMESPACE, f"keyless:{NAMESPACE}:prod",
                       "adopt-tenant", "--adopt-grace-seconds=8") as running:
        yield running


def _has_credential(data: dict) -> bool:
    try:
        config = json.loads(base64.b64decode(data.get("config") or ""))
    except ValueError:
        return False
    return bool(config.get("bearerToken") or config.get("execProviderConfig"))


def _server(data: dict) -> str:
    return base64.b64decode(data.get("server") or "").decode().rstrip("/")


class SecretRecorder:
    """Lists the Argo CD cluster Secrets, then watches them from that version, recording every event."""

    def __init__(self, api):
        self.core = k.CoreV1Api(api)
        listed = self.core.list_namespaced_secret("argocd", label_selector=SELECTOR)
        self.initial = {s.metadata.name: dict(s.data or {}) for s in listed.items}
        self.version = listed.metadata.resource_version
        self.events: list[tuple[str, str, dict]] = []
        self.error: Exception | None = None
        self.resumed: list[str] = []
        self.stopped = False
        self.watch = kwatch.Watch()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        # As an informer does: a watch the API server closes (or that breaks) resumes from the last version
        # seen, so no event is missed; a version too old to resume from (410) is an error the test reports.
        while not self.stopped:
            try:
                for event in self.watch.stream(self.core.list_namespaced_secret, "argocd", label_selector=SELECTOR,
                                               resource_version=self.version, timeout_seconds=600):
                    secret = event["object"]
                    self.version = secret.metadata.resource_version
                    self.events.append((event["type"], secret.metadata.name, dict(secret.data or {})))
            except ApiException as e:
                self.error = e
                return
            except Exception as e:  # noqa: BLE001 - a broken connection: resume unless stopping
                if self.stopped:
                    return
                self.resumed.append(repr(e))
                time.sleep(0.2)

    def stop(self):
        self.stopped = True
        self.watch.stop()

    def states(self, server: str):
        """The Secrets registering `server` before the migration and after each event."""
        current = {name: data for name, data in self.initial.items() if _server(data) == server}
        yield "initial", dict(current)
        for kind, name, data in self.events:
            if kind == "DELETED" or _server(data) != server:
                current.pop(name, None)
            else:
                current[name] = data
            yield f"{kind} {name}", dict(current)


@pytest.mark.cluster
def test_a_static_token_secret_is_taken_over_without_a_moment_without_credential(chain):
    core = k.CoreV1Api(chain.control_api)
    server = chain.tenant.server.rstrip("/")
    static = f"static-{uuid.uuid4().hex}"
    ca = base64.b64encode(chain.tenant.ca_pem).decode()
    old = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
           "metadata": {"name": "cluster-prod-static", "namespace": "argocd",
                        "labels": {"argocd.argoproj.io/secret-type": "cluster"}},
           "stringData": {"name": "prod", "server": server,
                          "config": json.dumps({"bearerToken": static, "tlsClientConfig": {"caData": ca}})}}
    # How such Secrets usually came to be: kubectl apply (its last-applied copy holds the token too).
    kubectl(chain.control, "apply", "-f", "-", input=json.dumps(old))
    recorder = SecretRecorder(chain.control_api)
    assert [n for n, d in recorder.initial.items() if _server(d) == server] == ["cluster-prod-static"]

    # The platform admin marks the old Secret for the manifest, then the manifest is applied.
    kubectl(chain.control, "annotate", "secret", "-n", "argocd", "cluster-prod-static",
            f"keyless.dev/adopt-by={NAMESPACE}/prod")
    apply(chain.control, {"apiVersion": "keyless.dev/v1alpha1", "kind": "RemoteTenantCluster",
                          "metadata": {"name": "prod", "namespace": NAMESPACE},
                          "spec": {"tenant": TENANT, "server": server, "caData": ca,
                                   "access": {"clusterRole": "view", "username": f"keyless:{TENANT}:prod"},
                                   "proxy": {"mode": "Direct"}}})
    adopting = chain.wait("prod", "ArgoClusterRegistered", "False", "Adopting")
    assert "argocd/cluster-prod-static" in adopting["message"]
    # While Adopting (the chain proven for less than --adopt-grace-seconds), the old Secret serves alone, untouched.
    untouched = core.read_namespaced_secret("cluster-prod-static", "argocd")
    own = [s.metadata.name for s in core.list_namespaced_secret("argocd", label_selector=SELECTOR).items
           if s.metadata.name == f"keyless-{NAMESPACE}-prod"]
    if chain.condition("prod", "ArgoClusterRegistered")["reason"] == "Adopting":
        assert json.loads(base64.b64decode(untouched.data["config"]))["bearerToken"] == static
        assert own == []
    chain.wait("prod", "TokenVerified", "True", "Verified")
    registered = chain.wait("prod", "ArgoClusterRegistered", "True", "Registered", timeout=90)
    assert f"argocd/keyless-{NAMESPACE}-prod" in registered["message"]
    # The take-over is said once, by the reconcile that did it (the condition message is rewritten by the
    # next reconcile, which has nothing left to take over): the Events are the lasting record.
    eventually(lambda: any(e.reason == "Applied" and (
        "Took over Argo CD cluster Secret argocd/cluster-prod-static" in e.message) for e in core.list_namespaced_event(
        NAMESPACE, field_selector="involvedObject.name=prod").items), message="an Event says the Secret was taken over")
    eventually(lambda: any(kind == "DELETED" and name == "cluster-prod-static" for kind, name, _ in recorder.events),
               message="the watch saw the old Secret deleted")
    chain.operator.wait_for_resyncs(2)
    recorder.stop()

    timeline = list(recorder.states(server))
    for step, secrets in timeline:
        assert any(_has_credential(data) for data in secrets.values()), f"no credential for {server} after {step}"
    assert recorder.error is None, recorder.error
    # The order: the old Secret's credential replaced in place, then Keyless's Secret, then the old one deleted.
    steps = [step for step, _ in timeline]
    took_over = next(i for i, (step, secrets) in enumerate(timeline) if step == "MODIFIED cluster-prod-static"
                     and "execProviderConfig" in json.loads(base64.b64decode(secrets["cluster-prod-static"]["config"])))
    created = steps.index(f"ADDED keyless-{NAMESPACE}-prod")
    assert took_over < created < steps.index("DELETED cluster-prod-static"), steps
    assert all(set(secrets) == {"cluster-prod-static"} for secrets in (s for _, s in timeline[:took_over])), steps
    final = timeline[-1][1]
    assert list(final) == [f"keyless-{NAMESPACE}-prod"], timeline[-1]
    config = json.loads(base64.b64decode(final[f"keyless-{NAMESPACE}-prod"]["config"]))
    assert "bearerToken" not in config and config["execProviderConfig"]["command"] == "cat"
    live = [s for s in core.list_namespaced_secret("argocd", label_selector=SELECTOR).items
            if _server(s.data) == server]
    assert [s.metadata.name for s in live] == [f"keyless-{NAMESPACE}-prod"]
    chain.wait("prod", "Ready", "True", "Reconciled")

    # The static token never reached a log, an Event, a status or a Secret Keyless wrote.
    assert static not in chain.operator.log()
    events = kubectl(chain.control, "get", "events", "-A", "-o", "json").stdout
    assert static not in events and "Took over Argo CD cluster Secret argocd/cluster-prod-static" in events
    assert static not in json.dumps(chain.rtc("prod"))
    assert static not in json.dumps(k.ApiClient().sanitize_for_serialization(live))


@pytest.mark.cluster
def test_a_tenant_cannot_make_the_operator_take_over_a_secret_not_marked_for_its_manifest(chain):
    """mallory names a victim's server (registered with a static token and marked for the rightful manifest,
    which has the same name in another namespace): she gets Conflict, the Secret is not written to."""
    core = k.CoreV1Api(chain.control_api)
    victim_server = "https://victim.adopt.example.com"
    core.create_namespaced_secret("argocd", k.V1Secret(
        metadata=k.V1ObjectMeta(name="cluster-victim", labels={"argocd.argoproj.io/secret-type": "cluster"},
                                annotations={"keyless.dev/adopt-by": f"{NAMESPACE}/victim"}),
        string_data={"name": "victim", "server": victim_server,
                     "config": json.dumps({"bearerToken": "victim-token"})}))
    before = core.read_namespaced_secret("cluster-victim", "argocd")
    mallory_ns = tenant_namespace(chain.control, "tenants-mallory-adopt", "mallory")
    apply(chain.control, rtc_manifest("victim", mallory_ns, tenant="mallory", server=victim_server))
    obj = eventually(lambda: _condition(chain, mallory_ns, "victim", "ArgoClusterRegistered", "Conflict"),
                     message="mallory's manifest in Conflict")
    assert "cluster-victim" in obj["message"] and "victim-token" not in obj["message"]
    chain.operator.wait_for_resyncs(2)
    after = core.read_namespaced_secret("cluster-victim", "argocd")
    assert after.metadata.resource_version == before.metadata.resource_version
    assert after.data == before.data
    with pytest.raises(ApiException) as missing:
        core.read_namespaced_secret(f"keyless-{mallory_ns}-victim", "argocd")
    assert missing.value.status == 404
    kubectl(chain.control, "delete", "rtc", "victim", "-n", mallory_ns, "--wait=true", "--timeout=60s")
    core.delete_namespaced_secret("cluster-victim", "argocd")


def _condition(chain, namespace, name, kind, reason):
    obj = k.CustomObjectsApi(chain.control_api).get_namespaced_custom_object(
        "keyless.dev", "v1alpha1", namespace, "remotetenantclusters", name)
    found = [c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == kind]
    assert found and found[0]["reason"] == reason, found
    return found[0]
