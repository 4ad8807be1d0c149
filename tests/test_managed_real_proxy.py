"""Managed mode on the real kube-oidc-proxy: the Pods of the Deployment the operator rendered run on
a real node of each tenant cluster, and Argo CD's traffic reaches them through the proxy's Service
(ClusterIP, routed from the host through the node's kube-proxy), never the API server directly.

Two tenant clusters with a node each (A: cluster-admin identity, bootstrap deleted after install;
B: a narrow role), one broker reachable from the Pods, the operator and the agent on the host.
"""
from __future__ import annotations

import base64
import json
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
import yaml
from kubernetes import client as k
from kubernetes.client.rest import ApiException

from keyless.broker.keys import KEY_SECRET_NAME, KeySet
from keyless.broker.signing import SigningKey, TokenSigner
from keyless.envtest import binaries, node
from keyless.envtest.cluster import LocalCluster, free_port, start_clusters, start_process, stop_process
from keyless.pki import new_ca
from keyless.render.argocd_client import kubeconfig_from_cluster_secret
from keyless.render.tenant import proxy_args

from .broker_fixtures import bound_caller_token, caller_pod, ensure_namespace, start_broker
from .conftest import api_client, started
from .helpers import eventually, kubectl
from .operator_fixtures import KEYLESS, OperatorProcess, apply, prepare_control_plane, remove_all_remote_tenant_clusters

pytestmark = [pytest.mark.cluster, pytest.mark.node]

GROUP, VERSION, PLURAL = "keyless.dev", "v1alpha1", "remotetenantclusters"
OPERATOR_SA = "system:serviceaccount:keyless-system:keyless-operator"
PROXY_SA = "system:serviceaccount:kube-oidc-proxy:kube-oidc-proxy"
SERVICE_HOST = 100  # the proxy Service's ClusterIP: .100 of each node's Service range
NARROW_ROLE = "keyless-test-deployer"


@dataclass
class Tenant:
    cluster: LocalCluster
    namespace: str  # where its RemoteTenantCluster lives on the control plane
    name: str
    tenant: str
    username: str
    server: str
    # spec.access.impersonation.serviceAccounts
    impersonable: tuple[tuple[str, str], ...] = ()

    @property
    def target(self) -> str:
        return f"{self.namespace}.{self.name}"


@dataclass
class Fleet:
    control: LocalCluster
    control_api: object
    broker: object
    operator: OperatorProcess
    agent: subprocess.Popen
    credentials: Path
    workdir: Path
    a: Tenant
    b: Tenant
    caller_token: str = field(repr=False, default="")

    def rtc(self, t: Tenant) -> dict:
        return k.CustomObjectsApi(self.control_api).get_namespaced_custom_object(GROUP, VERSION, t.namespace, PLURAL, t.name)

    def wait(self, t: Tenant, kind: str, status: str, reason: str | None = None, timeout: float = 120) -> dict:
        def check():
            found = {c["type"]: c for c in (self.rtc(t).get("status") or {}).get("conditions", [])}.get(kind)
            assert found and found["status"] == status and (reason is None or found["reason"] == reason), found
            return found
        return eventually(check, timeout=timeout, interval=0.5, message=f"{t.name} {kind}={status} {reason or ''}")

    def argocd_kubeconfig(self, t: Tenant) -> Path:
        """Exactly what Argo CD builds from the cluster Secret the operator wrote."""
        secrets = k.CoreV1Api(self.control_api).list_namespaced_secret(
            "argocd", label_selector=f"keyless.dev/cluster-name={t.name}").items
        assert len(secrets) == 1, [s.metadata.name for s in secrets]
        config = kubeconfig_from_cluster_secret({"data": secrets[0].data})
        path = self.workdir / f"argocd-{t.name}.kubeconfig"
        path.write_text(yaml.safe_dump(config))
        return path

    def token(self, t: Tenant) -> str:
        """The agent's current token for `t` (what Argo CD's exec `cat` returns)."""
        file = self.credentials / f"{t.target}.json"
        eventually(file.exists, timeout=60, message=f"agent credential file {file}")
        return json.loads(file.read_text())["status"]["token"]


