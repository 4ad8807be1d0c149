"""`keyless operator --webhook-listen` serves the tenant guardrails in the same process as the reconciler."""
from __future__ import annotations

import functools
import json
import ssl
import urllib.request

import pytest

from keyless import pki
from keyless.envtest.cluster import free_port
from keyless.webhooks import configuration, policy

from .helpers import eventually, kubectl
from .operator_fixtures import (OperatorProcess, apply, prepare_control_plane, remove_all_remote_tenant_clusters,
                                rtc_manifest, tenant_namespace)

pytestmark = pytest.mark.cluster


def test_operator_process_refuses_cross_tenant_application_and_registers_clusters(control_plane, run_dir, namespace):
    prepare_control_plane(control_plane)
    directory = run_dir / "operator-webhooks"
    directory.mkdir(exist_ok=True)
    ca, _ = pki.new_ca("operator-webhook-ca")
    serving = pki.issue_certificate(ca, "keyless-webhooks", server=True, ip_addresses=("127.0.0.1",))
    (directory / "tls.crt").write_bytes(serving.cert_pem)
    (directory / "tls.key").write_bytes(serving.key_pem)
    port = free_port()
    operator = OperatorProcess(control_plane, directory, extra_args=[
        f"--webhook-listen=127.0.0.1:{port}", f"--webhook-tls-cert-file={directory / 'tls.crt'}",
        f"--webhook-tls-key-file={directory / 'tls.key'}", "--webhook-admin-group=system:masters"]).start()
    client_config = functools.partial(configuration.url_client_config, f"https://127.0.0.1:{port}", ca.cert_pem)
    exemptions = policy.Exemptions.build(admin_groups=["system:masters"])
    try:
        context = ssl.create_default_context(cadata=ca.cert_pem.decode())

        def ready():
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{port}/readyz", context=context, timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        eventually(ready, timeout=60, message="operator's webhook server ready")
        other_namespace = tenant_namespace(control_plane, f"{namespace}-b", "wired-b")
        apply(control_plane,
              rtc_manifest("own", namespace, tenant="wired-a", server="https://wired-a.example.com"),
              rtc_manifest("other", other_namespace, tenant="wired-b", server="https://wired-b.example.com"))
        kubectl(control_plane, "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [
            configuration.render_validating_webhook_configuration(client_config, exemptions=exemptions),
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
             "metadata": {"name": "wired-tenant-edit"},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
             "subjects": [{"kind": "User", "name": "wanda", "apiGroup": "rbac.authorization.k8s.io"}]},
        ]}))

        def application(name: str, server: str) -> str:
            # In wired-a's namespace: a tenant's Applications live in its namespaces.
            return json.dumps({"apiVersion": "argoproj.io/v1alpha1", "kind": "Application",
                               "metadata": {"name": name, "namespace": namespace},
                               "spec": {"project": "wired-a", "destination": {"server": server, "namespace": "x"},
                                        "source": {"repoURL": "https://git.example.com/a.git", "path": "."}}})

        def refused():
            result = kubectl(control_plane, "--as=wanda", "apply", "-f", "-", check=False,
                             input=application("cross", "https://wired-b.example.com"))
            assert result.returncode != 0 and "denied the request" in result.stderr, result.stderr
            return result

        eventually(refused, timeout=30, message="cross-tenant Application refused")
        kubectl(control_plane, "--as=wanda", "apply", "-f", "-", input=application("own", "https://wired-a.example.com"))
        kubectl(control_plane, "get", "secret", "-n", "argocd", f"keyless-{namespace}-own")
    finally:
        kubectl(control_plane, "delete", "validatingwebhookconfiguration", configuration.DEFAULT_NAME,
                "--ignore-not-found", check=False)
        kubectl(control_plane, "delete", "application", "own", "-n", namespace, "--ignore-not-found", check=False)
        remove_all_remote_tenant_clusters(control_plane)
        kubectl(control_plane, "delete", "namespace", f"{namespace}-b", "--wait=false", check=False)
        operator.stop()
