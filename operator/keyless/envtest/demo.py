"""`make demo`: the whole product on one machine, end to end, with the real Argo CD.

Starts a control plane and two tenant clusters (etcd + kube-apiserver each; in Managed mode, the default,
each tenant also gets a real node on which kube-oidc-proxy runs as the Pods the operator installs), the
broker, the operator, and
Argo CD v3 (application controller, repo-server, ApplicationSet controller, Redis) with the Keyless agent
beside its controller as charts/keyless/argocd-values.yaml configures it. Applies one RemoteTenantCluster
per tenant and one ApplicationSet per tenant whose cluster generator selects that tenant's Keyless cluster
Secrets by label; Argo CD then syncs each tenant's folder of a local git repository into its cluster,
through the agent's credential files. Prints the Applications' status and what landed on each tenant.
Everything is stopped at the end (KEYLESS_KEEP_DEMO=1 keeps the logs).
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import binaries
from .argocd import NAMESPACE as ARGOCD_NAMESPACE, ArgoCDStartError, write_parent_pid_logging_wrapper
from .cluster import ClusterStartError
from .network import Leftovers, NodeUnavailable
from .gitrepo import LocalGitRepository
from .stack import KeylessStack, StackError, config_map_manifest, tenant_application_set
from .tenants import TenantCluster

CLUSTERS = [TenantCluster("tenant-a", "tenant-a-dev"), TenantCluster("tenant-b", "tenant-b-dev")]
APP_NAMESPACE = "hello"


STEPS = 9  # the step() calls of run(), so each says how far along the demo is
_step = 0


def step(text: str) -> None:
    global _step
    _step += 1
    print(f"\n\033[1m==> [{_step}/{STEPS}] {text}\033[0m", flush=True)


def progress(text: str) -> None:
    print(f"    {text}", flush=True)


def wait_for(what: str, check, stack: KeylessStack, timeout: float = 180.0, every: float = 15.0):
    """Polls `check`; says every `every` seconds that it is still waiting, and for how long."""
    started = time.monotonic()
    deadline, next_note = started + timeout, started + every
    while True:
        value = check()
        if value:
            return value
        now = time.monotonic()
        if now > deadline:
            raise StackError(f"demo: {what} did not happen in {timeout:.0f} s\n{stack.logs()}")
        if now >= next_note:
            progress(f"... waiting for {what}: {now - started:.0f} s of at most {timeout:.0f} s")
            next_note = now + every
        time.sleep(1)


def synced_applications(stack: KeylessStack, expected: int):
    listed = stack.get(stack.control, "applications", "-n", ARGOCD_NAMESPACE) or {"items": []}
    apps = listed["items"]
    done = [a for a in apps if (a.get("status") or {}).get("sync", {}).get("status") == "Synced"
            and (a.get("status") or {}).get("health", {}).get("status") == "Healthy"]
    return apps if len(done) == expected == len(apps) else None


def run(proxy_mode: str, workdir: Path) -> int:
    started = time.monotonic()
    binaries.find("argocd"), binaries.find("redis")
    exec_log = workdir / "exec-calls.log"
    wrappers = workdir / "controller-path"
    # Records who runs the exec command: a `cat` that logs its parent PID, first on the controller's PATH.
    write_parent_pid_logging_wrapper(wrappers, "cat", exec_log)
    stack = KeylessStack(workdir, CLUSTERS, proxy_mode=proxy_mode, controller_path_prefix=[wrappers],
                         # the agent's production default is 15 s; the demo is impatient
                         agent_extra_args=["--targets-poll-seconds=2"])
    try:
        step(f"Start a control plane and two tenant clusters ({proxy_mode} mode: each tenant trusts the broker for "
             "its own audience only), the broker, the operator, and the real Argo CD with the Keyless agent")
        stack.start(progress=progress)
        print(f"    control plane {stack.control.server}   broker (OIDC issuer) {stack.issuer}")
        for cluster in CLUSTERS:
            tenant = stack.tenants[cluster.name]
            node = f", node {tenant.cluster.node.name} ({tenant.cluster.node.addresses.node_ip})" if tenant.cluster.node else ""
            print(f"    {cluster.tenant}: cluster {cluster.name}, API server {tenant.cluster.server}{node}")
        how = ("in a private mount namespace where the Pod's volumes are mounted at their paths"
               if stack.argocd.sandboxed else "with the Pod's volume paths mapped to folders of the run")
        print(f"    Argo CD {binaries.VERSIONS['argocd']}: controller as system:serviceaccount:argocd:"
              f"argocd-application-controller (Pod-bound token), agent beside it {how}")

        step("A local git repository with each tenant's manifests (a ConfigMap per tenant)")
        repo = LocalGitRepository(workdir / "gitops-repo")
        sha = repo.commit({f"{c.tenant}/hello.yaml": config_map_manifest("hello", {"tenant": c.tenant, "revision": "1"})
                           for c in CLUSTERS}, "tenants: first revision")
        print(f"    {repo.url} at {sha[:12]}: tenant-a/hello.yaml, tenant-b/hello.yaml")

        step("The platform admin applies one RemoteTenantCluster per tenant")
        for cluster in CLUSTERS:
            stack.apply_cluster(cluster.name)
        for cluster in CLUSTERS:
            progress(f"waiting for {cluster.namespace}/{cluster.name} to be Ready (the operator proves the chain)")
            stack.wait_ready(cluster.name)
        print(stack.kubectl(stack.control, "get", "rtc", "-A").stdout)
        if proxy_mode == "Managed":
            for cluster in CLUSTERS:
                secret = stack.tenants[cluster.name].bootstrap_secret
                gone = stack.get(stack.control, "secret", secret, "-n", cluster.namespace) is None
                print(f"    {cluster.namespace}/{secret} (the bootstrap kubeconfig): "
                      + ("deleted once the chain was verified" if gone else "still there"))

        step("The operator registered each cluster in Argo CD: a cluster Secret with an exec command, no credential")
        for cluster in CLUSTERS:
            secret = stack.get(stack.control, "secret", cluster.argocd_secret_name, "-n", ARGOCD_NAMESPACE)
            data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
            exec_config = json.loads(data["config"])["execProviderConfig"]
            print(f"    Secret argocd/{cluster.argocd_secret_name}: project={data['project']} "
                  f"labels keyless.dev/tenant={secret['metadata']['labels']['keyless.dev/tenant']}")
            print(f"      execProviderConfig: {exec_config['command']} {' '.join(exec_config['args'])}")

        step("Each tenant's ApplicationSet: a cluster generator selecting its Keyless clusters by label")
        for cluster in CLUSTERS:
            stack.apply(stack.control, tenant_application_set(cluster.tenant, repo.url, cluster.tenant, APP_NAMESPACE))
            print(f"    ApplicationSet argocd/{cluster.tenant}: clusters with keyless.dev/tenant={cluster.tenant} "
                  f"-> project {cluster.tenant}, path {cluster.tenant}/")

        step("Argo CD syncs from git into each tenant cluster")
        apps = wait_for("both Applications Synced and Healthy", lambda: synced_applications(stack, len(CLUSTERS)), stack)
        print(f"    {'APPLICATION':<22}{'PROJECT':<10}{'DESTINATION':<28}{'SYNC':<8}{'HEALTH':<9}REVISION")
        for app in sorted(apps, key=lambda a: a["metadata"]["name"]):
            status = app["status"]
            print(f"    {app['metadata']['name']:<22}{app['spec']['project']:<10}{app['spec']['destination']['server']:<28}"
                  f"{status['sync']['status']:<8}{status['health']['status']:<9}{status['sync']['revision'][:12]}")

        step("What landed on each tenant, and who put it there (the tenant's own audit log)")
        for cluster in CLUSTERS:
            tenant = stack.tenants[cluster.name]
            landed = stack.get(tenant.cluster, "configmap", "hello", "-n", APP_NAMESPACE)
            creators = tenant.creators("configmaps", APP_NAMESPACE)
            print(f"    {cluster.name}: ConfigMap {APP_NAMESPACE}/hello {json.dumps(landed['data'], sort_keys=True)}, "
                  f"created by {', '.join(creators)}")
        calls = [line.split(" ", 2) for line in exec_log.read_text().splitlines()]
        parents = {int(pid) for pid, _, _ in calls}
        who = ("the application controller" if parents == {stack.argocd.controller_pid}
               else f"processes {sorted(parents)}, not only the controller ({stack.argocd.controller_pid})")
        print(f"    the exec command (`cat` of the agent's file) ran {len(calls)} times, every time as a child of {who}")
        for cluster in CLUSTERS:
            may = stack.kubectl(stack.tenants[cluster.name].cluster, "auth", "can-i", "get", "secrets", "-A",
                                f"--as={cluster.username}", check=False).stdout.strip()
            print(f"    on {cluster.name}, may {cluster.username} read Secrets? {may}"
                  + (" (cluster-admin of its own cluster, the tenant admin's choice)" if proxy_mode == "Managed" else ""))

        step("Do what Argo CD does, by hand: kubectl with exactly the config of tenant-a's cluster Secret")
        through_the_secret(stack, CLUSTERS[0], workdir)

        step("What happened")
        print(explanation(proxy_mode))
        keep = os.environ.get("KEYLESS_KEEP_DEMO") == "1"
        print(f"\nDemo finished in {time.monotonic() - started:.0f} s. "
              + (f"Logs and kubeconfigs: {workdir}" if keep else "Set KEYLESS_KEEP_DEMO=1 to keep its logs and kubeconfigs."))
        return 0
    except (StackError, ArgoCDStartError, ClusterStartError) as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    finally:
        stack.stop()


def through_the_secret(stack: KeylessStack, cluster: TenantCluster, workdir: Path) -> None:
    """kubectl with the Secret's server, CA and exec command (the pod path of the credential file mapped to
    where this host sees it); in Managed mode, the proxy Pod's own log line for that request."""
    import subprocess

    import yaml

    from ..render.argocd_client import kubeconfig_from_cluster_secret

    secret = stack.get(stack.control, "secret", cluster.argocd_secret_name, "-n", ARGOCD_NAMESPACE)
    config = kubeconfig_from_cluster_secret(secret)
    exec_config = config["users"][0]["user"]["exec"]
    exec_config["args"] = [str(stack.argocd.credential_dir / Path(exec_config["args"][0]).name)]
    kubeconfig = workdir / "argocd-view.kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(config))
    server = config["clusters"][0]["cluster"]["server"]
    tenant = stack.tenants[cluster.name]
    where = "the proxy's Service" if server != tenant.cluster.server else "the API server itself"
    print(f"    server {server} ({where}); exec: {exec_config['command']} <the agent's file for {cluster.target}>")
    who = subprocess.run([str(binaries.find("kubectl")), f"--kubeconfig={kubeconfig}", "auth", "whoami", "-o", "json"],
                         capture_output=True, text=True, timeout=60)
    if who.returncode != 0:
        raise StackError(f"kubectl through the Secret's config failed: {who.stderr.strip()}")
    print(f"    kubectl auth whoami -> {json.loads(who.stdout)['status']['userInfo']['username']}")
    if tenant.proxy_mode != "Managed":
        return
    pods = stack.get(tenant.cluster, "pods", "-n", "kube-oidc-proxy")["items"]
    lines = [line for pod in pods
             for line in stack.kubectl(tenant.cluster, "logs", "-n", "kube-oidc-proxy", pod["metadata"]["name"]).stdout.splitlines()
             if "AuSuccess" in line and "selfsubjectreviews" in line]
    if lines:
        print(f"    the proxy Pod's own log line for it:\n      {lines[-1].strip()}")
    running = ", ".join(f"{p['metadata']['name']} on {p['spec'].get('nodeName')}" for p in pods)
    print(f"    kube-oidc-proxy Pods: {running}")