def _kubectl_as_argocd(fleet: Fleet, t: Tenant, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(binaries.find("kubectl")), f"--kubeconfig={fleet.argocd_kubeconfig(t)}", *args],
                          capture_output=True, text=True, timeout=timeout)


def _manifest(t: Tenant, role: str, delete_after: bool, hostnames: tuple[str, ...] = ()) -> dict:
    spec = {"tenant": t.tenant, "server": t.server,
            "access": {"clusterRole": role, "username": t.username,
                       "impersonation": {"serviceAccounts": [{"namespace": ns, "name": n} for ns, n in t.impersonable]}},
            # A fixed ClusterIP, so spec.server can name the proxy's Service before it exists.
            "proxy": {"mode": "Managed", "image": node.proxy_image(), "replicas": 2,
                      "service": {"clusterIP": t.server.removeprefix("https://")}},
            "bootstrap": {"kubeconfigSecretRef": {"name": f"{t.name}-bootstrap"}, "deleteAfterInstall": delete_after}}
    if hostnames:
        spec["proxy"]["hostnames"] = list(hostnames)
    return {"apiVersion": "keyless.dev/v1alpha1", "kind": "RemoteTenantCluster",
            "metadata": {"name": t.name, "namespace": t.namespace}, "spec": spec}


def _bootstrap(fleet_api, t: Tenant) -> None:
    annotations = {"keyless.dev/bootstrap-for": t.name}
    k.CoreV1Api(fleet_api).create_namespaced_secret(t.namespace, k.V1Secret(
        metadata=k.V1ObjectMeta(name=f"{t.name}-bootstrap", annotations=annotations),
        string_data={"kubeconfig": t.cluster.kubeconfig.read_text()}))


@pytest.fixture(scope="module")
def fleet(control_plane, control_api, node_network, run_dir):
    workdir = run_dir / "real-proxy"
    workdir.mkdir()
    a_cluster = started(LocalCluster("real-a", workdir / "a", node_network=node_network))
    b_cluster = started(LocalCluster("real-b", workdir / "b", node_network=node_network))
    start_clusters([a_cluster, b_cluster], timeout=240)
    broker = operator = agent = None
    try:
        prepare_control_plane(control_plane)
        tenants = []
        for cluster, tenant_name in ((a_cluster, "real-a"), (b_cluster, "real-b")):
            namespace = f"{tenant_name}-clusters"
            ensure_namespace(control_api, namespace)
            kubectl(control_plane, "label", "namespace", namespace, f"keyless.dev/tenant={tenant_name}", "--overwrite")
            server = f"https://{cluster.node.addresses.service_ip(SERVICE_HOST)}"
            tenants.append(Tenant(cluster, namespace, tenant_name.removeprefix("real-") + "-dev", tenant_name, f"keyless:{tenant_name}:argocd", server))
        a, b = tenants
        # Who a proxy client may act as (Argo CD's sync impersonation); "later" does not exist yet on B.
        a.impersonable = (("default", "deployer"),)
        b.impersonable = (("default", "deployer"), ("later", "x"))
        # The broker must be reachable from the proxy Pods: it listens on the node network's host address.
        # Short key rotation: the whole module runs under rotation; the rotation test waits for two.
        broker = start_broker(control_plane, "keyless-system", workdir / "broker", "--operator-identity", OPERATOR_SA,
                              "--key-rotation-seconds=40", "--key-prepublish-seconds=15", "--max-token-ttl-seconds=60",
                              host=node_network.host_address)
        operator_pod = caller_pod(control_api, "keyless-system", "keyless-operator", f"keyless-operator-{uuid.uuid4().hex[:6]}")
        operator_token = workdir / "operator-token"
        operator_token.write_text(bound_caller_token(control_api, operator_pod, seconds=3600))
        credentials = workdir / "credentials"
        credentials.mkdir(mode=0o700)
        operator = OperatorProcess(control_plane, workdir / "operator", extra_args=[
            f"--broker-issuer={broker.issuer}", f"--broker-url={broker.url}", f"--broker-ca-file={broker.ca_file}",
            f"--broker-token-file={operator_token}", f"--credential-dir={credentials}", "--verify-seconds=5",
            f"--proxy-image={node.proxy_image()}"]).start()
        controller = caller_pod(control_api, "argocd", "argocd-application-controller",
                                f"argocd-application-controller-{uuid.uuid4().hex[:6]}")
        caller_token = bound_caller_token(control_api, controller, seconds=3600)
        agent_token = workdir / "agent-token"
        agent_token.write_text(caller_token)
        agent = start_process([KEYLESS, "agent", "--broker-url", broker.url, "--broker-ca-file", str(broker.ca_file),
                               "--token-file", str(agent_token), "--dir", str(credentials),
                               "--health-listen", f"127.0.0.1:{free_port()}", "--targets-poll-seconds=1"],
                              workdir / "agent.log")
        fleet = Fleet(control_plane, control_api, broker, operator, agent, credentials, workdir, a, b, caller_token)
        # B's identity gets a narrow role; A's is cluster-admin (it must manage the proxy's RBAC through
        # the proxy once its bootstrap credential is gone).
        kubectl(b.cluster, "create", "clusterrole", NARROW_ROLE, "--verb=get,list,watch,create,update,patch,delete",
                "--resource=namespaces,configmaps")
        for t, role, delete_after in ((a, "cluster-admin", True), (b, NARROW_ROLE, False)):
            _bootstrap(control_api, t)
            apply(control_plane, _manifest(t, role, delete_after))
        yield fleet
    finally:
        remove_all_remote_tenant_clusters(control_plane)
        if agent is not None:
            stop_process(agent)
        for service in (operator, broker):
            if service is not None:
                service.stop()
        for cluster in (a_cluster, b_cluster):
            cluster.stop()


