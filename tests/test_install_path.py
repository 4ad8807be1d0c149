"""The install path a platform team runs, from nothing to Applications Synced on two tenant clusters:
our images built from the Dockerfiles without a daemon and imported into the nodes, `helm install`
of the chart with the README's values onto a control plane with a real node, Argo CD from its own
`manifests/install.yaml` plus the Keyless kustomize Component, and two tenants in Managed mode whose
kube-oidc-proxy Pods run on their own nodes. Only helm, kubectl and the manifests a user has.
"""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from keyless.envtest import binaries, node
from keyless.envtest.cluster import LocalCluster, free_port, start_clusters, start_process, stop_process
from keyless.envtest.gitrepo import LocalGitRepository
from keyless.pki import issue_certificate, new_ca

from .conftest import ROOT, started
from .helpers import eventually, kubectl

pytestmark = [pytest.mark.cluster, pytest.mark.node, pytest.mark.timeout(1800)]

RELEASE_NAMESPACE = "keyless-system"
BROKER_NODE_PORT = 30443
TENANTS = ("inst-a", "inst-b")
PROXY_SERVICE_HOST = 100


def _build_images() -> dict[str, Path]:
    result = subprocess.run(["bash", str(ROOT / "tools" / "build-images.sh"), "keyless", "argocd"],
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    keyless, argocd = [Path(line) for line in result.stdout.split()]
    return {"keyless": keyless, "argocd": argocd}


def _argocd_module() -> Path:
    out = subprocess.run(["go", "mod", "download", "-json",
                          f"github.com/argoproj/argo-cd/v3@{binaries.VERSIONS['argocd']}"],
                         capture_output=True, text=True, cwd=Path.home(), timeout=120)
    return Path(json.loads(out.stdout)["Dir"])


def helm(cluster: LocalCluster, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([str(binaries.find("helm")), f"--kubeconfig={cluster.kubeconfig}", *args],
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return result


def _write_pems(directory: Path, **pems: bytes) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, pem in pems.items():
        (directory / name).write_bytes(pem)


@dataclass
class Installed:
    control: LocalCluster
    tenants: dict[str, LocalCluster]
    workdir: Path
    repo: LocalGitRepository
    repo_url: str

    def json(self, *args: str, cluster: LocalCluster | None = None) -> dict:
        return json.loads(kubectl(cluster or self.control, *args, "-o", "json").stdout)

    def rtc_ready(self, tenant: str) -> dict:
        rtc = self.json("get", "rtc", "dev", "-n", f"{tenant}-clusters")
        conditions = {c["type"]: c for c in (rtc.get("status") or {}).get("conditions", [])}
        assert conditions.get("Ready", {}).get("status") == "True", conditions
        return rtc

    def application(self, tenant: str) -> dict:
        return self.json("get", "application", f"{tenant}-dev-hello", "-n", "argocd")

    def synced(self, tenant: str, revision: str | None = None) -> bool:
        app = self.application(tenant)
        status = app.get("status") or {}
        ok = (status.get("sync", {}).get("status") == "Synced" and status.get("health", {}).get("status") == "Healthy"
              and (revision is None or status.get("sync", {}).get("revision") == revision))
        assert ok, (status.get("sync", {}).get("status"), status.get("health"), status.get("conditions"),
                    (status.get("operationState") or {}).get("message"), status.get("sync", {}).get("revision"))
        return True

    def errors(self, tenant: str) -> list[dict]:
        return [c for c in (self.application(tenant).get("status") or {}).get("conditions") or []
                if c.get("type", "").endswith("Error")]


def _argocd_kustomization(directory: Path, images: dict[str, Path]) -> Path:
    """What a user writes: Argo CD's own install.yaml, the Keyless Component, their image names."""
    directory.mkdir(parents=True)
    shutil.copy(_argocd_module() / "manifests" / "install.yaml", directory / "install.yaml")
    shutil.copytree(ROOT / "charts" / "keyless" / "argocd-kustomize", directory / "keyless")
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "namespace": "argocd",
        "resources": ["install.yaml"],
        "components": ["keyless"],
        "images": [
            {"name": "quay.io/argoproj/argocd", "newName": "localhost/keyless/argocd",
             "newTag": binaries.VERSIONS["argocd"]},
            {"name": "your-registry.example/keyless", "newName": "localhost/keyless/keyless", "newTag": "0.1.0"},
            {"name": "public.ecr.aws/docker/library/redis", "newName": node.redis_image().rsplit(":", 1)[0],
             "newTag": node.redis_image().rsplit(":", 1)[1]},
        ],
        # No registry is reachable here: Dex (SSO) is not used, so it is not installed, and the images
        # already on the node are used as they are (upstream pulls Always).
        "patches": [{"patch": yaml.safe_dump({"$patch": "delete", "apiVersion": "apps/v1", "kind": "Deployment",
                                              "metadata": {"name": "argocd-dex-server"}})}]
        + [{"target": {"kind": kind}, "patch": json.dumps([{"op": "add", "value": "IfNotPresent",
                                                            "path": "/spec/template/spec/containers/0/imagePullPolicy"}])}
           for kind in ("Deployment", "StatefulSet")]
        # An impatient operator's setting: Argo CD retries an Application whose cluster had no credential
        # yet (the agent learns new targets on its poll) after 15 s instead of the default 120-180 s.
        + [{"patch": yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "argocd-cm"},
                                     "data": {"timeout.reconciliation": "15s",
                                              "timeout.reconciliation.jitter": "5s"}})}],
    }
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return directory