def explanation(proxy_mode: str) -> str:
    tenant_side = (
        "each tenant's kube-oidc-proxy (installed by the operator with a\n"
        "       bootstrap credential that it deleted once the chain was verified) checked the token against the\n"
        "       broker's JWKS and impersonated the one identity keyless:<tenant>:argocd" if proxy_mode == "Managed" else
        "the tenant API server, trusting the broker for this\n"
        "       cluster's audience only, saw the one identity keyless:<tenant>:argocd, bound there to a role\n"
        "       without Secrets")
    return f"""    1. The operator turned each RemoteTenantCluster into an Argo CD cluster Secret whose exec command is
       `cat <credential file>` (no static credential), labelled with its tenant; an AppProject per tenant
       limited to that tenant's clusters; and a BrokerTarget with an audience unique to the cluster.
    2. The agent beside Argo CD's application controller, holding only a Pod-bound ServiceAccount token,
       keeps a fresh 60 s ExecCredential per cluster; the broker checked it with a TokenReview (and that its
       Pod exists) before minting each token.
    3. Each ApplicationSet's cluster generator picked its tenant's clusters by the keyless.dev/tenant label;
       Argo CD's controller ran the exec command and presented the token; {tenant_side}."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keyless.envtest.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--proxy-mode", default=os.environ.get("KEYLESS_DEMO_PROXY_MODE", "Managed"),
                        choices=["Direct", "Managed"],
                        help="how the tenants trust the broker: Managed (kube-oidc-proxy Pods on a real node per "
                             "tenant; needs root) or Direct (the tenant API server trusts the broker). "
                             "Default %(default)s")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="keyless-demo-"))
    try:
        return run(args.proxy_mode, workdir)
    except (ValueError, NodeUnavailable, Leftovers) as e:  # e.g. Managed mode without root
        print(f"demo: {e}", file=sys.stderr)
        return 2
    finally:
        if os.environ.get("KEYLESS_KEEP_DEMO") != "1":
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