# ---- the chain runs on the real proxy -------------------------------------------------------------

def test_proxy_ready_and_token_verified_because_the_proxy_pods_run_on_the_node(fleet):
    for t in (fleet.a, fleet.b):
        fleet.wait(t, "ProxyReady", "True", "Ready", timeout=180)
        fleet.wait(t, "TokenVerified", "True", "Verified", timeout=120)
        apps, core = k.AppsV1Api(api_client(t.cluster)), k.CoreV1Api(api_client(t.cluster))

        def both_replicas_available():
            status = apps.read_namespaced_deployment("kube-oidc-proxy", "kube-oidc-proxy").status
            assert status.available_replicas == 2, status
            pods = core.list_namespaced_pod("kube-oidc-proxy", label_selector="app.kubernetes.io/name=kube-oidc-proxy").items
            running = [p for p in pods if p.status.phase == "Running" and p.spec.node_name == t.cluster.node.name]
            assert len(running) == 2, [(p.metadata.name, p.status.phase) for p in pods]
            return True
        eventually(both_replicas_available, timeout=120, message=f"{t.tenant}: 2 proxy Pods running on the node")
        fleet.wait(t, "ProxyReady", "True", "Ready", timeout=30)


def test_argocd_secret_config_reaches_the_tenant_through_the_proxy_as_exactly_the_username(fleet):
    t = fleet.a
    fleet.wait(t, "Ready", "True", "Reconciled", timeout=180)
    kubeconfig = yaml.safe_load(fleet.argocd_kubeconfig(t).read_text())
    assert kubeconfig["clusters"][0]["cluster"]["server"] == t.server  # the proxy's Service, not the API server
    assert t.cluster.server not in json.dumps(kubeconfig)
    eventually(lambda: (fleet.credentials / f"{t.target}.json").exists(), timeout=60, message="agent file")
    who = _kubectl_as_argocd(fleet, t, "auth", "whoami", "-o", "json")
    assert who.returncode == 0, who.stderr
    user = json.loads(who.stdout)["status"]["userInfo"]
    assert user["username"] == t.username  # no issuer prefix: --oidc-username-prefix is unset
    assert "system:authenticated" in user["groups"]
    # The request went through a proxy Pod: it logs every authenticated request it forwards.
    logs = _proxy_logs(t)
    assert any("AuSuccess" in line and f"inbound:[{t.username} " in line for line in logs.splitlines()), logs[-2000:]


