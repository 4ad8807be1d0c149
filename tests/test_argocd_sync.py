"""The real Argo CD (v3, application controller + repo-server + ApplicationSet controller) deploys through
Keyless: cluster Secrets written by the operator, credentials kept by the agent beside the controller (as
charts/keyless/argocd-values.yaml configures it), tenants in Direct mode trusting the broker, manifests
from a local git repository. One Argo CD and one set of clusters serve the whole module.
"""
from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request

import pytest

from keyless.envtest.argocd import NAMESPACE, write_parent_pid_logging_wrapper
from keyless.envtest.cluster import tail
from keyless.envtest.gitrepo import LocalGitRepository
from keyless.envtest.stack import KeylessStack, config_map_manifest, tenant_application_set
from keyless.envtest.tenants import TenantCluster

from . import conftest
from .argocd_checks import (ARGOCD_USER_AGENT, ApplicationMonitor, application, audit_time, controller_requests, credential_ids,
                            errors_of, exec_calls, sync_state, unauthenticated, wait_synced)
from .conftest import require_binary
from .helpers import eventually

pytestmark = [pytest.mark.cluster, require_binary("argocd"), require_binary("redis")]

# 30 s tokens (the shortest allowed) so that several lifetimes pass in a few minutes.
TTL = 30
TENANT_A = TenantCluster("tenant-a", "tenant-a-dev", token_ttl_seconds=TTL)
TENANT_B = TenantCluster("tenant-b", "tenant-b-dev", token_ttl_seconds=TTL)
APP_NAMESPACE = "hello"
COMMIT_EVERY = 20.0


class GitOps:
    """The running stack, the tenants' git repository and where the controller's exec calls are logged."""

    def __init__(self, stack: KeylessStack, repo: LocalGitRepository, exec_log):
        self.stack, self.repo, self.exec_log = stack, repo, exec_log
        self.revision = 0

    def app_name(self, cluster: TenantCluster) -> str:
        return f"{cluster.name}-{APP_NAMESPACE}"

    def tenant(self, cluster: TenantCluster):
        return self.stack.tenants[cluster.name]

    def commit(self, cluster: TenantCluster) -> tuple[str, str]:
        """A new revision of the tenant's ConfigMap; returns (sha, revision value)."""
        self.revision += 1
        value = str(self.revision)
        sha = self.repo.commit({f"{cluster.tenant}/hello.yaml": config_map_manifest(
            "hello", {"tenant": cluster.tenant, "revision": value})}, f"{cluster.tenant}: revision {value}")
        return sha, value

    def landed(self, cluster: TenantCluster) -> dict | None:
        return self.stack.get(self.tenant(cluster).cluster, "configmap", "hello", "-n", APP_NAMESPACE)

    def wait_landed(self, cluster: TenantCluster, sha: str, value: str, timeout: float = 120.0) -> None:
        def arrived():
            found = self.landed(cluster)
            return found is not None and found["data"].get("revision") == value
        eventually(arrived, timeout=timeout, interval=1, message=f"revision {value} on {cluster.name}")
        wait_synced(self.stack, self.app_name(cluster), sha)

    def credential_file(self, cluster: TenantCluster):
        return self.stack.argocd.credential_dir / f"{cluster.target}.json"


@pytest.fixture(scope="module")
def gitops(run_dir):
    base = run_dir / "argocd-sync"
    exec_log = base / "exec-calls.log"
    wrappers = base / "controller-path"
    write_parent_pid_logging_wrapper(wrappers, "cat", exec_log)
    stack = KeylessStack(base, [TENANT_A, TENANT_B], guardrails=True, controller_path_prefix=[wrappers])
    clusters = [conftest.started(c) for c in (stack.control, *(t.cluster for t in stack.tenants.values()))]
    repo = LocalGitRepository(base / "repo")
    stack.start()
    try:
        gitops = GitOps(stack, repo, exec_log)
        sha = repo.commit({f"{c.tenant}/hello.yaml": config_map_manifest("hello", {"tenant": c.tenant, "revision": "0"})
                           for c in (TENANT_A, TENANT_B)}, "both tenants: revision 0")
        for cluster in (TENANT_A, TENANT_B):
            stack.apply_cluster(cluster.name)
        for cluster in (TENANT_A, TENANT_B):
            stack.wait_ready(cluster.name)
            stack.apply(stack.control, tenant_application_set(cluster.tenant, repo.url, cluster.tenant, APP_NAMESPACE))
        for cluster in (TENANT_A, TENANT_B):
            wait_synced(stack, gitops.app_name(cluster), sha)
        yield gitops
    finally:
        stack.stop()
        for cluster in clusters:
            conftest._started.remove(cluster)


