"""The whole chain as a fixture: broker and operator (with a Pod-bound token) on the control plane, and a
tenant API server that trusts the broker for one audience. Shared by every module that needs a verified chain."""
from __future__ import annotations

import contextlib
import uuid

from kubernetes import client as k

from keyless.envtest.cluster import LocalCluster
from keyless.render.tenant import render_authentication_configuration

from .broker_fixtures import bound_caller_token, caller_pod, ensure_namespace, start_broker
from .helpers import eventually
from .operator_fixtures import OperatorProcess, prepare_control_plane, remove_all_remote_tenant_clusters

GROUP, VERSION, PLURAL = "keyless.dev", "v1alpha1", "remotetenantclusters"
OPERATOR_SA = "system:serviceaccount:keyless-system:keyless-operator"


class Chain:
    def __init__(self, control, control_api, broker, operator, tenant, workdir, namespace):
        self.control, self.control_api, self.broker = control, control_api, broker
        self.operator, self.tenant, self.workdir = operator, tenant, workdir
        self.namespace = namespace

    def rtc(self, name: str) -> dict:
        return k.CustomObjectsApi(self.control_api).get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name)

    def condition(self, name: str, kind: str) -> dict | None:
        for c in (self.rtc(name).get("status") or {}).get("conditions", []):
            if c["type"] == kind:
                return c
        return None

    def wait(self, name: str, kind: str, status: str, reason: str | None = None, timeout: float = 60):
        def check():
            c = self.condition(name, kind)
            assert c and c["status"] == status and (reason is None or c["reason"] == reason), c
            return c
        return eventually(check, timeout=timeout, interval=0.5, message=f"{name} {kind}={status} {reason or ''}")


@contextlib.contextmanager
def running_chain(control_plane, control_api, workdir, namespace: str, audience: str, tenant_name: str,
                  *operator_args: str):
    """Broker + operator (with a Pod-bound token) on the control plane, and a tenant API server that
    trusts the broker for exactly `audience`, with the document the operator renders (same function)."""
    workdir.mkdir(exist_ok=True)
    prepare_control_plane(control_plane)
    ensure_namespace(control_api, namespace)
    ensure_namespace(control_api, "argocd")
    broker = start_broker(control_plane, "keyless-system", workdir / "broker", "--operator-identity", OPERATOR_SA)
    operator_pod = caller_pod(control_api, "keyless-system", "keyless-operator", f"keyless-operator-{uuid.uuid4().hex[:6]}")
    token_file = workdir / "operator-token"
    token_file.write_text(bound_caller_token(control_api, operator_pod, seconds=3600))
    document = render_authentication_configuration(broker.issuer, audience, broker.ca_file.read_bytes())
    tenant = LocalCluster(tenant_name, workdir / tenant_name, controller_manager=False, authentication_config=document)
    tenant.start()
    operator = OperatorProcess(control_plane, workdir / "operator", extra_args=[
        f"--broker-issuer={broker.issuer}", f"--broker-url={broker.url}", f"--broker-ca-file={broker.ca_file}",
        f"--broker-token-file={token_file}", "--verify-seconds=2", *operator_args]).start()
    chain = Chain(control_plane, control_api, broker, operator, tenant, workdir, namespace)
    try:
        yield chain
    finally:
        remove_all_remote_tenant_clusters(control_plane)
        # Whatever runs now: a test may have restarted the broker or the operator (a new process). One left
        # running would hold the broker's key-writer Lease for every later module on this control plane.
        for service in {id(s): s for s in (chain.operator, operator, chain.broker, broker)}.values():
            service.stop()
        tenant.stop()