def _exists(read, *args) -> bool:
    """For eventually(): an object that is not there yet is a failed check, not an error."""
    try:
        return read(*args) is not None
    except ApiException as e:
        assert e.status == 404, e
        raise AssertionError(f"{args} not found") from None


def _proxy_logs(t: Tenant) -> str:
    pods = k.CoreV1Api(api_client(t.cluster)).list_namespaced_pod(
        "kube-oidc-proxy", label_selector="app.kubernetes.io/name=kube-oidc-proxy").items
    return "\n".join(kubectl(t.cluster, "logs", "-n", "kube-oidc-proxy", p.metadata.name, check=False).stdout for p in pods)


# ---- least privilege against the real proxy -------------------------------------------------------

def test_allowed_work_succeeds_and_everything_else_is_refused_through_the_proxy(fleet):
    t = fleet.b
    fleet.wait(t, "TokenVerified", "True", "Verified", timeout=180)
    created = _kubectl_as_argocd(fleet, t, "create", "namespace", "deployed-through-proxy")
    assert created.returncode == 0, created.stderr
    assert _kubectl_as_argocd(fleet, t, "-n", "deployed-through-proxy", "create", "configmap", "x",
                              "--from-literal=a=b").returncode == 0
    secrets = _kubectl_as_argocd(fleet, t, "get", "secrets", "-A")
    assert secrets.returncode != 0 and "forbidden" in secrets.stderr.lower(), secrets.stderr
    # Impersonation headers are judged by the tenant's RBAC (SubjectAccessReview): a 403, never a 500.
    for extra in (["--as=system:admin"], ["--as=system:admin", "--as-group=system:masters"],
                  [f"--as={t.username}", "--as-group=system:masters"]):
        refused = _kubectl_as_argocd(fleet, t, *extra, "get", "namespaces")
        assert refused.returncode != 0, (extra, refused.stdout)
        assert "forbidden" in refused.stderr.lower() and "internal" not in refused.stderr.lower(), (extra, refused.stderr)


def test_impersonation_the_access_role_allows_succeeds_through_the_proxy_and_nothing_more(fleet):
    # A's identity is cluster-admin (may impersonate anyone): the proxy's SubjectAccessReview allows the
    # header, and the proxy may itself act as exactly default/deployer (spec.access.impersonation).
    t = fleet.a
    fleet.wait(t, "TokenVerified", "True", "Verified", timeout=180)
    kubectl(t.cluster, "-n", "default", "create", "serviceaccount", "deployer")
    kubectl(t.cluster, "-n", "default", "create", "role", "pod-reader", "--verb=get,list", "--resource=pods")
    kubectl(t.cluster, "-n", "default", "create", "rolebinding", "deployer-reads-pods", "--role=pod-reader",
            "--serviceaccount=default:deployer")
    as_deployer = "--as=system:serviceaccount:default:deployer"
    listed = _kubectl_as_argocd(fleet, t, as_deployer, "-n", "default", "get", "pods")
    assert listed.returncode == 0, listed.stderr
    who = _kubectl_as_argocd(fleet, t, as_deployer, "auth", "whoami", "-o", "json")
    assert who.returncode == 0, who.stderr
    assert json.loads(who.stdout)["status"]["userInfo"]["username"] == "system:serviceaccount:default:deployer"
    # The tenant's own answers: deployer may not read Secrets; nobody else may be impersonated. 403, not 500.
    for args in ([as_deployer, "-n", "default", "get", "secrets"],
                 ["--as=system:serviceaccount:default:default", "get", "pods"],
                 ["--as=system:serviceaccount:kube-system:deployer", "get", "pods"]):
        refused = _kubectl_as_argocd(fleet, t, *args)
        assert refused.returncode != 0, args
        assert "forbidden" in refused.stderr.lower() and "internal" not in refused.stderr.lower(), (args, refused.stderr)


