"""`keyless doctor` walks a real chain (operator, broker, a Direct-mode tenant API server, a real
kube-oidc-proxy in front of it for External mode) and names the broken link: a healthy chain passes every
step; a wrong CA, a stopped broker, a caller that is not allowed, and a proxy that trusts another audience
each fail at their own step with what to do, exit non-zero, and never print a token."""
from __future__ import annotations

import base64
import contextlib
import json
import subprocess
import urllib.request
import uuid
from pathlib import Path

import pytest

from keyless import pki
from keyless.envtest import binaries
from keyless.envtest.cluster import free_port, start_process, stop_process, tail
from keyless.render.tenant import proxy_args

from .broker_fixtures import bound_caller_token, caller_pod
from .chain_fixtures import running_chain
from .conftest import require_binary
from .helpers import eventually, kubectl
from .operator_fixtures import KEYLESS, apply, tenant_namespace

pytestmark = pytest.mark.cluster

NAMESPACE = "tenants-doctor"
TENANT = "tenant-doctor"
KUBECTL_KEYLESS = str(Path(KEYLESS).parent / "kubectl-keyless")


def manifest(name: str, server: str, ca_pem: bytes, mode: str = "Direct") -> dict:
    return {"apiVersion": "keyless.dev/v1alpha1", "kind": "RemoteTenantCluster",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"tenant": TENANT, "server": server, "caData": base64.b64encode(ca_pem).decode(),
                     "access": {"clusterRole": "doctor-reader", "username": f"keyless:{TENANT}:{name}"},
                     "proxy": {"mode": mode}}}


@pytest.fixture(scope="module")
def chain(control_plane, control_api, run_dir):
    tenant_namespace(control_plane, NAMESPACE, TENANT)
    with running_chain(control_plane, control_api, run_dir / "doctor", NAMESPACE, f"keyless:{NAMESPACE}:healthy",
                       "doctor-tenant") as running:
        kubectl(running.tenant, "create", "clusterrole", "doctor-reader", "--verb=get,list", "--resource=configmaps")
        for name in ("healthy", "viaproxy"):
            kubectl(running.tenant, "create", "clusterrolebinding", f"doctor-{name}", "--clusterrole=doctor-reader",
                    f"--user=keyless:{TENANT}:{name}")
        # The default caller (argocd-application-controller) has a Pod: the doctor binds a TokenRequest to it.
        caller_pod(control_api, "argocd", "argocd-application-controller", f"argocd-application-controller-{uuid.uuid4().hex[:6]}")
        apply(control_plane, manifest("healthy", running.tenant.server, running.tenant.ca_pem))
        running.wait("healthy", "Ready", "True", timeout=90)
        yield running


def doctor(chain, cluster: str, *args: str, plugin: bool = False) -> tuple[int, str]:
    command = [KUBECTL_KEYLESS] if plugin else [str(KEYLESS)]
    result = subprocess.run([*command, "doctor", cluster, f"--kubeconfig={chain.control.kubeconfig}",
                             f"--broker-url={chain.broker.url}", f"--broker-ca-file={chain.broker.ca_file}", *args],
                            capture_output=True, text=True, timeout=120)
    assert not result.stderr.strip() or "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stdout


def steps(output: str) -> dict[str, dict]:
    return {s["name"]: s for s in json.loads(output)["steps"]}


def assert_no_token(output: str, chain) -> None:
    assert not [part for part in output.split() if part.count(".") == 2 and len(part) > 100], output
    assert (chain.workdir / "operator-token").read_text().strip()[-40:] not in output


def test_healthy_chain_passes_every_step(chain):
    code, text = doctor(chain, f"{NAMESPACE}/healthy")
    print(text)  # what the README shows
    assert code == 0, text
    assert text.splitlines()[-1] == "OK: the chain works"
    code, output = doctor(chain, f"{NAMESPACE}/healthy", "-o", "json")
    report = json.loads(output)
    assert code == 0 and report["ok"] is True
    found = steps(output)
    assert list(found) == ["manifest", "argocd-secret", "broker-target", "broker", "token", "tenant-tls", "identity"]
    assert all(s["status"] == "pass" for s in found.values()), found
    assert "system:serviceaccount:argocd:argocd-application-controller" in found["token"]["message"]
    assert f"keyless:{TENANT}:healthy" in found["identity"]["message"]
    assert_no_token(text + output, chain)


def test_runs_as_a_kubectl_plugin(chain):
    kubectl_bin = str(binaries.find("kubectl"))
    env_path = f"{KUBECTL_KEYLESS.rsplit('/', 1)[0]}"
    result = subprocess.run([kubectl_bin, "plugin", "list"], capture_output=True, text=True, timeout=60,
                            env={"PATH": env_path, "HOME": "/tmp"})
    assert "kubectl-keyless" in result.stdout, result.stdout + result.stderr
    code, text = doctor(chain, f"{NAMESPACE}/healthy", plugin=True)
    assert code == 0 and "OK: the chain works" in text


def test_wrong_ca_fails_at_tenant_tls_with_the_fix(chain):
    wrong, _ = pki.new_ca("not-the-tenant-ca")
    apply(chain.control, manifest("wrongca", chain.tenant.server.replace("127.0.0.1", "localhost"), wrong.cert_pem))
    chain.wait("wrongca", "TokenVerified", "False", "CAMismatch", timeout=60)
    code, output = doctor(chain, f"{NAMESPACE}/wrongca", "-o", "json")
    found = steps(output)
    assert code == 1
    assert found["tenant-tls"]["status"] == "fail" and "spec.caData" in found["tenant-tls"]["fix"]
    assert found["manifest"]["status"] == "fail" and "CAMismatch" in found["manifest"]["message"]
    assert found["identity"]["status"] == "skip"
    assert found["token"]["status"] == "pass"  # the broker side is fine: the fault is the CA alone
    print(doctor(chain, f"{NAMESPACE}/wrongca")[1])
    kubectl(chain.control, "delete", "rtc", "wrongca", "-n", NAMESPACE, "--wait=true", "--timeout=60s")