def test_application_syncs_through_keyless_secret_as_the_access_username_with_the_controllers_exec(gitops):
    stack = gitops.stack
    app = wait_synced(stack, gitops.app_name(TENANT_A))
    secret = stack.get(stack.control, "secret", TENANT_A.argocd_secret_name, "-n", NAMESPACE)
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    config = json.loads(data["config"])
    # The Application targets the cluster Secret Keyless wrote, and that Secret holds no credential at all.
    assert app["spec"]["destination"]["server"] == data["server"] == gitops.tenant(TENANT_A).cluster.server
    assert set(config) == {"tlsClientConfig", "execProviderConfig"}
    credential_path = f"{stack.argocd.exec_credential_dir}/{TENANT_A.target}.json"
    assert config["execProviderConfig"]["command"] == "cat"
    assert config["execProviderConfig"]["args"] == [credential_path]
    if stack.argocd.sandboxed:  # the operator rendered its default path, the one argocd-values.yaml mounts
        assert credential_path.startswith("/var/run/keyless/credentials/")

    landed = gitops.landed(TENANT_A)
    assert landed["data"]["tenant"] == "tenant-a"
    # The tenant's own audit log: the ConfigMap was created by the one identity, nobody else.
    creates = [e for e in gitops.tenant(TENANT_A).audit_events()
               if e["verb"] == "create" and (e.get("objectRef") or {}).get("resource") == "configmaps"
               and e["objectRef"].get("namespace") == APP_NAMESPACE and e["responseStatus"]["code"] == 201]
    assert creates and {e["user"]["username"] for e in creates} == {TENANT_A.username}
    assert all(e["userAgent"].startswith(ARGOCD_USER_AGENT) for e in creates)

    # Every `cat` of this cluster's credential file was run by the application controller process.
    calls = [c for c in exec_calls(gitops.exec_log) if c.args == credential_path]
    assert calls, f"the controller never ran the exec command; wrapper log {gitops.exec_log}"
    assert {c.parent_pid for c in calls} == {stack.argocd.controller_pid}


def test_applicationset_cluster_generator_selects_exactly_each_tenants_keyless_clusters(gitops):
    stack = gitops.stack
    for cluster, other in ((TENANT_A, TENANT_B), (TENANT_B, TENANT_A)):
        selected = stack.get(stack.control, "secret", "-n", NAMESPACE, "-l",
                             f"argocd.argoproj.io/secret-type=cluster,keyless.dev/tenant={cluster.tenant}")["items"]
        assert [s["metadata"]["name"] for s in selected] == [cluster.argocd_secret_name]
        generated = [a for a in stack.get(stack.control, "applications", "-n", NAMESPACE)["items"]
                     if any(o["kind"] == "ApplicationSet" and o["name"] == cluster.tenant
                            for o in a["metadata"].get("ownerReferences", []))]
        assert [(a["metadata"]["name"], a["spec"]["destination"]["server"], a["spec"]["project"]) for a in generated] == [
            (gitops.app_name(cluster), gitops.tenant(cluster).cluster.server, cluster.tenant)]
        assert gitops.tenant(other).cluster.server not in {a["spec"]["destination"]["server"] for a in generated}


def _cross_tenant_application(name: str, target: TenantCluster, gitops: GitOps) -> dict:
    return {"apiVersion": "argoproj.io/v1alpha1", "kind": "Application",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"project": TENANT_A.tenant,
                     "source": {"repoURL": gitops.repo.url, "targetRevision": "main", "path": TENANT_A.tenant},
                     "destination": {"server": gitops.tenant(target).cluster.server, "namespace": "stolen"},
                     "syncPolicy": {"automated": {}, "syncOptions": ["CreateNamespace=true"]}}}


