"""The Helm chart against the real API server: what it renders passes a server-side dry run, and the real
operator, broker, agent and webhooks run under exactly the chart's ServiceAccounts and RBAC."""
from __future__ import annotations

import base64
import json
import ssl
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml
from kubernetes import client as k
from kubernetes.client.rest import ApiException

from keyless.cli import build_parser
from keyless.envtest.cluster import LocalCluster, free_port, start_process, stop_process, tail
from keyless.render.tenant import render_authentication_configuration

from .broker_fixtures import bound_caller_token, broker_tls, caller_pod
from .chart_fixtures import (ARGOCD_NAMESPACE, CHART, PKI_NAMESPACE, RELEASE_NAMESPACE, TENANT_NAMESPACE,
                             WEBHOOK_VALUES, PodFiles, can_i, chart_operator_args, container, forbidden_lines,
                             http_status, listening_ports, render, template, verified_claims)
from .chart_fixtures import (broker_under_chart_rbac, chart_identities, control_plane_with_crds,
                             operator_under_chart_rbac, registered_cluster)  # noqa: F401  (fixtures)
from .conftest import api_client, require_binary
from .helpers import eventually, kubectl
from .operator_fixtures import KEYLESS, apply, rtc_manifest

pytestmark = [pytest.mark.cluster, require_binary("helm")]


@pytest.mark.cluster
@pytest.mark.parametrize("values", [[], WEBHOOK_VALUES], ids=["defaults", "webhooks-enabled"])
def test_rendered_manifests_pass_server_side_dry_run(control_plane_with_crds, values):
    manifest = template("--set-json", f'tenantNamespaces=["{TENANT_NAMESPACE}"]', *values).stdout
    # Like helm, which creates the chart's Namespaces before the objects in them: a dry run of a
    # Namespace creates nothing, so the namespaced objects in it would find none.
    namespaces = [d for d in yaml.safe_load_all(manifest) if d and d["kind"] == "Namespace"]
    kubectl(control_plane_with_crds, "apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(namespaces))
    result = kubectl(control_plane_with_crds, "apply", "--server-side", "--dry-run=server", "-f", "-",
                     input=manifest)
    applied = [line for line in result.stdout.splitlines() if "serverside-applied" in line]
    rendered = [d for d in yaml.safe_load_all(manifest) if d]
    assert len(applied) == len(rendered), result.stdout
    assert "deployment.apps/keyless-broker serverside-applied (server dry run)" in result.stdout


@pytest.mark.cluster
def test_server_side_dry_run_refuses_a_broken_manifest(control_plane_with_crds):
    """The dry run above can fail: the same API server refuses an invalid Deployment."""
    docs = [d for d in render() if d["kind"] == "Deployment"]
    docs[0]["spec"]["selector"]["matchLabels"] = {"app.kubernetes.io/component": "something-else"}
    result = kubectl(control_plane_with_crds, "apply", "--server-side", "--dry-run=server", "-f", "-",
                     input=yaml.safe_dump_all(docs), check=False)
    assert result.returncode != 0 and "selector" in result.stderr, result.stderr


@pytest.mark.cluster
def test_argocd_controller_pod_with_the_agent_values_passes_server_side_dry_run(control_plane_with_crds):
    """The argocd-values.yaml pieces, placed as the argo-cd chart places them, form a valid Pod."""
    values = yaml.safe_load((CHART / "argocd-values.yaml").read_text())["controller"]
    controller = {"name": "application-controller", "image": "quay.io/argoproj/argocd:v3.1.0",
                  "args": ["/usr/local/bin/argocd-application-controller"], "volumeMounts": values["volumeMounts"]}
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "argocd-application-controller-0", "namespace": ARGOCD_NAMESPACE},
           "spec": {"serviceAccountName": "default", "containers": [controller, *values["extraContainers"]],
                    "volumes": values["volumes"]}}
    result = kubectl(control_plane_with_crds, "apply", "--server-side", "--dry-run=server", "-f", "-",
                     input=yaml.safe_dump(pod))
    assert "serverside-applied (server dry run)" in result.stdout