def test_impersonation_the_access_role_does_not_allow_is_refused_by_the_proxy(fleet):
    t = fleet.b  # a narrow role without impersonate: the proxy's SubjectAccessReview says no
    fleet.wait(t, "TokenVerified", "True", "Verified", timeout=180)
    refused = _kubectl_as_argocd(fleet, t, "--as=system:serviceaccount:default:deployer", "get", "namespaces")
    assert refused.returncode != 0
    assert "not allowed to impersonate" in refused.stderr and "internal" not in refused.stderr.lower(), refused.stderr


def test_impersonation_rights_for_a_namespace_that_appears_later_are_granted_then(fleet):
    t = fleet.b
    condition = fleet.wait(t, "ProxyReady", "True", "Ready", timeout=180)
    assert "later" in condition["message"], condition
    rbac = k.RbacAuthorizationV1Api(api_client(t.cluster))
    kubectl(t.cluster, "create", "namespace", "later")
    eventually(lambda: _exists(rbac.read_namespaced_role_binding,
                               "keyless-proxy:kube-oidc-proxy:impersonate-serviceaccounts", "later"),
               timeout=60, message="binding in the new namespace")
    role = rbac.read_namespaced_role("keyless-proxy:kube-oidc-proxy:impersonate-serviceaccounts", "later")
    assert role.rules[0].resource_names == ["x"] and role.rules[0].verbs == ["impersonate"]

    def nothing_pending():
        message = fleet.wait(t, "ProxyReady", "True", "Ready", timeout=5)["message"]
        assert "later" not in message, message
        return True
    eventually(nothing_pending, timeout=60, message="no namespace pending in ProxyReady")


def test_token_for_cluster_a_is_refused_by_the_proxy_of_cluster_b(fleet):
    token_a = fleet.token(fleet.a)
    ca_b = fleet.workdir / "b-proxy-ca.crt"
    ca_b.write_bytes(base64.b64decode(yaml.safe_load(fleet.argocd_kubeconfig(fleet.b).read_text())
                                      ["clusters"][0]["cluster"]["certificate-authority-data"]))
    response = requests.get(f"{fleet.b.server}/api/v1/namespaces", headers={"Authorization": f"Bearer {token_a}"},
                            verify=str(ca_b), timeout=10)
    assert response.status_code == 401, response.text
    own = requests.get(f"{fleet.b.server}/api/v1/namespaces", headers={"Authorization": f"Bearer {fleet.token(fleet.b)}"},
                       verify=str(ca_b), timeout=10)
    assert own.status_code == 200, own.text


def _signing_keys(fleet) -> KeySet:
    secret = k.CoreV1Api(fleet.control_api).read_namespaced_secret(KEY_SECRET_NAME, "keyless-system")
    return KeySet.from_json(base64.b64decode(secret.data["keys.json"]).decode())


def _claims(fleet, t: Tenant, now: int, ttl: int) -> dict:
    return {"iss": fleet.broker.issuer, "sub": t.username, "aud": f"keyless:{t.namespace}:{t.name}",
            "iat": now, "nbf": now, "exp": now + ttl, "jti": uuid.uuid4().hex}


def _ca_file(fleet, t: Tenant) -> str:
    path = fleet.workdir / f"{t.name}-{t.tenant}-ca.crt"
    path.write_bytes(base64.b64decode(yaml.safe_load(fleet.argocd_kubeconfig(t).read_text())
                                      ["clusters"][0]["cluster"]["certificate-authority-data"]))
    return str(path)


def test_expired_and_unpublished_key_tokens_are_refused_by_the_proxy(fleet):
    t = fleet.b
    fleet.wait(t, "TokenVerified", "True", "Verified", timeout=180)
    now = int(time.time())
    real_key = _signing_keys(fleet).signing_key(time.time())
    assert real_key is not None

    def call(token: str) -> int:
        return requests.get(f"{t.server}/api/v1/namespaces", headers={"Authorization": f"Bearer {token}"},
                            verify=_ca_file(fleet, t), timeout=10).status_code

    # Control: the broker's real key and good claims are accepted, so the refusals below are the point.
    assert call(TokenSigner(real_key).sign(_claims(fleet, t, now, 60))) == 200
    expired = TokenSigner(real_key).sign(_claims(fleet, t, now - 600, 60))
    assert call(expired) == 401
    impostor = new_ca("impostor")[1]  # an EC P-256 key the broker never published, under a real kid
    forged = TokenSigner(SigningKey(real_key.kid, "ES256", impostor, 0, 0)).sign(_claims(fleet, t, now, 60))
    assert call(forged) == 401


