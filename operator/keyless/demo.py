"""`make demo`: the whole product on one machine, end to end, with real binaries.

Starts two local clusters (control plane + tenant), the broker, the operator and the agent as
local processes, applies examples/tenant-a-dev.yaml, waits for Ready, then does what Argo CD does:
runs real kubectl with exactly the cluster config from the generated Argo CD Secret (exec: cat the
agent's credential file) against the tenant cluster. Everything is stopped at the end.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from .envtest import binaries
from .envtest.cluster import LocalCluster, free_port, start_clusters, start_process, stop_process, tail
from .pki import issue_certificate, new_ca
from .render.tenant import render_authentication_configuration

ROOT = Path(__file__).resolve().parents[2]
SHARED_ARGOCD_CRDS = ROOT.parent / "shared" / "testdata" / "argocd-crds"
KEYLESS = str(Path(sys.executable).parent / "keyless")
OPERATOR_SA = "system:serviceaccount:keyless-system:keyless-operator"


def step(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


class Demo:
    def __init__(self, workdir: Path):
        self.dir = workdir
        self.processes: list[tuple[str, subprocess.Popen, Path]] = []
        self.kubectl_bin = str(binaries.find("kubectl"))

    def kubectl(self, cluster: LocalCluster, *args: str, input: str | None = None, check: bool = True,
                kubeconfig: Path | None = None) -> str:
        result = subprocess.run([self.kubectl_bin, f"--kubeconfig={kubeconfig or cluster.kubeconfig}", *args],
                                input=input, capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise SystemExit(f"demo: kubectl {' '.join(args)} failed:\n{result.stderr}")
        return result.stdout

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = self.dir / f"{name}.log"
        process = start_process(args, log, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.processes.append((name, process, log))
        return process

    def stop_all(self) -> None:
        for _, process, _ in reversed(self.processes):
            stop_process(process)

    def wait_http(self, name: str, url: str, ca_file: Path | None = None, timeout: float = 60) -> None:
        import ssl
        import urllib.request

        process, log = next((p, lg) for n, p, lg in self.processes if n == name)
        context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"demo: {name} exited; its log ({log}):\n{tail(log)}")
            try:
                with urllib.request.urlopen(url, context=context, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"demo: {name} not ready after {timeout:.0f}s; its log ({log}):\n{tail(log)}")


def bound_token(demo: Demo, cluster: LocalCluster, namespace: str, account: str, pod: str) -> str:
    """A ServiceAccount + Pod, and a token bound to that Pod: what the kubelet would project."""
    demo.kubectl(cluster, "create", "namespace", namespace, check=False)
    demo.kubectl(cluster, "-n", namespace, "create", "serviceaccount", account, check=False)
    demo.kubectl(cluster, "apply", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod, "namespace": namespace},
        "spec": {"serviceAccountName": account, "containers": [{"name": "main", "image": "example.invalid/pod"}]}}))
    return demo.kubectl(cluster, "-n", namespace, "create", "token", account, "--audience=keyless-broker",
                        "--duration=3600s", "--bound-object-kind=Pod", f"--bound-object-name={pod}").strip()


def main() -> int:
    if not SHARED_ARGOCD_CRDS.is_dir():
        print(f"demo: Argo CD's CRDs are expected in {SHARED_ARGOCD_CRDS} (../shared/testdata beside the project)",
              file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="keyless-demo-"))
    demo = Demo(workdir)
    control = tenant = None
    started = time.monotonic()
    try:
        step("Broker identity: a CA and a serving certificate; the issuer URL tenants will trust")
        broker_port = free_port()
        issuer = f"https://127.0.0.1:{broker_port}"
        ca, _ = new_ca("keyless-demo-broker-ca")
        serving = issue_certificate(ca, "keyless-broker", server=True, dns_names=("localhost",), ip_addresses=("127.0.0.1",))
        (workdir / "broker-ca.crt").write_bytes(ca.cert_pem)
        (workdir / "broker.crt").write_bytes(serving.cert_pem)
        (workdir / "broker.key").write_bytes(serving.key_pem)
        (workdir / "broker.key").chmod(0o600)
        print(f"    issuer: {issuer}")

        step("Two local clusters (etcd + kube-apiserver): the control plane, and a tenant that trusts the broker")
        audience = "keyless:tenants:tenant-a-dev"
        control = LocalCluster("control", workdir / "control")
        tenant = LocalCluster("tenant-a-dev", workdir / "tenant", controller_manager=False,
                              authentication_config=render_authentication_configuration(issuer, audience, ca.cert_pem))
        start_clusters([control, tenant])
        print(f"    control plane: {control.server}   tenant: {tenant.server}")
        print("    (the tenant's --authentication-config is what `keyless render` prints for Direct mode)")

        step("Install the CRDs (Keyless's and Argo CD's) and namespaces on the control plane")
        demo.kubectl(control, "apply", "--server-side", "-f", str(ROOT / "crds"), "-f", str(SHARED_ARGOCD_CRDS))
        for _ in range(100):
            if subprocess.run([demo.kubectl_bin, f"--kubeconfig={control.kubeconfig}", "wait", "--for=condition=Established",
                               "crd", "--all", "--timeout=5s"], capture_output=True).returncode == 0:
                break
            time.sleep(0.2)
        for namespace in ("argocd", "keyless-system", "tenants"):
            demo.kubectl(control, "create", "namespace", namespace, check=False)

        step("Start the broker, the operator and the agent (as Pods would run them)")
        operator_token = workdir / "operator-token"
        operator_token.write_text(bound_token(demo, control, "keyless-system", "keyless-operator", "keyless-operator-0"))
        agent_token = workdir / "agent-token"
        agent_token.write_text(bound_token(demo, control, "argocd", "argocd-application-controller",
                                           "argocd-application-controller-0"))
        for path in (operator_token, agent_token):
            path.chmod(0o600)
        demo.start("broker", [KEYLESS, "broker", "--issuer", issuer, "--listen", f"127.0.0.1:{broker_port}",
                              "--tls-cert-file", str(workdir / "broker.crt"), "--tls-key-file", str(workdir / "broker.key"),
                              "--namespace", "keyless-system", "--kubeconfig", str(control.kubeconfig),
                              "--operator-identity", OPERATOR_SA])
        demo.wait_http("broker", f"{issuer}/readyz", workdir / "broker-ca.crt")
        credentials = workdir / "credentials"
        credentials.mkdir(mode=0o700)
        health = free_port()
        demo.start("operator", [KEYLESS, "operator", f"--kubeconfig={control.kubeconfig}",
                                f"--broker-issuer={issuer}", f"--broker-ca-file={workdir / 'broker-ca.crt'}",
                                f"--broker-token-file={operator_token}", f"--credential-dir={credentials}",
                                f"--metrics-listen=127.0.0.1:{free_port()}", f"--health-listen=127.0.0.1:{health}",
                                "--resync-seconds=10", "--verify-seconds=30"])
        demo.wait_http("operator", f"http://127.0.0.1:{health}/healthz")
        agent_health = free_port()
        demo.start("agent", [KEYLESS, "agent", "--broker-url", issuer, "--broker-ca-file", str(workdir / "broker-ca.crt"),
                             "--token-file", str(agent_token), "--dir", str(credentials),
                             "--health-listen", f"127.0.0.1:{agent_health}", "--targets-poll-seconds=2"])
        demo.wait_http("agent", f"http://127.0.0.1:{agent_health}/healthz")

        step("The tenant admin binds the one identity to a role on the tenant cluster")
        demo.kubectl(tenant, "create", "clusterrole", "tenant-a-deployer", "--verb=get,list,watch,create,update,patch,delete",
                     "--resource=namespaces,configmaps,deployments.apps,services")
        demo.kubectl(tenant, "create", "clusterrolebinding", "keyless-tenant-a", "--clusterrole=tenant-a-deployer",
                     "--user=keyless:tenant-a:argocd")

        step("Apply examples/tenant-a-dev.yaml: one RemoteTenantCluster")
        manifest = (ROOT / "examples" / "tenant-a-dev.yaml").read_text()
        manifest = manifest.replace("${SERVER}", tenant.server).replace(
            "${CA_DATA}", base64.b64encode(tenant.ca_pem).decode())
        demo.kubectl(control, "apply", "-f", "-", input=manifest)
        deadline = time.monotonic() + 120
        while True:
            ready = demo.kubectl(control, "get", "rtc", "tenant-a-dev", "-n", "tenants", "-o",
                                 "jsonpath={.status.conditions[?(@.type=='Ready')].status}", check=False)
            if ready == "True":
                break
            if time.monotonic() > deadline:
                print(demo.kubectl(control, "get", "rtc", "-n", "tenants", "-o", "yaml"))
                raise SystemExit("demo: tenant-a-dev did not become Ready in 120 s (see the conditions above)")
            time.sleep(0.5)
        print(demo.kubectl(control, "get", "rtc", "-A"))

        step("Do what Argo CD does: use the generated cluster Secret's config verbatim")
        secret = json.loads(demo.kubectl(control, "get", "secret", "-n", "argocd", "-l",
                                         "argocd.argoproj.io/secret-type=cluster", "-o", "json"))["items"][0]
        data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
        config = json.loads(data["config"])
        exec_config = config["execProviderConfig"]
        print(f"    Secret argocd/{secret['metadata']['name']}: name={data['name']} server={data['server']} "
              f"project={data['project']}")
        print(f"    execProviderConfig: {exec_config['command']} {' '.join(exec_config['args'])}")
        kubeconfig = workdir / "argocd-view.kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "argocd",
            "clusters": [{"name": data["name"], "cluster": {
                "server": data["server"], "certificate-authority-data": config["tlsClientConfig"]["caData"]}}],
            "users": [{"name": "argocd", "user": {"exec": {
                "apiVersion": exec_config["apiVersion"], "command": exec_config["command"],
                "args": exec_config["args"], "interactiveMode": "Never"}}}],
            "contexts": [{"name": "argocd", "context": {"cluster": data["name"], "user": "argocd"}}],
        }))
        credential = credentials / exec_config["args"][0].rsplit("/", 1)[-1]
        for _ in range(100):
            if credential.exists():
                break
            time.sleep(0.1)
        who = json.loads(demo.kubectl(tenant, "auth", "whoami", "-o", "json", kubeconfig=kubeconfig))
        print(f"    kubectl auth whoami on the tenant -> {who['status']['userInfo']['username']}")
        demo.kubectl(tenant, "create", "namespace", "tenant-a-app", kubeconfig=kubeconfig)
        demo.kubectl(tenant, "-n", "tenant-a-app", "create", "configmap", "deployed-by-argocd",
                     "--from-literal=hello=world", kubeconfig=kubeconfig)
        print("    created namespace tenant-a-app and a ConfigMap in it, as the one identity")
        denied = subprocess.run([demo.kubectl_bin, f"--kubeconfig={kubeconfig}", "get", "secrets", "-A"],
                                capture_output=True, text=True)
        print(f"    reading Secrets is refused: {denied.stderr.strip().splitlines()[-1] if denied.stderr else denied.returncode}")
        stamp = json.loads(credential.read_text())["status"]["expirationTimestamp"]
        print(f"    the credential file expires at {stamp}; the agent renews it at ~half its 60 s life")

        step("What happened")
        print(textwrap_explanation(issuer, audience))
        keep = os.environ.get("KEYLESS_KEEP_DEMO") == "1"
        print(f"\nDemo finished in {time.monotonic() - started:.0f} s. "
              + (f"Logs and kubeconfigs: {workdir}" if keep else "Set KEYLESS_KEEP_DEMO=1 to keep its logs and kubeconfigs."))
        return 0
    finally:
        demo.stop_all()
        for cluster in (control, tenant):
            if cluster is not None:
                cluster.stop()
        if os.environ.get("KEYLESS_KEEP_DEMO") != "1":
            shutil.rmtree(workdir, ignore_errors=True)


def textwrap_explanation(issuer: str, audience: str) -> str:
    return f"""    1. The operator turned one RemoteTenantCluster into an Argo CD cluster Secret whose exec command is
       `cat <credential file>` (no static credential), an AppProject limited to tenant-a's clusters, and a
       BrokerTarget (audience {audience}).
    2. The agent, holding only a Pod-bound ServiceAccount token, asked the broker for a token for each target
       it may use; the broker checked it with a TokenReview (and that its Pod exists) and minted a 60 s ES256 JWT.
    3. kubectl (standing in for Argo CD's client-go) ran the exec command and presented that JWT to the tenant,
       which trusts {issuer} for exactly this audience and saw the one identity keyless:tenant-a:argocd.
    4. The operator proved the same chain itself (TokenVerified) before reporting Ready."""


if __name__ == "__main__":
    sys.exit(main())