@pytest.mark.cluster
def test_chart_identities_cannot_touch_secrets_outside_their_namespaces(chart_identities):
    operator, broker = chart_identities.operator, chart_identities.broker
    # What the operator needs...
    assert can_i(operator, "create", "secrets", "-n", ARGOCD_NAMESPACE)
    assert can_i(operator, "delete", "secrets", "-n", TENANT_NAMESPACE)
    # ...and nothing more: not elsewhere, not cluster-wide, not the broker's signing keys.
    assert not can_i(operator, "create", "secrets", "-n", "default")
    assert not can_i(operator, "list", "secrets", "--all-namespaces")
    assert not can_i(operator, "list", "secrets", "-n", RELEASE_NAMESPACE)
    assert not can_i(operator, "update", "secrets/keyless-broker-signing-keys", "-n", RELEASE_NAMESPACE)
    assert not can_i(operator, "get", "secrets/keyless-broker-signing-keys", "-n", RELEASE_NAMESPACE)
    assert can_i(operator, "create", "secrets", "-n", PKI_NAMESPACE)
    assert not can_i(operator, "list", "secrets", "-n", PKI_NAMESPACE)
    assert not can_i(operator, "create", "secrets", "-n", TENANT_NAMESPACE)
    assert not can_i(operator, "create", "serviceaccounts", "--subresource=token", "-n", ARGOCD_NAMESPACE)
    assert broker != operator
    assert can_i(broker, "create", "tokenreviews.authentication.k8s.io")
    assert can_i(broker, "update", "secrets/keyless-broker-signing-keys", "-n", RELEASE_NAMESPACE)
    assert not can_i(broker, "update", "secrets/keyless-broker-tls", "-n", RELEASE_NAMESPACE)
    # The broker follows its key Secret by name: it may not list or watch the others.
    assert can_i(broker, "watch", "secrets/keyless-broker-signing-keys", "-n", RELEASE_NAMESPACE)
    assert not can_i(broker, "list", "secrets", "-n", RELEASE_NAMESPACE)
    assert not can_i(broker, "get", "secrets/keyless-broker-tls", "-n", RELEASE_NAMESPACE)
    assert not can_i(broker, "get", "secrets", "-n", ARGOCD_NAMESPACE)
    assert not can_i(broker, "create", "brokertargets.keyless.dev", "-n", RELEASE_NAMESPACE)
    assert not can_i(broker, "list", "pods", "-n", ARGOCD_NAMESPACE)


@pytest.mark.cluster
def test_operator_and_webhooks_may_read_which_tenant_owns_a_namespace_but_never_change_it(chart_identities):
    operator, webhooks = chart_identities.operator, chart_identities.webhooks
    for identity in (operator, webhooks):
        assert can_i(identity, "list", "namespaces") and can_i(identity, "watch", "namespaces")
        for verb in ("update", "patch", "create", "delete"):
            assert not can_i(identity, verb, "namespaces"), verb
    assert can_i(operator, "get", "namespaces")
    assert not can_i(webhooks, "get", "secrets", "-n", ARGOCD_NAMESPACE)
    assert not can_i(webhooks, "list", "secrets", "--all-namespaces")


@pytest.mark.cluster
def test_operator_under_chart_rbac_registers_a_cluster(registered_cluster, operator_under_chart_rbac, control_api):
    custom, core = k.CustomObjectsApi(control_api), k.CoreV1Api(control_api)
    assert registered_cluster["status"]["observedGeneration"] == registered_cluster["metadata"]["generation"]
    assert "keyless.dev/cleanup" in registered_cluster["metadata"]["finalizers"]  # patch on the manifest
    secret = core.read_namespaced_secret(f"keyless-{TENANT_NAMESPACE}-dev", ARGOCD_NAMESPACE)
    assert secret.metadata.labels["argocd.argoproj.io/secret-type"] == "cluster"
    project = custom.get_namespaced_custom_object("argoproj.io", "v1alpha1", ARGOCD_NAMESPACE, "appprojects",
                                                  "tenant-a")
    assert project["spec"]["destinations"]
    target = custom.get_namespaced_custom_object("keyless.dev", "v1alpha1", RELEASE_NAMESPACE, "brokertargets",
                                                 f"{TENANT_NAMESPACE}.dev")
    assert target["spec"]["audience"] == f"keyless:{TENANT_NAMESPACE}:dev"

    def events():
        found = core.list_namespaced_event(TENANT_NAMESPACE, field_selector="involvedObject.name=dev").items
        assert found, "no events yet"
        return found
    assert any(e.source.component == "keyless-operator" for e in eventually(events, message="operator events"))
    lease = k.CoordinationV1Api(control_api).read_namespaced_lease("keyless-operator", RELEASE_NAMESPACE)
    assert lease.spec.holder_identity
    assert not forbidden_lines(operator_under_chart_rbac.log())