def _tenant_manifest(tenant: str, cluster: LocalCluster) -> list[dict]:
    namespace = f"{tenant}-clusters"
    service_ip = cluster.node.addresses.service_ip(PROXY_SERVICE_HOST)
    bootstrap = {"apiVersion": "v1", "kind": "Secret",
                 "metadata": {"name": "dev-bootstrap", "namespace": namespace,
                              "annotations": {"keyless.dev/bootstrap-for": "dev"}},
                 "stringData": {"kubeconfig": cluster.kubeconfig.read_text()}}
    rtc = {"apiVersion": "keyless.dev/v1alpha1", "kind": "RemoteTenantCluster",
           "metadata": {"name": "dev", "namespace": namespace},
           "spec": {"tenant": tenant, "server": f"https://{service_ip}",
                    "argocd": {"clusterName": f"{tenant}-dev", "labels": {"environment": "development"}},
                    "access": {"clusterRole": "cluster-admin"},
                    "proxy": {"service": {"clusterIP": service_ip}},
                    "bootstrap": {"kubeconfigSecretRef": {"name": "dev-bootstrap"}, "deleteAfterInstall": True}}}
    return [bootstrap, rtc]


def _application_set(tenant: str, repo_url: str) -> dict:
    return {"apiVersion": "argoproj.io/v1alpha1", "kind": "ApplicationSet",
            "metadata": {"name": f"{tenant}-hello", "namespace": "argocd"},
            "spec": {"goTemplate": True,
                     "generators": [{"clusters": {"selector": {"matchLabels": {"keyless.dev/tenant": tenant}}}}],
                     "template": {"metadata": {"name": "{{ .name }}-hello"},
                                  "spec": {"project": tenant,
                                           "source": {"repoURL": repo_url, "targetRevision": "main", "path": tenant},
                                           "destination": {"server": "{{ .server }}", "namespace": "hello"},
                                           "syncPolicy": {"automated": {"prune": True, "selfHeal": True},
                                                          "syncOptions": ["CreateNamespace=true"]}}}}}


def _hello(tenant: str, revision: int) -> str:
    return yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "hello"},
                           "data": {"tenant": tenant, "revision": str(revision)}})