def test_the_proxy_service_account_can_impersonate_nothing_but_the_one_identity(fleet):
    t = fleet.b
    fleet.wait(t, "ProxyReady", "True", timeout=180)

    def can(*args: str) -> bool:
        result = kubectl(t.cluster, "auth", "can-i", *args, f"--as={PROXY_SA}", check=False)
        return result.stdout.strip() == "yes"

    assert can("impersonate", f"users/{t.username}")
    assert can("impersonate", "groups/system:authenticated")
    assert can("create", "subjectaccessreviews.authorization.k8s.io")
    for denied in (["impersonate", "users/system:admin"], ["impersonate", "users/keyless:real-a:argocd"],
                   ["impersonate", "groups/system:masters"], ["impersonate", "serviceaccounts/default", "-n", "default"],
                   ["impersonate", "userextras/scopes"], ["get", "secrets", "-A"], ["create", "tokenreviews"]):
        assert not can(*denied), denied


# ---- keys rotate, certificates change, Pods die: nothing fails -------------------------------------

class Traffic(threading.Thread):
    """Argo CD-like load: each request reads the agent's credential file and opens a new connection
    to the proxy Service (so a dead Pod or a new key shows at once)."""

    def __init__(self, fleet: Fleet, t: Tenant, follow_argocd_ca: bool = False):
        super().__init__(daemon=True)
        self.fleet, self.t = fleet, t
        self.ca = _ca_file(fleet, t)
        # True: trust what Argo CD's cluster Secret says at each request (it changes during a CA rotation).
        self.follow_argocd_ca = follow_argocd_ca
        self.cas_seen: set[bytes] = set()
        self.ok = 0
        self.failures: list[tuple[float, str]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        file = self.fleet.credentials / f"{self.t.target}.json"
        while not self._halt.is_set():
            try:
                if self.follow_argocd_ca:
                    self.ca = _ca_file(self.fleet, self.t)
                    self.cas_seen.add(Path(self.ca).read_bytes())
                token = json.loads(file.read_text())["status"]["token"]
                response = requests.get(f"{self.t.server}/api/v1/namespaces/default",
                                        headers={"Authorization": f"Bearer {token}", "Connection": "close"},
                                        verify=self.ca, timeout=10)
                if response.status_code == 200:
                    self.ok += 1
                else:
                    self.failures.append((time.time(), f"{response.status_code} {response.text[:200]}"))
            except (OSError, ValueError, KeyError, requests.RequestException) as e:
                self.failures.append((time.time(), f"{e.__class__.__name__}: {e}"))
            time.sleep(0.05)

    def __enter__(self) -> "Traffic":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self._halt.set()
        self.join(15)


def _jwks_kids(fleet) -> set[str]:
    response = requests.get(f"{fleet.broker.issuer}/openid/v1/jwks", verify=str(fleet.broker.ca_file), timeout=5)
    return {key["kid"] for key in response.json()["keys"]}


def test_two_key_rotations_under_load_through_the_proxy_fail_no_request(fleet):
    t = fleet.b
    fleet.wait(t, "TokenVerified", "True", "Verified", timeout=180)
    signing = lambda: _signing_keys(fleet).signing_key(time.time()).kid  # noqa: E731
    first = signing()
    seen = [first]
    with Traffic(fleet, t) as traffic:
        def rotated_twice():
            kid = signing()
            if kid != seen[-1]:
                seen.append(kid)
            assert len(seen) >= 3, seen
            return True
        eventually(rotated_twice, timeout=150, interval=1, message="two signing-key rotations")
        time.sleep(5)  # requests signed by the newest key reach the proxy
    assert traffic.failures == [], traffic.failures[:5]
    assert traffic.ok > 100


def test_deleting_one_proxy_pod_mid_traffic_fails_no_request(fleet):
    t = fleet.b
    fleet.wait(t, "ProxyReady", "True", timeout=180)
    core = k.CoreV1Api(api_client(t.cluster))
    pods = core.list_namespaced_pod("kube-oidc-proxy", label_selector="app.kubernetes.io/name=kube-oidc-proxy").items
    victim = pods[0].metadata.name
    with Traffic(fleet, t) as traffic:
        time.sleep(2)
        core.delete_namespaced_pod(victim, "kube-oidc-proxy")

        def replaced():
            now = core.list_namespaced_pod("kube-oidc-proxy", label_selector="app.kubernetes.io/name=kube-oidc-proxy").items
            ready = [p for p in now if p.metadata.name != victim and p.status.phase == "Running"
                     and all(c.ready for c in p.status.container_statuses or [])]
            assert len(ready) == 2, [(p.metadata.name, p.status.phase) for p in now]
            return True
        eventually(replaced, timeout=90, interval=0.5, message="a second ready proxy Pod")
        time.sleep(3)
    assert traffic.failures == [], traffic.failures[:5]
    assert traffic.ok > 20


def test_serving_certificate_change_rolls_the_proxy_and_the_chain_recovers(fleet):
    t = fleet.b
    fleet.wait(t, "Ready", "True", timeout=180)
    apps = k.AppsV1Api(api_client(t.cluster))
    before = apps.read_namespaced_deployment("kube-oidc-proxy", "kube-oidc-proxy")
    checksum = before.spec.template.metadata.annotations["keyless.dev/trust-checksum"]
    apply(fleet.control, _manifest(t, NARROW_ROLE, False, hostnames=("proxy.real-b.example.com",)))

    def rolled():
        now = apps.read_namespaced_deployment("kube-oidc-proxy", "kube-oidc-proxy")
        assert now.spec.template.metadata.annotations["keyless.dev/trust-checksum"] != checksum
        assert now.status.updated_replicas == 2 and now.status.available_replicas == 2 \
            and now.status.observed_generation == now.metadata.generation, now.status
        return True
    eventually(rolled, timeout=180, interval=1, message="proxy Pods rolled with the new serving certificate")
    # The new certificate names the added host, and Argo CD's config still verifies it (same CA).
    fleet.wait(t, "TokenVerified", "True", "Verified", timeout=120)
    who = _kubectl_as_argocd(fleet, t, "auth", "whoami", "-o", "json")
    assert who.returncode == 0 and json.loads(who.stdout)["status"]["userInfo"]["username"] == t.username


def _wait_bootstrap_deleted(fleet: Fleet, t: Tenant) -> None:
    def bootstrap_gone():
        try:
            k.CoreV1Api(fleet.control_api).read_namespaced_secret(f"{t.name}-bootstrap", t.namespace)
        except ApiException as e:
            return e.status == 404
        return False
    eventually(bootstrap_gone, timeout=60, message="bootstrap Secret deleted after the chain was verified")


def test_bootstrap_deleted_then_a_role_change_reaches_the_tenant_through_the_proxy(fleet):
    t = fleet.a
    fleet.wait(t, "TokenVerified", "True", "Verified", timeout=180)

    _wait_bootstrap_deleted(fleet, t)
    # A role the identity keeps full rights with (it must still manage the proxy's RBAC through the proxy).
    kubectl(t.cluster, "create", "clusterrole", "real-a-admin", "--verb=*", "--resource=*.*")
    kubectl(t.cluster, "patch", "clusterrole", "real-a-admin", "--type=json",
            "-p", '[{"op":"add","path":"/rules/-","value":{"nonResourceURLs":["*"],"verbs":["*"]}}]')
    manifest = _manifest(t, "real-a-admin", True)
    apply(fleet.control, manifest)
    rbac = k.RbacAuthorizationV1Api(api_client(t.cluster))
    eventually(lambda: _exists(rbac.read_cluster_role_binding, "keyless-proxy:kube-oidc-proxy:access:real-a-admin"),
               timeout=90, message="new access binding on the tenant")

    def old_binding_pruned():
        try:
            rbac.read_cluster_role_binding("keyless-proxy:kube-oidc-proxy:access:cluster-admin")
        except ApiException as e:
            return e.status == 404
        return False
    eventually(old_binding_pruned, timeout=90, message="the old access binding removed")
    # Only the proxy path could have done both: the bootstrap credential is gone. The chain still works.
    fleet.wait(t, "ProxyReady", "True", "Ready", timeout=120)
    who = _kubectl_as_argocd(fleet, t, "auth", "whoami", "-o", "json")
    assert who.returncode == 0 and json.loads(who.stdout)["status"]["userInfo"]["username"] == t.username
    apply(fleet.control, _manifest(t, "cluster-admin", True))
    fleet.wait(t, "TokenVerified", "True", "Verified", timeout=120)


def test_rotating_the_proxy_ca_after_the_bootstrap_credential_is_gone_fails_no_request(fleet):
    """An admin rotates a Managed cluster's proxy CA by deleting its CA Secret, long after the bootstrap
    credential was deleted. The soak found this unrecoverable: the new CA was registered with Argo CD and
    used by the operator at once, but the proxy still served the old CA's certificate, so Argo CD failed
    and the operator could not reach the tenant any more to install the new one. Now both trust old and
    new until every proxy replica serves the new certificate; Argo CD-like traffic (following the CA in
    Argo CD's cluster Secret) sees no failure, and the old CA is dropped at the end."""
    t = fleet.a
    apply(fleet.control, _manifest(t, "cluster-admin", True))
    fleet.wait(t, "TokenVerified", "True", "Verified", timeout=180)
    core = k.CoreV1Api(fleet.control_api)

    _wait_bootstrap_deleted(fleet, t)
    ca_secret = f"keyless-proxy-ca-{t.namespace}-{t.name}"
    old_ca = base64.b64decode(core.read_namespaced_secret(ca_secret, "keyless-system").data["ca.crt"])
    with Traffic(fleet, t, follow_argocd_ca=True) as traffic:
        time.sleep(2)
        core.delete_namespaced_secret(ca_secret, "keyless-system")

        def rotated():
            try:
                data = core.read_namespaced_secret(ca_secret, "keyless-system").data
            except ApiException as e:
                assert e.status != 404, "no new CA yet"
                raise
            assert "previous-ca.crt" not in data, "the rotation has not ended"
            new_ca = base64.b64decode(data["ca.crt"])
            assert new_ca != old_ca
            registered = Path(_ca_file(fleet, t)).read_bytes()
            assert registered.strip() == new_ca.strip(), "Argo CD still trusts more than the new CA"
            return True
        eventually(rotated, timeout=240, interval=1, message="the proxy CA rotated and the old CA retired")
        time.sleep(3)
    assert len(traffic.cas_seen) >= 2, "Argo CD's trust changed during the traffic"
    assert traffic.failures == [], traffic.failures[:5]
    assert traffic.ok > 20
    fleet.wait(t, "Ready", "True", timeout=120)


# ---- what DESIGN and README say about the proxy, checked against the binary -----------------------

def test_every_flag_the_operator_renders_exists_in_the_binary_and_defaults_are_as_documented():
    help_text = subprocess.run([str(binaries.find("kube-oidc-proxy")), "--help"], capture_output=True, text=True).stdout
    for arg in proxy_args("https://issuer.example", "aud"):
        flag = arg.split("=", 1)[0]
        assert f"{flag} " in help_text or f"{flag}=" in help_text, flag
    # RS256 only unless told: the operator must pass the broker's algorithm (ES256).
    signing = next(line for line in help_text.splitlines() if "--oidc-signing-algs" in line)
    assert "[RS256]" in signing or "RS256" in signing
    readiness = next(line for line in help_text.splitlines() if "--readiness-probe-port" in line)
    assert "8080" in readiness