@pytest.fixture(scope="module")
def managed_tenant(chart_identities, broker_under_chart_rbac, run_dir):
    """A tenant API server that trusts the broker for one audience, as kube-oidc-proxy would on its behalf
    (the proxy cannot be built here; without a kubelet no proxy Pod would run anyway)."""
    trust = render_authentication_configuration(chart_identities.issuer, f"keyless:{TENANT_NAMESPACE}:managed",
                                                broker_under_chart_rbac.ca.read_bytes())
    tenant = LocalCluster("chart-managed-tenant", run_dir / "chart-managed-tenant", controller_manager=False,
                          authentication_config=trust)
    tenant.start()
    yield tenant
    tenant.stop()


@pytest.mark.cluster
def test_operator_under_chart_rbac_installs_managed_mode_with_the_bootstrap_secret_and_then_deletes_it(
        operator_under_chart_rbac, managed_tenant, chart_identities, control_api):
    """Every Secret right the chart grants the operator, used for real: the bootstrap kubeconfig (get,
    delete) in a tenant namespace, the proxy CA Secret in the PKI namespace, the Argo CD Secret."""
    core = k.CoreV1Api(control_api)
    core.create_namespaced_secret(TENANT_NAMESPACE, k.V1Secret(
        metadata=k.V1ObjectMeta(name="managed-bootstrap", annotations={"keyless.dev/bootstrap-for": "managed"}),
        string_data={"kubeconfig": managed_tenant.kubeconfig.read_text()}))
    apply(chart_identities.cluster, {  # as the admin
        "apiVersion": "keyless.dev/v1alpha1", "kind": "RemoteTenantCluster",
        "metadata": {"name": "managed", "namespace": TENANT_NAMESPACE},
        "spec": {"tenant": "tenant-a", "server": managed_tenant.server,
                 "caData": base64.b64encode(managed_tenant.ca_pem).decode(),
                 "access": {"clusterRole": "cluster-admin"},
                 "bootstrap": {"kubeconfigSecretRef": {"name": "managed-bootstrap"}, "deleteAfterInstall": True}}})

    def verified():
        obj = k.CustomObjectsApi(control_api).get_namespaced_custom_object(
            "keyless.dev", "v1alpha1", TENANT_NAMESPACE, "remotetenantclusters", "managed")
        conditions = {c["type"]: c for c in (obj.get("status") or {}).get("conditions", [])}
        assert conditions.get("TokenVerified", {}).get("status") == "True", conditions
        return obj
    eventually(verified, timeout=120, message="the chain verified by the operator under the chart's RBAC")

    def bootstrap_deleted():
        try:
            core.read_namespaced_secret("managed-bootstrap", TENANT_NAMESPACE)
        except ApiException as e:
            return e.status == 404
        return False
    eventually(bootstrap_deleted, timeout=60, message="bootstrap Secret deleted after install")
    ca_secrets = core.list_namespaced_secret(
        PKI_NAMESPACE, label_selector=f"keyless.dev/cluster-namespace={TENANT_NAMESPACE},"
                                          "keyless.dev/cluster-name=managed").items
    assert [s.metadata.name for s in ca_secrets] and "ca.key" in ca_secrets[0].data
    tenant_apps = k.AppsV1Api(api_client(managed_tenant))
    assert tenant_apps.read_namespaced_deployment("kube-oidc-proxy", "kube-oidc-proxy")
    assert not forbidden_lines(operator_under_chart_rbac.log())