@pytest.fixture(scope="module")
def installed(node_network, run_dir):
    workdir = run_dir / "install-path"
    images = _build_images()
    control = started(LocalCluster("inst-control", workdir / "control", node_network=node_network, cluster_dns=True,
                                   node_images=(images["keyless"], images["argocd"], node.redis_archive())))
    tenants = {t: started(LocalCluster(t, workdir / t, node_network=node_network)) for t in TENANTS}
    start_clusters([control, *tenants.values()], timeout=300)
    daemon = None
    try:
        # A git server the repo-server Pod can reach (git daemon on the node network's host address).
        repo = LocalGitRepository(workdir / "git" / "apps")
        repo.commit({f"{tenant}/hello.yaml": _hello(tenant, 1) for tenant in TENANTS}, "revision 1")
        git_port = free_port(node_network.host_address)
        daemon = start_process(["git", "daemon", "--reuseaddr", "--export-all", f"--base-path={repo.path.parent}",
                                f"--listen={node_network.host_address}", f"--port={git_port}", str(repo.path.parent)],
                               workdir / "git-daemon.log")
        repo_url = f"git://{node_network.host_address}:{git_port}/{repo.path.name}"

        # The README's install section: namespaces, the broker's TLS Secret, helm install.
        pki = workdir / "pki"
        broker_ca, _ = new_ca("keyless-broker-ca")
        control_ip = control.node.addresses.node_ip
        broker = issue_certificate(broker_ca, "keyless-broker", server=True, ip_addresses=(control_ip,),
                                   dns_names=(f"keyless-broker.{RELEASE_NAMESPACE}.svc",
                                              f"keyless-broker.{RELEASE_NAMESPACE}.svc.cluster.local"))
        webhooks_ca, _ = new_ca("keyless-webhooks-ca")
        webhooks = issue_certificate(webhooks_ca, "keyless-webhooks", server=True,
                                     dns_names=(f"keyless-webhooks.{RELEASE_NAMESPACE}.svc",))
        _write_pems(pki / "broker", **{"ca.crt": broker_ca.cert_pem, "tls.crt": broker.cert_pem, "tls.key": broker.key_pem})
        _write_pems(pki / "webhooks", **{"tls.crt": webhooks.cert_pem, "tls.key": webhooks.key_pem})
        for namespace in (RELEASE_NAMESPACE, "argocd"):
            kubectl(control, "create", "namespace", namespace)
        for tenant in TENANTS:
            kubectl(control, "create", "namespace", f"{tenant}-clusters")
            kubectl(control, "label", "namespace", f"{tenant}-clusters", f"keyless.dev/tenant={tenant}")
        kubectl(control, "-n", RELEASE_NAMESPACE, "create", "secret", "generic", "keyless-broker-tls",
                f"--from-file={pki / 'broker' / 'tls.crt'}", f"--from-file={pki / 'broker' / 'tls.key'}",
                f"--from-file={pki / 'broker' / 'ca.crt'}")
        kubectl(control, "-n", RELEASE_NAMESPACE, "create", "secret", "tls", "keyless-webhooks-tls",
                f"--cert={pki / 'webhooks' / 'tls.crt'}", f"--key={pki / 'webhooks' / 'tls.key'}")
        values = [
            "--set-json", 'argocd.namespaces=["argocd"]',
            "--set-json", f"tenantNamespaces={json.dumps([f'{t}-clusters' for t in TENANTS])}",
            # The issuer must be reachable from every tenant's proxy Pods: here a NodePort on the control
            # plane's node (in production: a LoadBalancer or an Ingress with TLS passthrough).
            "--set", f"broker.issuer=https://{control_ip}:{BROKER_NODE_PORT}",
            "--set", "broker.service.type=NodePort", "--set", f"broker.service.nodePort={BROKER_NODE_PORT}",
            "--set-file", f"broker.tls.caCert={pki / 'broker' / 'ca.crt'}",
            "--set", "image.repository=localhost/keyless/keyless", "--set", "image.tag=0.1.0",
            "--set", f"operator.proxyImage={node.proxy_image()}",
            "--set", "webhooks.enabled=true",
            "--set", f"webhooks.tls.caBundle={base64.b64encode(webhooks_ca.cert_pem).decode()}",
        ]
        helm(control, "install", "keyless", str(ROOT / "charts" / "keyless"), "-n", RELEASE_NAMESPACE, *values,
             "--wait", "--timeout", "5m")

        # Argo CD from its own manifests plus the Keyless Component.
        kustomization = _argocd_kustomization(workdir / "argocd-install", images)
        kubectl(control, "apply", "--server-side", "--force-conflicts", "-k", str(kustomization), timeout=180)
        for workload in ("statefulset/argocd-application-controller", "deployment/argocd-repo-server",
                         "deployment/argocd-redis", "deployment/argocd-applicationset-controller",
                         "deployment/argocd-server"):
            kubectl(control, "-n", "argocd", "rollout", "status", workload, "--timeout=300s", timeout=320)

        world = Installed(control, tenants, workdir, repo, repo_url)
        world.values = values
        yield world
    finally:
        if daemon is not None:
            stop_process(daemon)
        for cluster in (control, *tenants.values()):
            cluster.stop()


