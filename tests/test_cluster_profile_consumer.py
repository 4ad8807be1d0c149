"""A real ClusterProfile consumer reaches a tenant through Keyless: the operator (with --cluster-profiles)
publishes a SIG Multicluster ClusterProfile for a RemoteTenantCluster, and a small Go program built on
sigs.k8s.io/cluster-inventory-api's pkg/access (tests/clusterprofile-consumer: no Keyless code in it) reads
that profile from the control plane, builds its client with a provider file, and asks the tenant who it is
(SelfSubjectReview). The exec plugin is Keyless's: `keyless token` (target from the cluster info) or `cat` of
the agent's file (path from the profile's additional-envs). Real API servers, broker, operator and agent.
"""
from __future__ import annotations

import base64
import json
import re
import subprocess
import uuid
from pathlib import Path

import pytest
from kubernetes import client as k

from keyless.envtest import binaries
from keyless.envtest.cluster import free_port, start_process, stop_process

from .broker_fixtures import bound_caller_token, caller_pod, ensure_namespace
from .chain_fixtures import running_chain
from .conftest import ROOT, SHARED, require_binary
from .helpers import eventually, install_crds, kubectl
from .operator_fixtures import KEYLESS, apply, tenant_namespace

pytestmark = [pytest.mark.cluster, require_binary("clusterprofile-consumer")]

NAMESPACE = "tenants-profiles"
TENANT = "tenant-profiles"
INVENTORY = "fleet-inventory"
CONSUMER_NAMESPACE = "fleet-consumers"
CONSUMER_SA = "multicluster-consumer"
CONSUMER = f"system:serviceaccount:{CONSUMER_NAMESPACE}:{CONSUMER_SA}"
CONTROLLER = "system:serviceaccount:argocd:argocd-application-controller"
USERNAME = f"keyless:{TENANT}:fleet"
CLUSTER_PROFILE_CRD = SHARED / "third_party" / "cluster-inventory-api" / "config" / "crd" / "bases" / \
    "multicluster.x-k8s.io_clusterprofiles.yaml"


@pytest.fixture(scope="module")
def fleet(control_plane, control_api, run_dir):
    workdir = run_dir / "cluster-profiles"
    credentials = workdir / "credentials"
    credentials.mkdir(parents=True)
    install_crds(control_plane, CLUSTER_PROFILE_CRD)
    tenant_namespace(control_plane, NAMESPACE, TENANT)
    kubectl(control_plane, "create", "namespace", INVENTORY, check=False)
    with running_chain(control_plane, control_api, workdir, NAMESPACE, f"keyless:{NAMESPACE}:fleet", "profiles-tenant",
                       "--cluster-profiles", f"--cluster-profile-namespace={INVENTORY}",
                       f"--credential-dir={credentials}") as chain:
        kubectl(chain.tenant, "create", "clusterrole", "fleet-reader", "--verb=get,list", "--resource=configmaps")
        kubectl(chain.tenant, "create", "clusterrolebinding", "fleet-reader", "--clusterrole=fleet-reader",
                f"--user={USERNAME}")
        ensure_namespace(control_api, CONSUMER_NAMESPACE)
        pod = caller_pod(control_api, CONSUMER_NAMESPACE, CONSUMER_SA, f"{CONSUMER_SA}-{uuid.uuid4().hex[:6]}")
        token_file = workdir / "consumer-token"
        token_file.write_text(bound_caller_token(control_api, pod, seconds=3600))
        chain.consumer_token_file = token_file
        chain.credentials = credentials
        yield chain


def fleet_manifest(chain, **spec) -> dict:
    return {"apiVersion": "keyless.dev/v1alpha1", "kind": "RemoteTenantCluster",
            "metadata": {"name": "fleet", "namespace": NAMESPACE},
            "spec": {"tenant": TENANT, "server": chain.tenant.server,
                     "caData": base64.b64encode(chain.tenant.ca_pem).decode(),
                     "access": {"clusterRole": "fleet-reader", "username": USERNAME,
                                "allowedCallers": [CONTROLLER, CONSUMER]},
                     "proxy": {"mode": "Direct"}, **spec}}