@pytest.mark.cluster
def test_only_the_leader_reconciles_and_the_standby_takes_over_the_lease_when_it_dies(
        operator_under_chart_rbac, chart_identities, control_api, registered_cluster):
    coordination = k.CoordinationV1Api(control_api)

    def lease():
        return coordination.read_namespaced_lease("keyless-operator", RELEASE_NAMESPACE).spec

    leader = lease().holder_identity
    metrics_port, health_port = free_port(), free_port()
    args = [KEYLESS, "operator", f"--kubeconfig={chart_identities.operator}", "--log-level=DEBUG",
            f"--metrics-listen=127.0.0.1:{metrics_port}", f"--health-listen=127.0.0.1:{health_port}",
            *chart_operator_args(chart_identities, "standby", control_api)]
    log = chart_identities.directory / "standby.log"
    standby = start_process(args, log)
    try:
        # While the leader lives and renews, the standby (same args, same RBAC) only waits.
        renewals = set()

        def leader_renewed_twice():
            spec = lease()
            assert spec.holder_identity == leader, spec.holder_identity
            renewals.add(spec.renew_time)
            return len(renewals) >= 3
        eventually(leader_renewed_twice, timeout=60, message="the leader renewing beside the standby")
        assert standby.poll() is None, tail(log)
        assert "now leads" not in log.read_text()
        assert "remote_tenant_cluster_event" not in log.read_text()  # the standby handled nothing
        # The chart's probe is answered by the standby too (it listens on the health port itself), so
        # the kubelet never restarts a healthy standby.
        probe = container(chart_identities.docs, "keyless-operator")["livenessProbe"]["httpGet"]
        assert probe == {"path": "/healthz", "port": "health"}
        assert listening_ports(standby.pid) == {metrics_port, health_port}, tail(log)
        assert http_status(f"http://127.0.0.1:{health_port}{probe['path']}") == 200

        operator_under_chart_rbac.stop()

        def new_leader():
            holder = lease().holder_identity
            assert holder != leader, holder
            return holder
        eventually(new_leader, timeout=60, message="the standby took the Lease")
        assert standby.poll() is None, tail(log)
        # ...and reconciles: a new manifest is registered by the former standby, under the same RBAC.
        apply(chart_identities.cluster, rtc_manifest("staging", TENANT_NAMESPACE))
        def staging_registered():
            try:
                return k.CoreV1Api(control_api).read_namespaced_secret(f"keyless-{TENANT_NAMESPACE}-staging",
                                                                       ARGOCD_NAMESPACE)
            except ApiException as e:
                raise AssertionError(e.reason) from None
        eventually(staging_registered, timeout=60, message="staging registered by the former standby")
        assert not forbidden_lines(log.read_text())
    finally:
        stop_process(standby)
        if operator_under_chart_rbac.process is None:
            # Bring the module's operator back: later tests and its teardown (which finalizes this
            # module's manifests) need one running.
            operator_under_chart_rbac.start()


@pytest.mark.cluster
def test_broker_under_chart_rbac_serves_discovery_and_mints_for_a_pod_bound_caller(
        broker_under_chart_rbac, registered_cluster, control_api):
    broker, issuer = broker_under_chart_rbac.process, broker_under_chart_rbac.issuer
    discovery = broker.get("/.well-known/openid-configuration")
    assert discovery.status_code == 200 and discovery.json()["issuer"] == issuer
    jwks = broker.get("/openid/v1/jwks").json()
    assert jwks["keys"]

    pod = caller_pod(control_api, ARGOCD_NAMESPACE, "argocd-application-controller")
    caller = bound_caller_token(control_api, pod)
    target = registered_cluster["status"]["targetName"]
    response = broker.mint(target, caller)
    assert response.status_code == 200, response.text
    claims = verified_claims(response.json()["token"], jwks, f"keyless:{TENANT_NAMESPACE}:dev", issuer)
    assert claims["sub"] == "keyless:tenant-a:argocd"

    # The broker's Pod check runs under the chart's RBAC too: a deleted caller Pod is refused.
    k.CoreV1Api(control_api).delete_namespaced_pod(pod.metadata.name, ARGOCD_NAMESPACE, grace_period_seconds=0)
    refused = eventually(lambda: (r := broker.mint(target, caller)).status_code == 401 and r.json(),
                         message="mint refused after the caller Pod is gone")
    assert refused["error"] == "pod_gone"
    assert not forbidden_lines(broker.log_text())
    secret = k.CoreV1Api(control_api).read_namespaced_secret("keyless-broker-signing-keys", RELEASE_NAMESPACE)
    assert secret.metadata.labels["keyless.dev/component"] == "broker-signing-keys"