def test_images_run_as_the_charts_pods_non_root_with_a_read_only_root_filesystem(installed):
    pods = installed.json("get", "pods", "-n", RELEASE_NAMESPACE)["items"]
    components = {p["metadata"]["labels"].get("app.kubernetes.io/component") for p in pods}
    assert {"operator", "broker", "webhooks"} <= components, components
    for pod in pods:
        assert pod["status"]["phase"] == "Running", pod["metadata"]["name"]
        for container in pod["spec"]["containers"]:
            assert container["image"] == "localhost/keyless/keyless:0.1.0"
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    # What the kernel says, not the manifest: the process runs as 65532.
    broker_pod = next(p["metadata"]["name"] for p in pods if p["metadata"]["labels"].get("app.kubernetes.io/component") == "broker")
    status = kubectl(installed.control, "-n", RELEASE_NAMESPACE, "exec", broker_pod, "--", "python", "-c",
                     "import os; print(os.getuid(), os.getgid())").stdout.split()
    assert status == ["65532", "65532"]
    help_text = kubectl(installed.control, "-n", RELEASE_NAMESPACE, "exec", broker_pod, "--", "keyless", "--help").stdout
    assert "operator" in help_text and "broker" in help_text


def test_argocds_redis_answers_other_pods_through_its_service_and_asks_for_its_password(installed):
    """Argo CD's own redis Deployment passes neither --port nor --bind: like redis-server, our stand-in
    must then listen on every interface. It listened on 127.0.0.1 only, and Argo CD's components got
    `connect: connection refused` (a ComparisonError) whenever they needed their cache."""
    broker_pod = installed.json("get", "pods", "-n", RELEASE_NAMESPACE, "-l",
                                "app.kubernetes.io/component=broker")["items"][0]["metadata"]["name"]
    probe = ("import socket; s = socket.create_connection(('argocd-redis.argocd.svc.cluster.local', 6379), 10); "
             "s.sendall(b'*1\\r\\n$4\\r\\nPING\\r\\n'); print(s.recv(200).decode())")
    answer = kubectl(installed.control, "-n", RELEASE_NAMESPACE, "exec", broker_pod, "--", "python", "-c", probe).stdout
    assert answer.startswith("-NOAUTH"), answer


def test_two_managed_tenants_become_ready_and_an_application_set_deploys_to_both_through_their_proxies(installed):
    for tenant, cluster in installed.tenants.items():
        kubectl(installed.control, "apply", "-f", "-", input=yaml.safe_dump_all(_tenant_manifest(tenant, cluster)))
    for tenant in TENANTS:
        eventually(lambda t=tenant: installed.rtc_ready(t), timeout=240, interval=2, message=f"{tenant} Ready")
    listed = kubectl(installed.control, "get", "rtc", "-A").stdout
    assert listed.count("True") == 2 and "Reconciled" in listed, listed
    for tenant in TENANTS:
        kubectl(installed.control, "apply", "-f", "-", input=yaml.safe_dump(_application_set(tenant, installed.repo_url)))
    for tenant in TENANTS:
        eventually(lambda t=tenant: installed.synced(t), timeout=240, interval=2, message=f"{tenant} Synced")
    # Every Argo CD component that talks to clusters runs the agent beside it (the Component's patches).
    for selector in ("app.kubernetes.io/name=argocd-application-controller", "app.kubernetes.io/name=argocd-server",
                     "app.kubernetes.io/name=argocd-applicationset-controller"):
        pod = installed.json("get", "pods", "-n", "argocd", "-l", selector)["items"][0]
        ready = {c["name"]: c["ready"] for c in pod["status"]["containerStatuses"]}
        assert ready.get("keyless-agent") is True and all(ready.values()), (selector, ready)
    for tenant, cluster in installed.tenants.items():
        landed = installed.json("get", "configmap", "hello", "-n", "hello", cluster=cluster)
        assert landed["data"] == {"tenant": tenant, "revision": "1"}
        # It came through the tenant's proxy: the proxy Pods logged the Argo CD identity's requests.
        logs = "".join(kubectl(cluster, "logs", "-n", "kube-oidc-proxy", p["metadata"]["name"]).stdout
                       for p in installed.json("get", "pods", "-n", "kube-oidc-proxy", cluster=cluster)["items"])
        assert f"inbound:[keyless:{tenant}:argocd " in logs