def test_broker_down_fails_at_the_broker_step(chain):
    chain.broker.stop()
    try:
        code, output = doctor(chain, f"{NAMESPACE}/healthy", "-o", "json")
        found = steps(output)
        assert code == 1
        assert found["broker"]["status"] == "fail" and "cannot reach the broker" in found["broker"]["message"]
        assert found["token"]["status"] == "skip" and found["identity"]["status"] == "skip"
        assert found["tenant-tls"]["status"] == "pass"
        _, text = doctor(chain, f"{NAMESPACE}/healthy")
        print(text)
        assert "[FAIL] broker" in text and "fix: is the broker running?" in text
    finally:
        chain.broker = chain.broker.restarted(chain.control)
    # The restarted broker serves once it has listed its targets and keys again; the doctor passes then.
    eventually(lambda: doctor(chain, f"{NAMESPACE}/healthy")[0] == 0, timeout=60, interval=1.0,
               message="the doctor passes once the broker is back")


def test_caller_not_allowed_fails_at_the_token_step_naming_the_field(chain, control_api, tmp_path):
    stranger = caller_pod(control_api, "argocd", "stranger", f"stranger-{uuid.uuid4().hex[:6]}")
    token_file = tmp_path / "stranger-token"
    token_file.write_text(bound_caller_token(control_api, stranger))
    code, output = doctor(chain, f"{NAMESPACE}/healthy", "--token-file", str(token_file), "-o", "json")
    found = steps(output)
    assert code == 1
    assert found["token"]["status"] == "fail" and "caller_not_allowed" in found["token"]["message"]
    assert found["token"]["fix"] == "add system:serviceaccount:argocd:stranger to spec.access.allowedCallers"
    assert found["identity"]["status"] == "skip"
    # The same with --caller: the doctor binds a TokenRequest to the ServiceAccount's Pod.
    code, output = doctor(chain, f"{NAMESPACE}/healthy", "--caller", "argocd/stranger", "-o", "json")
    assert code == 1 and "caller_not_allowed" in steps(output)["token"]["message"]
    assert token_file.read_text().strip()[-40:] not in output


@contextlib.contextmanager
def kube_oidc_proxy(chain, audience: str, directory):
    """The real kube-oidc-proxy in front of the tenant API server, trusting the broker for `audience`."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, _ = pki.new_ca("doctor-proxy-ca")
    serving = pki.issue_certificate(ca, "kube-oidc-proxy", server=True, ip_addresses=("127.0.0.1",))
    (directory / "tls.crt").write_bytes(serving.cert_pem)
    (directory / "tls.key").write_bytes(serving.key_pem)
    port, ready_port = free_port(), free_port()
    overrides = {"--secure-port": str(port), "--tls-cert-file": str(directory / "tls.crt"),
                 "--tls-private-key-file": str(directory / "tls.key"), "--oidc-ca-file": str(chain.broker.ca_file),
                 "--readiness-probe-port": str(ready_port)}
    args = [f"{a.split('=', 1)[0]}={overrides[a.split('=', 1)[0]]}" if a.split("=", 1)[0] in overrides else a
            for a in proxy_args(chain.broker.issuer, audience)]
    log = directory / "proxy.log"
    process = start_process([str(binaries.find("kube-oidc-proxy")), *args, "--bind-address=127.0.0.1",
                             f"--kubeconfig={chain.tenant.kubeconfig}"], log)

    def ready():
        assert process.poll() is None, tail(log)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ready_port}/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False
    try:
        eventually(ready, timeout=60, message="kube-oidc-proxy ready")
        yield f"https://127.0.0.1:{port}", ca.cert_pem
    finally:
        stop_process(process)


@require_binary("kube-oidc-proxy")
def test_proxy_trusting_another_audience_fails_at_the_identity_step(chain, tmp_path):
    right = f"keyless:{NAMESPACE}:viaproxy"
    with kube_oidc_proxy(chain, right, tmp_path / "right") as (server, ca_pem):
        apply(chain.control, manifest("viaproxy", server, ca_pem, mode="External"))
        chain.wait("viaproxy", "TokenVerified", "True", timeout=60)
        code, output = doctor(chain, f"{NAMESPACE}/viaproxy", "-o", "json")
        assert code == 0, output
        assert f"keyless:{TENANT}:viaproxy" in steps(output)["identity"]["message"]
    kubectl(chain.control, "delete", "rtc", "viaproxy", "-n", NAMESPACE, "--wait=true", "--timeout=60s")
    with kube_oidc_proxy(chain, f"keyless:{NAMESPACE}:someone-else", tmp_path / "wrong") as (server, ca_pem):
        apply(chain.control, manifest("viaproxy", server, ca_pem, mode="External"))
        chain.wait("viaproxy", "TokenVerified", "False", "TokenRejected", timeout=60)
        code, output = doctor(chain, f"{NAMESPACE}/viaproxy", "-o", "json")
        found = steps(output)
        assert code == 1
        assert found["identity"]["status"] == "fail" and "HTTP 401" in found["identity"]["message"]
        assert right in found["identity"]["fix"] and "--oidc-client-id" in found["identity"]["fix"]
        assert found["tenant-tls"]["status"] == "pass" and found["token"]["status"] == "pass"
        _, text = doctor(chain, f"{NAMESPACE}/viaproxy")
        print(text)
    kubectl(chain.control, "delete", "rtc", "viaproxy", "-n", NAMESPACE, "--wait=true", "--timeout=60s")
