"""Every Argo CD component that talks to managed clusters gets credentials the same way: argocd-values.yaml
gives the application controller, argocd-server and the ApplicationSet controller the agent sidecar with
its own Pod-bound token. Pods shaped as the argo-cd chart shapes them from those values pass the real API
server's dry run; Pods of each component's ServiceAccount get a real TokenRequest token from the values'
projection, and with it the real broker (under the chart's RBAC) mints, as far as the cluster's
allowedCallers allow: argocd-server by default, the ApplicationSet controller once a manifest lists it.
"""
from __future__ import annotations

import json
import uuid

import pytest
import yaml
from kubernetes import client as k
from kubernetes.client.rest import ApiException

from keyless.cli import build_parser
from keyless.envtest import binaries
from keyless.envtest.cluster import free_port, start_process, stop_process, tail
from keyless.model.spec import DEFAULT_CALLER_ACCOUNTS, parse

from .broker_fixtures import bound_caller_token
from .chart_fixtures import ARGOCD_NAMESPACE, CHART, TENANT_NAMESPACE, PodFiles, container, render, verified_claims
from .chart_fixtures import (broker_under_chart_rbac, chart_identities, control_plane_with_crds,
                             operator_under_chart_rbac, registered_cluster)  # noqa: F401  (fixtures)
from .helpers import eventually, kubectl
from .operator_fixtures import KEYLESS, apply, rtc_manifest

VALUES = yaml.safe_load((CHART / "argocd-values.yaml").read_text())
ARGOCD_IMAGE = f"quay.io/argoproj/argocd:{binaries.VERSIONS['argocd']}"
TARGET = f"{TENANT_NAMESPACE}.dev"


def component_pod(component: str, name: str | None = None) -> dict:
    """The Pod the argo-cd chart renders for `component` with argocd-values.yaml: its main container and
    default volumes (those that matter for names and mounts), plus what the values add, where the chart
    puts them (the ApplicationSet controller's lists are called extraVolumeMounts/extraVolumes)."""
    values = VALUES[component]
    if component == "server":
        account, main = "argocd-server", {"name": "server", "args": ["/usr/local/bin/argocd-server"],
                                          "volumeMounts": values["volumeMounts"]}
        volumes = [*values["volumes"], {"name": "static-files", "emptyDir": {}}]
    elif component == "applicationSet":
        account, main = "argocd-applicationset-controller", {
            "name": "applicationset-controller", "args": ["/usr/local/bin/argocd-applicationset-controller"],
            "volumeMounts": [*values["extraVolumeMounts"], {"name": "tmp", "mountPath": "/tmp"}]}
        volumes = [*values["extraVolumes"], {"name": "tmp", "emptyDir": {}}]
    else:
        account, main = "argocd-application-controller", {
            "name": "application-controller", "args": ["/usr/local/bin/argocd-application-controller"],
            "volumeMounts": values["volumeMounts"]}
        volumes = values["volumes"]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name or f"{account}-{uuid.uuid4().hex[:6]}", "namespace": ARGOCD_NAMESPACE},
            "spec": {"serviceAccountName": account, "containers": [{**main, "image": ARGOCD_IMAGE},
                                                                   *values["extraContainers"]],
                     "volumes": volumes}}