def test_tenant_application_aimed_at_another_tenants_cluster_is_refused_and_lands_nothing(gitops):
    stack = gitops.stack
    started = time.time()
    # A tenant user may write Applications on the control plane; the guardrail webhook refuses this one.
    stack.apply(stack.control, {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": "tenant-a-developer"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "alice@tenant-a"}]})
    refused = stack.apply(stack.control, _cross_tenant_application("steal-by-user", TENANT_B, gitops),
                          as_user="alice@tenant-a", check=False)
    assert refused.returncode != 0 and "denied the request" in refused.stderr, refused.stderr
    assert application(stack, "steal-by-user") is None

    # Past the webhook (an admin is exempt), Argo CD's AppProject refuses it: tenant-a's project does not
    # include tenant-b's cluster, and Argo CD never contacts that cluster.
    stack.apply(stack.control, _cross_tenant_application("steal-by-admin", TENANT_B, gitops))
    try:
        def refused_by_argocd():
            errors = errors_of(application(stack, "steal-by-admin"))
            return [e for e in errors if e.startswith("InvalidSpecError") and "tenant-a" in e]
        refusal = eventually(refused_by_argocd, timeout=60, interval=1, message="Argo CD refuses the destination")
        assert gitops.tenant(TENANT_B).cluster.server in refusal[0] or "not permitted" in refusal[0], refusal
        assert sync_state(application(stack, "steal-by-admin"))[0] != "Synced"
    finally:
        stack.kubectl(stack.control, "delete", "application", "steal-by-admin", "-n", NAMESPACE, "--wait=false")
    tenant_b = gitops.tenant(TENANT_B)
    assert stack.get(tenant_b.cluster, "namespace", "stolen") is None
    foreign = [e for e in tenant_b.audit_events()
               if audit_time(e) >= started and (e.get("user") or {}).get("username") != TENANT_B.username]
    assert foreign == [], foreign[:3]


@pytest.mark.timeout(900)
def test_credentials_roll_for_five_token_lifetimes_while_argocd_keeps_syncing_without_errors(gitops):
    stack, tenant = gitops.stack, gitops.tenant(TENANT_A)
    name = gitops.app_name(TENANT_A)
    unauthorized_before = stack.argocd.log_path("application-controller").read_text().count("Unauthorized")
    started = time.time()
    with ApplicationMonitor(stack, [name]) as monitor:
        # A commit every ~20 s, each awaited on the tenant, until the controller has gone through at least
        # five credentials over at least five token lifetimes (bounded: ten lifetimes at most).
        while True:
            commit_at = time.monotonic()
            sha, value = gitops.commit(TENANT_A)
            gitops.wait_landed(TENANT_A, sha, value)
            requests = controller_requests(tenant.audit_events(), TENANT_A.username, start=started)
            used = credential_ids(requests)
            span = time.time() - started
            if span >= 5 * TTL and len(used) >= 5:
                break
            assert span < 10 * TTL, f"only {len(used)} credentials used in {span:.0f}s of syncing"
            time.sleep(max(0.0, COMMIT_EVERY - (time.monotonic() - commit_at)))
        ended = time.time()
    assert monitor.polls > 0 and monitor.errors_between(started, ended) == []
    assert unauthenticated(tenant.audit_events(), started, ended) == []
    assert stack.argocd.log_path("application-controller").read_text().count("Unauthorized") == unauthorized_before
    # Each new credential came from the controller running `cat` on the agent's file.
    path = f"{stack.argocd.exec_credential_dir}/{TENANT_A.target}.json"
    calls = [c for c in exec_calls(gitops.exec_log) if c.args == path and started <= c.at <= ended]
    assert len(calls) >= len(used) - 1 and {c.parent_pid for c in calls} == {stack.argocd.controller_pid}


def _agent_ready(stack: KeylessStack) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"{stack.argocd.agent_health_url}/readyz", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.timeout(900)
def test_broker_outage_shorter_than_credential_life_is_invisible_longer_is_a_clear_error_then_recovers(gitops):
    stack, tenant = gitops.stack, gitops.tenant(TENANT_A)
    name = gitops.app_name(TENANT_A)
    credential = gitops.credential_file(TENANT_A)
    with ApplicationMonitor(stack, [name]) as monitor:
        # Short: the broker stops right after the agent renewed the file, for half a token lifetime.
        renewed = credential.stat().st_mtime_ns
        eventually(lambda: credential.stat().st_mtime_ns != renewed, timeout=2 * TTL, interval=0.2,
                   message="the agent renews the credential")
        short_start = time.time()
        stack.stop_broker()
        sha, value = gitops.commit(TENANT_A)
        time.sleep(max(0.0, short_start + TTL / 2 - time.time()))
        stack.start_broker()
        gitops.wait_landed(TENANT_A, sha, value)
        # Argo CD keeps syncing across the next renewals.
        for _ in range(2):
            time.sleep(COMMIT_EVERY)
            sha, value = gitops.commit(TENANT_A)
            gitops.wait_landed(TENANT_A, sha, value)
        short_end = time.time()
        assert monitor.errors_between(short_start, short_end) == []
        assert unauthenticated(tenant.audit_events(), short_start, short_end) == []

        # Long: the broker stays down past a token lifetime while a commit comes every ~20 s, until Argo CD
        # reports the failure (bounded by four lifetimes).
        long_start = time.time()
        stack.stop_broker()
        try:
            while True:
                sha, value = gitops.commit(TENANT_A)
                deadline = time.monotonic() + COMMIT_EVERY
                errors = []
                while time.monotonic() < deadline and not errors:
                    errors = [e for e in monitor.errors_between(long_start, time.time()) if e.application == name]
                    time.sleep(1)
                if errors:
                    break
                assert time.time() - long_start < 4 * TTL, "Argo CD showed no error with the broker down"
            # Argo CD says it could not get credentials from the exec command; the agent says for which
            # cluster and why (its readiness), so the operator of Argo CD knows where to look.
            assert any("getting credentials" in e.message and "cat" in e.message for e in errors), \
                [e.message for e in errors]
            status, text = _agent_ready(stack)
            assert status == 503 and TENANT_A.target in text and "broker unavailable" in text, text
        finally:
            stack.start_broker()
        # By itself: the agent renews, Argo CD retries, the change lands, the error clears.
        gitops.wait_landed(TENANT_A, sha, value, timeout=6 * TTL)
        eventually(lambda: errors_of(application(stack, name)) == [], timeout=2 * TTL, interval=1,
                   message="the Application's error clears")
        # Fail closed, before the tenant: the credential was removed at its stated expiry, never presented late.
        assert unauthenticated(tenant.audit_events(), long_start, time.time()) == []


def test_deleting_remote_tenant_cluster_removes_it_from_argocd_cleanly(gitops):
    stack = gitops.stack
    server_b = gitops.tenant(TENANT_B).cluster.server

    def cluster_known() -> bool:
        return any(line.startswith("argocd_cluster_info{") and f'server="{server_b}"' in line
                   for line in stack.argocd.controller_metrics().splitlines())

    assert cluster_known() and application(stack, gitops.app_name(TENANT_B)) is not None
    stack.delete_cluster(TENANT_B.name)
    assert stack.get(stack.control, "secret", TENANT_B.argocd_secret_name, "-n", NAMESPACE) is None
    # Argo CD's own view: the generator drops the Application (nothing stuck on a finalizer), the controller
    # forgets the cluster, the ApplicationSet reports no error, and the other tenant keeps syncing.
    try:
        eventually(lambda: application(stack, gitops.app_name(TENANT_B)) is None, timeout=120, interval=1,
                   message="the generated Application is deleted")
    except AssertionError as e:
        left = application(stack, gitops.app_name(TENANT_B)) or {}
        log = stack.argocd.log_path("applicationset-controller")
        raise AssertionError(f"{e}\nApplication metadata: {left.get('metadata')}\n"
                             f"----- applicationset-controller ({log}) -----\n{tail(log, 40)}") from None
    eventually(lambda: not cluster_known(), timeout=120, interval=1, message="the controller forgets the cluster")
    appset = stack.get(stack.control, "applicationset", TENANT_B.tenant, "-n", NAMESPACE)
    assert [c for c in appset["status"].get("conditions", []) if c["type"] == "ErrorOccurred" and c["status"] == "True"] == []
    sha, value = gitops.commit(TENANT_A)
    gitops.wait_landed(TENANT_A, sha, value)
    remaining = [a["metadata"]["name"] for a in stack.get(stack.control, "applications", "-n", NAMESPACE)["items"]]
    assert remaining == [gitops.app_name(TENANT_A)]
