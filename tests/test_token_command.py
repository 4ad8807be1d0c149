"""`keyless token`, the on-demand exec plugin: real kubectl, the real broker, a real API server that trusts it."""
from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import jwt
import pytest

from keyless.model.names import target_name

from .broker_fixtures import (CRD_DIR, KEYLESS, V1, V1BETA1, apply_broker_target, bound_caller_token, broker_tls,
                              caller_pod, ensure_namespace, exec_kubeconfig, kubectl_whoami, service_account_username,
                              start_broker, start_verifiers)
from .helpers import eventually, install_crds

pytestmark = pytest.mark.cluster

@pytest.fixture(scope="module")
def token_world(control_plane, control_api, run_dir):
    """A broker with two targets for one caller Pod, a third target the caller may not use, and a real
    API server that trusts the broker for target one's audience."""
    install_crds(control_plane, CRD_DIR / "brokertargets.keyless.dev.yaml")
    suffix = uuid.uuid4().hex[:6]
    broker_ns, callers_ns = f"ktok-{suffix}", f"ktokcallers-{suffix}"
    for ns in (broker_ns, callers_ns):
        ensure_namespace(control_api, ns)
    caller = service_account_username(callers_ns, "argocd-application-controller")
    names = {}
    for key, callers in (("one", [caller]), ("forbidden", ["system:serviceaccount:elsewhere:someone"])):
        names[key] = target_name("tenants", f"{key}-{suffix}")
        apply_broker_target(control_api, broker_ns, names[key], audience=f"keyless:tenants:{key}-{suffix}",
                            username=f"keyless:{key}:argocd", allowed_callers=callers, ttl=60)
    directory = run_dir / f"token-{suffix}"
    broker = start_broker(control_plane, broker_ns, directory, "--key-prepublish-seconds", "0")
    verifier, = start_verifiers(directory / "verifiers", broker.issuer, broker.ca_file.read_bytes(),
                                {"one": f"keyless:tenants:one-{suffix}"})
    pod = caller_pod(control_api, callers_ns, "argocd-application-controller", "controller-0")
    token_file = directory / "caller-token"
    token_file.write_text(bound_caller_token(control_api, pod, seconds=3600))
    token_file.chmod(0o600)
    yield {"broker": broker, "verifier": verifier, "names": names, "token_file": token_file, "dir": directory}
    broker.stop()
    verifier.stop()


def keyless_token(world, target: str, *, env: dict | None = None, token_file: Path | None = None,
                  ca_file: Path | None = None) -> subprocess.CompletedProcess:
    args = [str(KEYLESS), "token", "--broker-url", world["broker"].url, "--target", target,
            "--broker-ca-file", str(ca_file or world["broker"].ca_file),
            "--token-file", str(token_file or world["token_file"])]
    return subprocess.run(args, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def _assert_no_secret_in(text: str, world) -> None:
    assert world["token_file"].read_text().strip() not in text
    assert "eyJ" not in text  # no JWT of any kind (header, caller token or minted token)


@pytest.mark.parametrize("api_version", [V1, V1BETA1])
def test_kubectl_with_keyless_token_as_exec_plugin_is_authenticated_as_the_targets_one_user(
        token_world, tmp_path, api_version):
    world = token_world
    kubeconfig = exec_kubeconfig(tmp_path / "kubeconfig", world["verifier"], str(KEYLESS), [
        "token", "--broker-url", world["broker"].url, "--target", world["names"]["one"],
        "--broker-ca-file", str(world["broker"].ca_file), "--token-file", str(world["token_file"])], api_version)
    # The verifying API server fetches the broker's discovery in the background after start: retry.
    result = eventually(lambda: (r := kubectl_whoami(kubeconfig)).returncode == 0 and r,
                        timeout=60, interval=1, message="kubectl authenticated through keyless token")
    assert result.stdout == "keyless:one:argocd"


@pytest.mark.parametrize("api_version", [V1, V1BETA1])
def test_reply_echoes_the_exec_info_api_version_and_states_expiry_before_the_tokens_real_expiry(
        token_world, api_version):
    exec_info = json.dumps({"apiVersion": api_version, "kind": "ExecCredential", "spec": {"interactive": False}})
    result = keyless_token(token_world, token_world["names"]["one"], env={"KUBERNETES_EXEC_INFO": exec_info})
    assert result.returncode == 0, result.stderr
    credential = json.loads(result.stdout)
    assert credential["apiVersion"] == api_version and credential["kind"] == "ExecCredential"
    stated = datetime.fromisoformat(credential["status"]["expirationTimestamp"].replace("Z", "+00:00"))
    real = datetime.fromtimestamp(jwt.decode(credential["status"]["token"],
                                             options={"verify_signature": False})["exp"], timezone.utc)
    assert datetime.now(timezone.utc) < stated < real  # client-go stops using it before it really expires
    assert result.stderr == ""


def test_unknown_target_fails_on_stderr_with_nonzero_exit_and_prints_no_token(token_world):
    result = keyless_token(token_world, "tenants.does-not-exist")
    assert result.returncode != 0
    assert result.stdout == ""
    assert "404" in result.stderr and "unknown_target" in result.stderr
    _assert_no_secret_in(result.stderr, token_world)


def test_target_the_caller_may_not_use_is_refused_without_printing_a_token(token_world):
    result = keyless_token(token_world, token_world["names"]["forbidden"])
    assert result.returncode != 0 and result.stdout == ""
    assert "403" in result.stderr
    _assert_no_secret_in(result.stderr, token_world)


def test_caller_token_with_the_wrong_audience_is_refused_and_not_echoed(token_world, control_api, tmp_path):
    wrong = tmp_path / "wrong-audience-token"
    pod_token = token_world["token_file"].read_text()
    claims = jwt.decode(pod_token, options={"verify_signature": False})
    from kubernetes import client as k
    pod = k.CoreV1Api(control_api).read_namespaced_pod(
        claims["kubernetes.io"]["pod"]["name"], claims["kubernetes.io"]["namespace"])
    wrong.write_text(bound_caller_token(control_api, pod, audience="not-the-broker"))
    result = keyless_token(token_world, token_world["names"]["one"], token_file=wrong)
    assert result.returncode != 0 and result.stdout == ""
    assert "401" in result.stderr
    assert wrong.read_text() not in result.stderr and "eyJ" not in result.stderr


def test_missing_token_file_says_which_file_and_how_to_fix_it(token_world, tmp_path):
    result = keyless_token(token_world, token_world["names"]["one"], token_file=tmp_path / "absent")
    assert result.returncode != 0 and result.stdout == ""
    assert str(tmp_path / "absent") in result.stderr and "--token-file" in result.stderr


def test_broker_with_an_untrusted_certificate_is_refused(token_world, tmp_path):
    other_ca, _, _ = broker_tls(tmp_path / "other")
    result = keyless_token(token_world, token_world["names"]["one"], ca_file=other_ca)
    assert result.returncode != 0 and result.stdout == ""
    assert "TLS" in result.stderr
    _assert_no_secret_in(result.stderr, token_world)


def test_unsupported_exec_api_version_is_refused_before_asking_the_broker(token_world):
    exec_info = json.dumps({"apiVersion": "client.authentication.k8s.io/v1alpha1", "kind": "ExecCredential"})
    # By time, not by count: the audit line of an earlier test's request can reach the log late.
    started = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:23] + "Z"
    result = keyless_token(token_world, token_world["names"]["one"], env={"KUBERNETES_EXEC_INFO": exec_info})
    assert result.returncode != 0 and result.stdout == ""
    assert "v1alpha1" in result.stderr
    time.sleep(0.5)  # what the broker would have logged for this request has reached the log
    assert [line for line in token_world["broker"].audit_lines() if line["ts"] >= started] == []


def test_unreachable_broker_fails_cleanly(token_world, tmp_path):
    args = [str(KEYLESS), "token", "--broker-url", "https://127.0.0.1:1", "--target", token_world["names"]["one"],
            "--token-file", str(token_world["token_file"])]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and result.stdout == ""
    assert "cannot reach the broker" in result.stderr


# ---- pure pieces of the hand-rolled HTTP client (no broker needed) ----------------------------------------
def test_chunked_replies_are_reassembled():
    from keyless.brokerclient.blocking import dechunk
    assert dechunk(b"4\r\n{\"a\"\r\n5;ext=1\r\n:1}xx\r\n0\r\n\r\n") == b'{"a":1}xx'
    assert dechunk(b"0\r\n\r\n") == b""


def test_error_text_from_the_broker_is_cut_of_anything_token_shaped():
    from keyless.brokerclient.reply import redact
    jwt_like = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLXZhbHVl"
    assert redact(f"bad token {jwt_like} for target a.b") == "bad token [redacted] for target a.b"
    assert redact("x" * 80) == "[redacted]"
    assert redact("caller_not_allowed: system:serviceaccount:a:b may not") == \
        "caller_not_allowed: system:serviceaccount:a:b may not"
