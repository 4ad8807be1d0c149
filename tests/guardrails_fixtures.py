"""The guardrail webhooks served for real: `python -m keyless.webhooks` over TLS on loopback, with the
webhook configurations the chart installs (rendered by keyless.webhooks.configuration) pointing at it."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import ssl
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from keyless import pki
from keyless.envtest.cluster import LocalCluster, free_port, start_process, stop_process
from keyless.webhooks import configuration, policy

from .helpers import eventually, kubectl

ADMIN_GROUPS = ("system:masters", "platform-admins")


@dataclass
class Guardrails:
    cluster: LocalCluster
    port: int
    dir: Path
    log: Path

    def served_certificate(self) -> bytes:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as raw:
            with context.wrap_socket(raw) as tls:
                return tls.getpeercert(binary_form=True)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def apply_json(cluster: LocalCluster, *objects: dict) -> None:
    kubectl(cluster, "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)}))


def refusal_reason(result) -> str | None:
    """The guardrail reason from a kubectl error, or None when the request went through."""
    if result.returncode == 0:
        return None
    marker = "denied the request: "
    assert marker in result.stderr, result.stderr
    return result.stderr.split(marker, 1)[1].split(":", 1)[0]


def _quietly(check):
    try:
        return check()
    except (OSError, ssl.SSLError):
        return False


@contextlib.contextmanager
def serving_guardrails(cluster: LocalCluster, directory: Path, admin_groups=ADMIN_GROUPS):
    """Starts the webhook server and registers it; on exit unregisters and stops it.

    The API server trusts two CAs, so the serving certificate can later move to the second one
    (its key pair is kept in `second-ca.json`).
    """
    directory.mkdir(parents=True, exist_ok=True)
    first_ca, _ = pki.new_ca("guardrails-test-ca-1")
    second_ca, _ = pki.new_ca("guardrails-test-ca-2")
    serving = pki.issue_certificate(first_ca, "keyless-webhooks", server=True, ip_addresses=("127.0.0.1",))
    (directory / "tls.crt").write_bytes(serving.cert_pem)
    (directory / "tls.key").write_bytes(serving.key_pem)
    (directory / "second-ca.json").write_text(json.dumps({"cert": second_ca.cert_pem.decode(),
                                                          "key": second_ca.key_pem.decode()}))
    (directory / "second-ca.json").chmod(0o600)

    port = free_port()
    log = directory / "webhooks.log"
    process = start_process(
        [sys.executable, "-m", "keyless.webhooks", f"--kubeconfig={cluster.kubeconfig}",
         f"--listen=127.0.0.1:{port}", f"--tls-cert-file={directory / 'tls.crt'}",
         f"--tls-key-file={directory / 'tls.key'}", "--cert-check-interval=0.3",
         *(f"--admin-group={g}" for g in admin_groups), "--log-level=DEBUG"],
        log, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    ready_context = ssl.create_default_context(cadata=first_ca.cert_pem.decode())

    def ready() -> bool:
        if process.poll() is not None:  # not an AssertionError: eventually() must stop polling
            raise RuntimeError(f"webhook process exited:\n{log.read_text()[-3000:]}")
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/readyz", context=ready_context, timeout=2) as r:
            return r.status == 200

    exemptions = policy.Exemptions.build(admin_groups=list(admin_groups))
    client_config = functools.partial(configuration.url_client_config, f"https://127.0.0.1:{port}",
                                      first_ca.cert_pem + second_ca.cert_pem)
    try:
        eventually(lambda: _quietly(ready), timeout=90, message="webhook /readyz")
        apply_json(cluster,
                   configuration.render_validating_webhook_configuration(client_config, exemptions=exemptions),
                   configuration.render_mutating_webhook_configuration(client_config))
        yield Guardrails(cluster, port, directory, log)
    finally:
        kubectl(cluster, "delete", "validatingwebhookconfiguration,mutatingwebhookconfiguration",
                configuration.DEFAULT_NAME, "--ignore-not-found", check=False)
        stop_process(process)