def test_every_component_runs_the_same_agent_and_only_reads_the_credentials():
    controller_agent, = VALUES["controller"]["extraContainers"]
    operator_args = build_parser().parse_args(container(render(), "keyless-operator")["args"])
    for component in ("controller", "server", "applicationSet"):
        pod = component_pod(component)
        main, agent = pod["spec"]["containers"]
        assert agent == controller_agent, component
        parsed = build_parser().parse_args(agent["args"])
        assert parsed.dir == operator_args.credential_dir
        reader = [m for m in main["volumeMounts"] if m["mountPath"] == parsed.dir]
        assert reader == [{"name": "keyless-credentials", "mountPath": parsed.dir, "readOnly": True}], component
        token = next(v for v in pod["spec"]["volumes"] if v["name"] == "keyless-broker-token")
        assert token["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "keyless-broker"


def test_operator_default_callers_are_the_components_the_values_equip():
    equipped = {component_pod(c)["spec"]["serviceAccountName"] for c in ("controller", "server", "applicationSet")}
    assert set(DEFAULT_CALLER_ACCOUNTS) <= equipped
    defaults = parse(rtc_manifest("dev", "team-ns", argocd={"namespace": "team-argocd"})).access.allowed_callers
    assert defaults == ("system:serviceaccount:team-argocd:argocd-application-controller",
                        "system:serviceaccount:team-argocd:argocd-server")


@pytest.mark.cluster
@pytest.mark.parametrize("component", ["server", "applicationSet"])
def test_component_pod_from_argocd_values_passes_server_side_dry_run(control_plane_with_crds, component):
    result = kubectl(control_plane_with_crds, "apply", "--server-side", "--dry-run=server", "-f", "-",
                     input=yaml.safe_dump(component_pod(component)))
    assert "serverside-applied (server dry run)" in result.stdout


@pytest.mark.cluster
def test_dry_run_refuses_a_component_pod_whose_volumes_clash(control_plane_with_crds):
    """The dry run can fail: a sidecar volume named like one of the chart's own (`tmp`) is refused."""
    pod = component_pod("applicationSet")
    pod["spec"]["volumes"].append({"name": "tmp", "emptyDir": {}})
    result = kubectl(control_plane_with_crds, "apply", "--server-side", "--dry-run=server", "-f", "-",
                     input=yaml.safe_dump(pod), check=False)
    assert result.returncode != 0 and "duplicate entries" in result.stderr, result.stderr


def _component_token(control_api, component: str) -> str:
    """A real Pod of the component's ServiceAccount and a TokenRequest as the values' projection asks."""
    pod_body = component_pod(component)
    core = k.CoreV1Api(control_api)
    try:
        core.create_namespaced_service_account(ARGOCD_NAMESPACE, k.V1ServiceAccount(
            metadata=k.V1ObjectMeta(name=pod_body["spec"]["serviceAccountName"])))
    except ApiException as e:
        if e.status != 409:
            raise
    pod = core.create_namespaced_pod(ARGOCD_NAMESPACE, pod_body)
    projection = next(v for v in pod_body["spec"]["volumes"]
                      if v["name"] == "keyless-broker-token")["projected"]["sources"][0]["serviceAccountToken"]
    return bound_caller_token(control_api, pod, audience=projection["audience"],
                              seconds=projection["expirationSeconds"])


def _run_agent(chart_identities, broker, token: str, name: str):
    agent, = VALUES["server"]["extraContainers"]
    parsed = build_parser().parse_args(agent["args"])
    files = PodFiles(chart_identities.directory / name)
    files.put(parsed.token_file, token.encode())
    files.put(parsed.broker_ca_file, broker.ca.read_bytes())
    credentials = chart_identities.directory / name / "credentials"
    credentials.mkdir(mode=0o700)
    files.files[parsed.dir] = credentials
    files.files[parsed.broker_url] = broker.process.url
    args = [KEYLESS, *files.args(agent["args"], drop=("--health-listen",)),
            f"--health-listen=127.0.0.1:{free_port()}", "--targets-poll-seconds=1"]
    log = chart_identities.directory / f"{name}.log"
    return start_process(args, log), credentials, log


@pytest.mark.cluster
def test_each_components_own_token_gets_credentials_as_far_as_allowed_callers_allow(
        broker_under_chart_rbac, registered_cluster, chart_identities, control_api):
    broker = broker_under_chart_rbac
    server_token = _component_token(control_api, "server")
    appset_token = _component_token(control_api, "applicationSet")
    jwks = broker.process.get("/openid/v1/jwks").json()
    # argocd-server is a default caller: a token for the cluster's audience, as its one identity.
    minted = broker.process.mint(TARGET, server_token)
    assert minted.status_code == 200, minted.text
    claims = verified_claims(minted.json()["token"], jwks, f"keyless:{TENANT_NAMESPACE}:dev", broker.issuer)
    assert claims["sub"] == "keyless:tenant-a:argocd"
    # The ApplicationSet controller is not, until the manifest lists it.
    refused = broker.process.mint(TARGET, appset_token)
    assert refused.status_code == 403 and refused.json()["error"] == "caller_not_allowed"
    server_agent, server_files, server_log = _run_agent(chart_identities, broker, server_token, "server-agent")
    appset_agent, appset_files, appset_log = _run_agent(chart_identities, broker, appset_token, "appset-agent")
    try:
        eventually(lambda: (server_files / f"{TARGET}.json").exists() or (server_agent.poll() and tail(server_log)),
                   timeout=60, message="argocd-server's agent keeps the cluster's credential")
        listed = broker.process.get("/v1/targets", appset_token).json()["targets"]
        assert listed == [] and not list(appset_files.iterdir())
        callers = ["system:serviceaccount:argocd:argocd-application-controller",
                   "system:serviceaccount:argocd:argocd-server",
                   "system:serviceaccount:argocd:argocd-applicationset-controller"]
        spec = registered_cluster["spec"]
        apply(chart_identities.cluster, rtc_manifest("dev", TENANT_NAMESPACE, caData=spec["caData"],
                                                     server=spec["server"],
                                                     access={**spec["access"], "allowedCallers": callers}))
        credential = appset_files / f"{TARGET}.json"
        eventually(lambda: credential.exists() or (appset_agent.poll() and tail(appset_log)), timeout=60,
                   message="the ApplicationSet controller's agent, once allowed")
        token = json.loads(credential.read_text())["status"]["token"]
        assert verified_claims(token, jwks, f"keyless:{TENANT_NAMESPACE}:dev", broker.issuer)["sub"] == \
            "keyless:tenant-a:argocd"
    finally:
        stop_process(server_agent)
        stop_process(appset_agent)