def test_a_tenants_application_aimed_at_another_tenants_cluster_is_refused(installed):
    installed.synced("inst-b")
    server_b = installed.json("get", "rtc", "dev", "-n", "inst-b-clusters")["spec"]["server"]
    kubectl(installed.control, "create", "namespace", "inst-a-apps")
    kubectl(installed.control, "label", "namespace", "inst-a-apps", "keyless.dev/tenant=inst-a")
    kubectl(installed.control, "-n", "inst-a-apps", "create", "role", "apps", "--verb=create,get",
            "--resource=applications.argoproj.io")
    kubectl(installed.control, "-n", "inst-a-apps", "create", "rolebinding", "alice", "--role=apps", "--user=alice")
    app = {"apiVersion": "argoproj.io/v1alpha1", "kind": "Application",
           "metadata": {"name": "steal", "namespace": "inst-a-apps"},
           "spec": {"project": "inst-b", "source": {"repoURL": installed.repo_url, "path": "inst-a", "targetRevision": "main"},
                    "destination": {"server": server_b, "namespace": "hello"}}}
    refused = kubectl(installed.control, "apply", "--as=alice", "-f", "-", input=yaml.safe_dump(app), check=False)
    assert refused.returncode != 0 and "denied the request" in refused.stderr, refused.stderr
    assert installed.json("get", "configmap", "hello", "-n", "hello",
                          cluster=installed.tenants["inst-b"])["data"]["tenant"] == "inst-b"


def test_a_cluster_in_a_namespace_the_operator_does_not_watch_is_flagged_at_apply(installed):
    kubectl(installed.control, "create", "namespace", "inst-a-elsewhere")
    kubectl(installed.control, "label", "namespace", "inst-a-elsewhere", "keyless.dev/tenant=inst-a")
    rtc = {"apiVersion": "keyless.dev/v1alpha1", "kind": "RemoteTenantCluster",
           "metadata": {"name": "forgotten", "namespace": "inst-a-elsewhere"},
           "spec": {"tenant": "inst-a", "server": "https://forgotten.inst-a.example.com",
                    "caData": base64.b64encode(new_ca("x")[0].cert_pem).decode(),
                    "access": {"clusterRole": "view"}, "proxy": {"mode": "External"}}}
    applied = kubectl(installed.control, "apply", "-f", "-", input=yaml.safe_dump(rtc))
    assert "Warning:" in applied.stderr
    assert "nothing will reconcile this one in inst-a-elsewhere" in applied.stderr
    assert "inst-a-clusters, inst-b-clusters" in applied.stderr
    kubectl(installed.control, "delete", "rtc", "forgotten", "-n", "inst-a-elsewhere", "--wait=false")


def _leader_pod(installed) -> str:
    lease = installed.json("get", "lease", "-n", RELEASE_NAMESPACE)["items"]
    holders = [l["spec"].get("holderIdentity") for l in lease if "operator" in l["metadata"]["name"]]
    pods = {p["metadata"]["name"] for p in installed.json("get", "pods", "-n", RELEASE_NAMESPACE, "-l",
                                                          "app.kubernetes.io/component=operator")["items"]}
    leader = [p for p in pods if any(h and p in h for h in holders)]
    assert len(leader) == 1, (holders, pods)
    return leader[0]