def profile(chain, namespace: str = INVENTORY, name: str = f"{NAMESPACE}-fleet") -> dict | None:
    from .helpers import read_or_none

    return read_or_none(k.CustomObjectsApi(chain.control_api).get_namespaced_custom_object,
                        "multicluster.x-k8s.io", "v1alpha1", namespace, "clusterprofiles", name)


def run_consumer(chain, provider: dict, tmp_path: Path, name: str = f"{NAMESPACE}-fleet") -> tuple[int, dict, str]:
    """Runs the Go consumer; (exit code, what it printed, its stderr: where client-go lets the plugin speak)."""
    provider_file = tmp_path / f"provider-{uuid.uuid4().hex[:6]}.json"
    provider_file.write_text(json.dumps({"providers": [provider]}))
    result = subprocess.run([str(binaries.find("clusterprofile-consumer")), f"--kubeconfig={chain.control.kubeconfig}",
                             f"--namespace={INVENTORY}", f"--name={name}",
                             f"--clusterprofile-provider-file={provider_file}"],
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.strip(), result.stderr
    return result.returncode, json.loads(result.stdout), result.stderr


def keyless_token_provider(chain) -> dict:
    """What a consumer's provider file says to use `keyless token`: one entry for every Keyless cluster."""
    return {"name": "keyless", "execConfig": {
        "apiVersion": "client.authentication.k8s.io/v1", "command": str(KEYLESS),
        "args": ["token", "--broker-url", chain.broker.url, "--broker-ca-file", str(chain.broker.ca_file),
                 "--token-file", str(chain.consumer_token_file)],
        "provideClusterInfo": True, "interactiveMode": "Never"}}


@pytest.fixture(scope="module")
def published(fleet):
    apply(fleet.control, fleet_manifest(fleet))
    fleet.wait("fleet", "TokenVerified", "True", "Verified")
    fleet.wait("fleet", "ClusterProfilePublished", "True", "Published")
    return fleet


def test_consumer_program_uses_only_the_upstream_library():
    source = (ROOT / "tests" / "clusterprofile-consumer" / "main.go").read_text()
    imports = re.findall(r'^\s+(?:\w+ )?"([^"]+)"$', source, flags=re.M)
    assert "sigs.k8s.io/cluster-inventory-api/pkg/access" in imports
    assert not [i for i in imports if "keyless" in i]


def test_profile_lists_keyless_with_the_tenants_server_ca_and_a_healthy_control_plane(published):
    found = eventually(lambda: profile(published), message="ClusterProfile in the inventory namespace")
    assert found["spec"]["clusterManager"] == {"name": "keyless"}
    assert found["metadata"]["labels"]["x-k8s.io/cluster-manager"] == "keyless"
    provider = found["status"]["accessProviders"][0]
    assert provider["name"] == "keyless"
    assert provider["cluster"]["server"] == published.tenant.server
    assert base64.b64decode(provider["cluster"]["certificate-authority-data"]) == published.tenant.ca_pem
    assert found["status"]["credentialProviders"] == found["status"]["accessProviders"]
    healthy = eventually(lambda: next((c for c in profile(published)["status"].get("conditions", [])
                                       if c["type"] == "ControlPlaneHealthy" and c["status"] == "True"), None),
                         message="ControlPlaneHealthy=True")
    assert healthy["reason"] == "Verified"
    assert published.rtc("fleet")["status"]["clusterProfile"] == f"{INVENTORY}/{NAMESPACE}-fleet"


def test_pkg_access_consumer_reaches_the_tenant_with_keyless_token(published, tmp_path):
    code, seen, _ = run_consumer(published, keyless_token_provider(published), tmp_path)
    assert code == 0, seen
    assert seen["server"] == published.tenant.server
    assert seen["username"] == USERNAME


def test_pkg_access_consumer_reaches_the_tenant_with_cat_of_the_agents_file(published, tmp_path):
    health = free_port()
    agent = start_process([str(KEYLESS), "agent", "--broker-url", published.broker.url,
                           "--broker-ca-file", str(published.broker.ca_file),
                           "--token-file", str(published.consumer_token_file), "--dir", str(published.credentials),
                           f"--health-listen=127.0.0.1:{health}", "--targets-poll-seconds", "1"],
                          tmp_path / "agent.log")
    try:
        credential = published.credentials / f"{NAMESPACE}.fleet.json"
        eventually(credential.exists, timeout=60, message="the agent's credential file")
        # The path comes from the profile (additional-envs), not from this provider file.
        provider = {"name": "keyless", "profileSourcedEnvVarsPolicy": "AppendIfNotExists", "execConfig": {
            "apiVersion": "client.authentication.k8s.io/v1", "command": "sh",
            "args": ["-c", 'exec cat "$KEYLESS_CREDENTIAL_FILE"'], "interactiveMode": "Never"}}
        code, seen, _ = run_consumer(published, provider, tmp_path)
    finally:
        stop_process(agent)
    assert code == 0, seen
    assert seen["username"] == USERNAME


def test_consumer_whose_identity_the_cluster_does_not_allow_gets_nothing(published, control_api, tmp_path):
    stranger_pod = caller_pod(control_api, CONSUMER_NAMESPACE, "stranger", f"stranger-{uuid.uuid4().hex[:6]}")
    token_file = tmp_path / "stranger-token"
    token_file.write_text(bound_caller_token(control_api, stranger_pod))
    provider = keyless_token_provider(published)
    args = provider["execConfig"]["args"]
    args[args.index("--token-file") + 1] = str(token_file)
    code, seen, stderr = run_consumer(published, provider, tmp_path)
    assert code != 0 and "username" not in seen
    assert "getting credentials" in seen["error"]
    assert "caller_not_allowed" in stderr


def test_profile_moves_with_its_namespace_and_is_removed_on_opt_out_and_delete(published):
    tenant_namespace(published.control, "tenants-profiles-inventory", TENANT)
    apply(published.control, fleet_manifest(published, clusterProfile={"namespace": "tenants-profiles-inventory"}))
    eventually(lambda: profile(published, "tenants-profiles-inventory") is not None, message="profile moved")
    eventually(lambda: profile(published) is None, message="old profile removed")
    apply(published.control, fleet_manifest(published, clusterProfile={"enabled": False}))
    published.wait("fleet", "ClusterProfilePublished", "True", "NotRequested")
    eventually(lambda: profile(published, "tenants-profiles-inventory") is None, message="opted-out profile removed")
    apply(published.control, fleet_manifest(published))
    eventually(lambda: profile(published) is not None, message="profile back")
    kubectl(published.control, "delete", "rtc", "fleet", "-n", NAMESPACE, "--wait=true", "--timeout=60s")
    assert profile(published) is None


def test_a_namespace_of_another_tenant_is_refused(published):
    tenant_namespace(published.control, "someone-elses", "tenant-other")
    intruder = fleet_manifest(published, clusterProfile={"namespace": "someone-elses"})
    intruder["metadata"]["name"] = "intruder"
    intruder["spec"]["server"] = published.tenant.server.replace("127.0.0.1", "localhost")  # its own claim
    apply(published.control, intruder)
    condition = published.wait("intruder", "ClusterProfilePublished", "False", "NamespaceNotAllowed")
    assert "someone-elses" in condition["message"]
    assert profile(published, "someone-elses", "tenants-profiles-intruder") is None
    kubectl(published.control, "delete", "rtc", "intruder", "-n", NAMESPACE, "--wait=true", "--timeout=60s")