@pytest.mark.cluster
def test_agent_from_argocd_values_keeps_the_credential_the_registered_exec_command_reads(
        broker_under_chart_rbac, registered_cluster, chart_identities, control_api):
    """operator (chart RBAC) -> Argo CD Secret; broker (chart RBAC) -> token; agent (argocd-values) -> file."""
    values = yaml.safe_load((CHART / "argocd-values.yaml").read_text())["controller"]
    (agent,) = values["extraContainers"]
    parsed = build_parser().parse_args(agent["args"])
    pod = caller_pod(control_api, ARGOCD_NAMESPACE, "argocd-application-controller",
                     pod_name="argocd-application-controller-0")
    files = PodFiles(chart_identities.directory / "agent")
    files.put(parsed.token_file, bound_caller_token(control_api, pod, audience="keyless-broker").encode())
    files.put(parsed.broker_ca_file, broker_under_chart_rbac.ca.read_bytes())
    credentials = chart_identities.directory / "agent" / "credentials"
    credentials.mkdir(mode=0o700)
    files.files[parsed.dir] = credentials
    files.files[parsed.broker_url] = broker_under_chart_rbac.process.url  # the Service, as the test reaches it
    health = free_port()
    args = [KEYLESS, *files.args(agent["args"], drop=("--health-listen",)), f"--health-listen=127.0.0.1:{health}"]
    log = chart_identities.directory / "agent.log"
    process = start_process(args, log)
    try:
        secret = k.CoreV1Api(control_api).read_namespaced_secret(f"keyless-{TENANT_NAMESPACE}-dev", ARGOCD_NAMESPACE)
        exec_config = json.loads(base64.b64decode(secret.data["config"]))["execProviderConfig"]
        assert exec_config["command"] == "cat" and exec_config["args"][0].startswith(parsed.dir + "/")
        in_pod_path = exec_config["args"][0]
        local_path = credentials / Path(in_pod_path).relative_to(parsed.dir)

        def credential():
            assert process.poll() is None, tail(log)
            assert local_path.exists(), sorted(p.name for p in credentials.iterdir())
            # What client-go in the controller container does: run the configured command.
            run = subprocess.run([exec_config["command"], str(local_path)], capture_output=True, text=True,
                                 timeout=10)
            return json.loads(run.stdout)
        exec_credential = eventually(credential, timeout=60, message="the agent's credential file")
        assert exec_credential["apiVersion"] == exec_config["apiVersion"] == parsed.exec_api_version
        assert exec_credential["kind"] == "ExecCredential"
        assert exec_credential["status"]["expirationTimestamp"]
        jwks = broker_under_chart_rbac.process.get("/openid/v1/jwks").json()
        claims = verified_claims(exec_credential["status"]["token"], jwks, f"keyless:{TENANT_NAMESPACE}:dev",
                                 broker_under_chart_rbac.issuer)
        assert claims["sub"] == "keyless:tenant-a:argocd"
        assert oct(local_path.stat().st_mode & 0o777) == "0o600"
    finally:
        stop_process(process)


@pytest.mark.cluster
def test_webhook_server_under_chart_rbac_syncs_its_tenant_directory_and_turns_ready(chart_identities,
                                                                                    registered_cluster):
    files = PodFiles(chart_identities.directory / "webhooks")
    ca, cert, key = broker_tls(chart_identities.directory / "webhooks-tls")
    files.put("/var/run/keyless/tls/tls.crt", cert.read_bytes())
    files.put("/var/run/keyless/tls/tls.key", key.read_bytes())
    spec = container(chart_identities.docs, "keyless-webhooks")
    port = free_port()
    assert "command" not in spec  # the image's entry point, keyless: `keyless webhooks ...`
    args = [str(KEYLESS), spec["args"][0], f"--kubeconfig={chart_identities.webhooks}",
            *files.args(spec["args"][1:], drop=("--listen", "--metrics-listen")), f"--listen=127.0.0.1:{port}"]
    log = chart_identities.directory / "webhooks.log"
    process = start_process(args, log)
    context = ssl.create_default_context(cafile=str(ca))
    probe = spec["readinessProbe"]["httpGet"]

    def ready():
        assert process.poll() is None, tail(log)
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}{probe['path']}", context=context, timeout=2) as r:
                return r.status == 200
        except OSError as e:
            raise AssertionError(str(e)) from None
    try:
        # /readyz turns 200 only after the RemoteTenantCluster list+watch succeeded under the chart's RBAC.
        eventually(ready, timeout=90, message="webhook server ready under the chart's RBAC")
        assert not forbidden_lines(log.read_text())
    finally:
        stop_process(process)