def test_killing_the_operator_leader_and_a_broker_pod_during_traffic_fails_no_sync(installed):
    for tenant in TENANTS:
        installed.synced(tenant)
    leader = _leader_pod(installed)
    broker_pod = installed.json("get", "pods", "-n", RELEASE_NAMESPACE, "-l",
                                "app.kubernetes.io/component=broker")["items"][0]["metadata"]["name"]
    revision = installed.repo.commit({f"{tenant}/hello.yaml": _hello(tenant, 2) for tenant in TENANTS}, "revision 2")
    kubectl(installed.control, "-n", RELEASE_NAMESPACE, "delete", "pod", leader, broker_pod, "--wait=false")
    for tenant in TENANTS:
        kubectl(installed.control, "-n", "argocd", "annotate", "application", f"{tenant}-dev-hello",
                "argocd.argoproj.io/refresh=normal", "--overwrite")
    for tenant in TENANTS:
        eventually(lambda t=tenant: installed.synced(t, revision), timeout=240, interval=2,
                   message=f"{tenant} synced revision 2 while the leader and a broker Pod were replaced")
        assert installed.errors(tenant) == []
        assert installed.json("get", "configmap", "hello", "-n", "hello",
                              cluster=installed.tenants[tenant])["data"]["revision"] == "2"
    eventually(lambda: _leader_pod(installed) != leader, timeout=120, interval=2, message="a new operator leader")
    for tenant in TENANTS:
        eventually(lambda t=tenant: installed.rtc_ready(t), timeout=120, interval=2, message=f"{tenant} Ready again")


def test_helm_upgrade_changes_a_value_and_everything_stays_ready(installed):
    before = installed.json("get", "deployment", "keyless-operator", "-n", RELEASE_NAMESPACE)
    helm(installed.control, "upgrade", "keyless", str(ROOT / "charts" / "keyless"), "-n", RELEASE_NAMESPACE,
         *installed.values, "--set", "operator.resyncSeconds=30", "--wait", "--timeout", "5m")
    after = installed.json("get", "deployment", "keyless-operator", "-n", RELEASE_NAMESPACE)
    assert "--resync-seconds=30" in after["spec"]["template"]["spec"]["containers"][0]["args"]
    assert after["metadata"]["generation"] > before["metadata"]["generation"]
    for tenant in TENANTS:
        eventually(lambda t=tenant: installed.rtc_ready(t), timeout=120, interval=2, message=f"{tenant} Ready")
        installed.synced(tenant)


def test_uninstall_after_deleting_the_clusters_leaves_the_crds_and_nothing_running(installed):
    kubectl(installed.control, "delete", "rtc", "--all", "-A", "--timeout=180s", timeout=200)
    secrets = installed.json("get", "secrets", "-n", "argocd", "-l", "argocd.argoproj.io/secret-type=cluster")
    assert secrets["items"] == []  # the operator removed what it registered
    helm(installed.control, "uninstall", "keyless", "-n", RELEASE_NAMESPACE, "--wait", "--timeout", "3m")
    crds = kubectl(installed.control, "get", "crd", "-o", "name").stdout
    assert "remotetenantclusters.keyless.dev" in crds and "brokertargets.keyless.dev" in crds
    eventually(lambda: installed.json("get", "pods", "-n", RELEASE_NAMESPACE)["items"] == [], timeout=120,
               message="no Keyless Pod left")
    for kind in ("deployments", "services", "validatingwebhookconfigurations", "mutatingwebhookconfigurations"):
        listed = kubectl(installed.control, "get", kind, "-A", "-l", "app.kubernetes.io/name=keyless", "-o", "name").stdout
        assert listed.strip() == "", (kind, listed)


def test_the_kustomize_component_is_exactly_what_argocd_values_gives_the_helm_chart():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "render-argocd-kustomize.py"), "--check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr

