"""`keyless agent` against the real broker and the real control-plane API server.

What Argo CD relies on: `cat <dir>/<target>.json` always yields a credential that is still valid
(refreshed before it expires, also across a short broker outage), never an expired one, and the
file of a target that went away is gone.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import ssl
import stat
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import jwt
import pytest
from kubernetes import client as k

from keyless import pki
from keyless.envtest.cluster import free_port, start_process, stop_process, tail
from keyless.model.names import target_name

from .broker_fixtures import (CRD_DIR, KEYLESS, V1, V1BETA1, apply_broker_target, bound_caller_token, caller_pod,
                              ensure_namespace, exec_kubeconfig, kubectl_whoami, service_account_username,
                              start_broker, start_verifiers)
from .helpers import eventually, install_crds, kubectl

pytestmark = pytest.mark.cluster


# ---- the world: one broker (restartable on the same address), one verifier ------------------------------
@pytest.fixture(scope="module")
def agent_world(control_plane, control_api, run_dir):
    install_crds(control_plane, CRD_DIR / "brokertargets.keyless.dev.yaml")
    suffix = uuid.uuid4().hex[:6]
    broker_ns, callers_ns = f"kagent-{suffix}", f"kagentcallers-{suffix}"
    for ns in (broker_ns, callers_ns):
        ensure_namespace(control_api, ns)
    directory = run_dir / f"agent-{suffix}"
    broker_args = ("--key-prepublish-seconds", "0", "--rate-limit-per-second", "1000", "--rate-limit-burst", "1000",
                   "--review-rate-limit-per-second", "1000", "--review-rate-limit-burst", "1000")
    broker = start_broker(control_plane, broker_ns, directory / "broker", *broker_args)
    world = {"control_plane": control_plane, "api": control_api, "broker_ns": broker_ns, "callers_ns": callers_ns,
             "dir": directory, "broker": broker, "broker_args": broker_args, "suffix": suffix}
    # A real API server that trusts the broker for one audience: the stand-in for a tenant cluster.
    audience = f"keyless:tenants:verified-{suffix}"
    world["verifier"], = start_verifiers(directory / "verifiers", broker.issuer, broker.ca_file.read_bytes(),
                                         {"verified": audience})
    world["verified_audience"] = audience
    yield world
    world["broker"].stop()
    world["verifier"].stop()


def kill_broker(world) -> None:
    """SIGKILL, as a node failure or OOM kill would: no graceful shutdown, connections just drop."""
    process = world["broker"].process
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(30)
    world["broker"].stop()  # only forgets the (already dead) process


def restart_broker(world) -> None:
    """Starts the broker again on the same address with the same TLS files (keys live in its Secret)."""
    old = world["broker"]
    port = int(old.issuer.rsplit(":", 1)[1])
    tls = (old.ca_file, old.ca_file.parent / "tls.crt", old.ca_file.parent / "tls.key")
    world["broker"] = start_broker(world["control_plane"], world["broker_ns"], old.dir, *world["broker_args"],
                                   port=port, tls=tls)


@dataclass
class Caller:
    """One agent identity: a ServiceAccount with a Pod, its projected token in a file, and its targets."""

    username: str
    token_file: Path
    targets: list[str] = field(default_factory=list)


def new_caller(world, name: str) -> Caller:
    pod = caller_pod(world["api"], world["callers_ns"], name, f"{name}-0")
    token_file = world["dir"] / f"{name}.token"
    token_file.write_text(bound_caller_token(world["api"], pod, seconds=3600))
    token_file.chmod(0o600)
    return Caller(service_account_username(world["callers_ns"], name), token_file)


def add_target(world, caller: Caller, short: str, ttl: int = 30, audience: str | None = None) -> str:
    name = target_name("tenants", f"{short}-{world['suffix']}")
    apply_broker_target(world["api"], world["broker_ns"], name, audience=audience or f"keyless:tenants:{short}",
                        username=f"keyless:{short}:argocd", allowed_callers=[caller.username], ttl=ttl)
    caller.targets.append(name)
    return name


def delete_target(world, name: str) -> None:
    k.CustomObjectsApi(world["api"]).delete_namespaced_custom_object(
        "keyless.dev", "v1alpha1", world["broker_ns"], "brokertargets", name)


# ---- the agent as a process ---------------------------------------------------------------------------
class Agent:
    def __init__(self, world, caller: Caller, directory: Path, *extra: str):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.health = f"http://127.0.0.1:{free_port()}"
        self.log_path = directory.parent / f"{directory.name}-agent.log"
        broker = world["broker"]
        self.process = start_process([
            KEYLESS, "agent", "--broker-url", broker.url, "--broker-ca-file", broker.ca_file,
            "--token-file", caller.token_file, "--dir", self.dir,
            "--health-listen", self.health.removeprefix("http://"), "--targets-poll-seconds", "1", *extra,
        ], self.log_path, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def file(self, target: str) -> Path:
        return self.dir / f"{target}.json"

    def credential(self, target: str) -> dict:
        return json.loads(self.file(target).read_text())

    def files(self) -> set[str]:
        return {p.name for p in self.dir.iterdir()}

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.health + path, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metric(self, name: str) -> float:
        _, text = self.get("/metrics")
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def log(self) -> str:
        return tail(self.log_path, 60)

    def stop(self) -> None:
        stop_process(self.process)


@pytest.fixture
def start_agent(agent_world, tmp_path):
    started: list[Agent] = []

    def start(caller: Caller, *extra: str, directory: Path | None = None) -> Agent:
        agent = Agent(agent_world, caller, directory or tmp_path / f"creds-{len(started)}", *extra)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()


def wait_for_files(agent: Agent, targets: list[str], timeout: float = 60) -> None:
    eventually(lambda: all(agent.file(t).exists() for t in targets), timeout=timeout,
               message=f"credential files for {targets}; agent log:\n{agent.log()}")


# ---- sampling what Argo CD would read -------------------------------------------------------------------
def _fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:12]


class FileSampler(threading.Thread):
    """Reads a credential file as fast as Argo CD could and records every read:
    missing, unreadable, or the token (fingerprint) with its stated expiry versus the time of reading."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path = path
        self.stop_event = threading.Event()
        self.reads = 0
        self.missing = 0
        self.torn = 0
        self.expired: list[str] = []
        self.tokens: list[str] = []  # distinct fingerprints, in order of appearance

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                data = self.path.read_bytes()
            except FileNotFoundError:
                self.missing += 1
                time.sleep(0.01)
                continue
            read_at = datetime.now(timezone.utc)
            self.reads += 1
            try:
                credential = json.loads(data)
                status = credential["status"]
                expires = datetime.fromisoformat(status["expirationTimestamp"].replace("Z", "+00:00"))
            except (ValueError, KeyError):
                self.torn += 1
                continue
            if expires <= read_at:
                self.expired.append(f"read at {read_at.isoformat()} a credential stating expiry "
                                    f"{status['expirationTimestamp']}")
            fingerprint = _fingerprint(status["token"])
            if not self.tokens or self.tokens[-1] != fingerprint:
                self.tokens.append(fingerprint)
            time.sleep(0.01)

    def __enter__(self) -> "FileSampler":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        self.join()


def _jwt_claims(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


# ---- tests --------------------------------------------------------------------------------------------
def test_agent_keeps_one_0600_exec_credential_per_allowed_target_in_the_configured_api_version(
        agent_world, start_agent):
    caller = new_caller(agent_world, "controller-files")
    mine = [add_target(agent_world, caller, "files-a"), add_target(agent_world, caller, "files-b")]
    someone_else = new_caller(agent_world, "someone-else")
    not_mine = add_target(agent_world, someone_else, "files-other")
    agent = start_agent(caller, "--exec-api-version", V1BETA1)
    wait_for_files(agent, mine)
    eventually(lambda: agent.get("/readyz")[0] == 200, timeout=30, message="agent ready")

    assert agent.files() == {f"{t}.json" for t in mine}  # nothing for a target it may not use
    assert f"{not_mine}.json" not in agent.files()
    for target in mine:
        assert stat.S_IMODE(agent.file(target).stat().st_mode) == 0o600
        credential = agent.credential(target)
        assert credential["apiVersion"] == V1BETA1 and credential["kind"] == "ExecCredential"
        claims = _jwt_claims(credential["status"]["token"])
        assert claims["aud"] in (f"keyless:tenants:{target.split('.', 1)[1].rsplit('-', 1)[0]}",
                                 [f"keyless:tenants:{target.split('.', 1)[1].rsplit('-', 1)[0]}"])
        stated = datetime.fromisoformat(credential["status"]["expirationTimestamp"].replace("Z", "+00:00"))
        assert stated.timestamp() < claims["exp"]  # a safety margin before the real expiry
    assert agent.get("/healthz")[0] == 200
    assert agent.metric("keyless_agent_refreshes_total") >= 2
    assert agent.metric("keyless_agent_broker_up") == 1
    assert agent.metric("keyless_agent_targets") == 2
    assert agent.metric("keyless_agent_credential_min_remaining_seconds") > 0


def test_agent_refreshes_each_credential_before_it_expires(agent_world, start_agent):
    caller = new_caller(agent_world, "controller-refresh")
    target = add_target(agent_world, caller, "refresh", ttl=30)
    agent = start_agent(caller)
    wait_for_files(agent, [target])
    with FileSampler(agent.file(target)) as sampler:
        # Three tokens in a row means two refreshes, each replacing a credential that was still valid.
        eventually(lambda: len(sampler.tokens) >= 3, timeout=90, interval=0.5,
                   message=f"two refreshes; agent log:\n{agent.log()}")
    assert sampler.expired == []
    assert sampler.missing == 0 and sampler.torn == 0
    assert sampler.reads > 100


def test_kubectl_with_cat_of_the_agent_file_is_authenticated_by_a_server_that_trusts_the_broker(
        agent_world, start_agent, tmp_path):
    caller = new_caller(agent_world, "controller-kubectl")
    target = add_target(agent_world, caller, "verified", audience=agent_world["verified_audience"])
    agent = start_agent(caller)
    wait_for_files(agent, [target])
    # Exactly the exec config the operator writes into the Argo CD cluster Secret (agent mode).
    kubeconfig = exec_kubeconfig(tmp_path / "kubeconfig", agent_world["verifier"], "cat", [str(agent.file(target))],
                                 V1)
    result = eventually(lambda: (r := kubectl_whoami(kubeconfig)).returncode == 0 and r, timeout=60, interval=1,
                        message="kubectl authenticated with the agent's credential file")
    assert result.stdout == "keyless:verified:argocd"


def test_broker_outage_shorter_than_the_token_lifetime_is_invisible_to_readers(agent_world, start_agent):
    caller = new_caller(agent_world, "controller-outage")
    target = add_target(agent_world, caller, "outage", ttl=60)
    agent = start_agent(caller)
    wait_for_files(agent, [target])
    with FileSampler(agent.file(target)) as sampler:
        eventually(lambda: len(sampler.tokens) >= 1, timeout=30, message="first read")
        failures_before = agent.metric("keyless_agent_refresh_failures_total")
        kill_broker(agent_world)
        # Keep it down until the agent has really tried to refresh and failed at least once ...
        eventually(lambda: agent.metric("keyless_agent_refresh_failures_total") > failures_before,
                   timeout=90, interval=0.5, message=f"a failed refresh during the outage; log:\n{agent.log()}")
        assert agent.metric("keyless_agent_broker_up") == 0
        status, body = agent.get("/readyz")
        assert status == 200 and "broker unavailable" in body  # still serving, and saying why it may not last
        tokens_during_outage = len(sampler.tokens)
        # ... then bring it back while the credential is still valid.
        restart_broker(agent_world)
        eventually(lambda: len(sampler.tokens) > tokens_during_outage, timeout=60, interval=0.2,
                   message=f"a refresh after the broker came back; log:\n{agent.log()}")
    assert sampler.expired == []
    assert sampler.missing == 0 and sampler.torn == 0  # Argo CD never noticed
    assert agent.file(target).exists()
    assert agent.metric("keyless_agent_broker_up") == 1


def test_broker_down_past_the_credential_lifetime_removes_the_file_instead_of_serving_it_expired(
        agent_world, start_agent):
    caller = new_caller(agent_world, "controller-longoutage")
    target = add_target(agent_world, caller, "longoutage", ttl=30)
    agent = start_agent(caller)
    wait_for_files(agent, [target])
    eventually(lambda: agent.get("/readyz")[0] == 200, timeout=30, message="agent ready")
    try:
        with FileSampler(agent.file(target)) as sampler:
            kill_broker(agent_world)
            eventually(lambda: not agent.file(target).exists(), timeout=90, interval=0.2,
                       message=f"file removed at expiry; agent log:\n{agent.log()}")
            status, body = agent.get("/readyz")
            assert status == 503 and target in body
            assert agent.metric("keyless_agent_credential_min_remaining_seconds") == 0
            assert agent.metric('keyless_agent_credential_files_removed_total{reason="expired"}') >= 1
            assert agent.get("/healthz")[0] == 200  # alive: nothing a restart would fix
        assert sampler.expired == []
        assert sampler.reads > 0
    finally:
        restart_broker(agent_world)
    wait_for_files(agent, [target])  # back as soon as the broker is
    eventually(lambda: agent.get("/readyz")[0] == 200, timeout=30, message="agent ready again")


def test_removed_target_has_its_file_removed_and_the_others_stay(agent_world, start_agent):
    caller = new_caller(agent_world, "controller-removal")
    keep = add_target(agent_world, caller, "keep")
    drop = add_target(agent_world, caller, "drop")
    agent = start_agent(caller)
    wait_for_files(agent, [keep, drop])
    delete_target(agent_world, drop)
    eventually(lambda: not agent.file(drop).exists(), timeout=60,
               message=f"file of the deleted target removed; agent log:\n{agent.log()}")
    assert agent.files() == {f"{keep}.json"}
    assert agent.metric('keyless_agent_credential_files_removed_total{reason="target_removed"}') == 1


def test_target_no_longer_allowed_for_the_caller_has_its_file_removed(agent_world, start_agent):
    caller = new_caller(agent_world, "controller-revoked")
    target = add_target(agent_world, caller, "revoked")
    agent = start_agent(caller)
    wait_for_files(agent, [target])
    apply_broker_target(agent_world["api"], agent_world["broker_ns"], target, audience="keyless:tenants:revoked",
                        username="keyless:revoked:argocd", allowed_callers=["system:serviceaccount:x:other"], ttl=30)
    eventually(lambda: not agent.file(target).exists(), timeout=60,
               message=f"file of the revoked target removed; agent log:\n{agent.log()}")


def test_restarted_agent_keeps_serving_valid_files_while_the_broker_is_down_and_drops_stale_ones(
        agent_world, start_agent, tmp_path):
    caller = new_caller(agent_world, "controller-restart")
    target = add_target(agent_world, caller, "restart", ttl=60)
    directory = tmp_path / "shared-emptydir"
    first = start_agent(caller, directory=directory)
    wait_for_files(first, [target])
    first.stop()
    assert first.process.returncode == 0  # SIGTERM is a clean shutdown ...
    assert first.file(target).exists()     # ... that leaves the still-valid credential for the next start
    # A stale file from a target this agent never had, already expired: must not be served.
    stale = dict(first.credential(target))
    stale["status"] = {**stale["status"], "expirationTimestamp": "2020-01-01T00:00:00Z"}
    (directory / "tenants.gone.json").write_text(json.dumps(stale))
    agent_world["broker"].stop()
    try:
        second = start_agent(caller, directory=directory)
        with FileSampler(second.file(target)) as sampler:
            eventually(lambda: not (directory / "tenants.gone.json").exists(), timeout=30,
                       message=f"expired leftover removed; log:\n{second.log()}")
            eventually(lambda: second.metric("keyless_agent_target_list_failures_total") >= 1, timeout=30,
                       message="agent tried the broker")
        assert sampler.missing == 0 and sampler.expired == [] and sampler.reads > 0
    finally:
        restart_broker(agent_world)
    eventually(lambda: second.get("/readyz")[0] == 200, timeout=60, message="ready after the broker is back")


def test_agent_rereads_its_token_file_when_the_kubelet_rotates_it(agent_world, start_agent):
    caller = new_caller(agent_world, "controller-rotation")
    target = add_target(agent_world, caller, "rotation", ttl=30)
    good_token = caller.token_file.read_text()
    agent = start_agent(caller)
    wait_for_files(agent, [target])
    # A token the broker rejects (wrong audience) makes refreshes fail as unauthorized ...
    pod = k.CoreV1Api(agent_world["api"]).read_namespaced_pod("controller-rotation-0", agent_world["callers_ns"])
    caller.token_file.write_text(bound_caller_token(agent_world["api"], pod, audience="not-the-broker"))
    eventually(lambda: agent.metric('keyless_agent_refresh_failures_total{reason="unauthorized"}') >= 1
               or agent.metric('keyless_agent_target_list_failures_total{reason="unauthorized"}') >= 1,
               timeout=60, interval=0.5, message=f"refusal with the bad token; log:\n{agent.log()}")
    # ... and a freshly rotated valid token is picked up without a restart.
    refreshes = agent.metric("keyless_agent_refreshes_total")
    caller.token_file.write_text(bound_caller_token(agent_world["api"], pod))
    eventually(lambda: agent.metric("keyless_agent_refreshes_total") > refreshes, timeout=60, interval=0.5,
               message=f"refresh with the rotated token; log:\n{agent.log()}")
    assert good_token not in agent.log_path.read_text()


def test_agent_log_and_metrics_never_contain_a_token(agent_world, start_agent):
    caller = new_caller(agent_world, "controller-secrets")
    target = add_target(agent_world, caller, "secrets")
    agent = start_agent(caller)
    wait_for_files(agent, [target])
    minted = agent.credential(target)["status"]["token"]
    _, metrics = agent.get("/metrics")
    _, ready = agent.get("/readyz")
    for text in (agent.log_path.read_text(), metrics, ready):
        assert minted not in text
        assert caller.token_file.read_text().strip() not in text
        assert "eyJ" not in text


BLIND_BROKER_RBAC = """
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: keyless-test-blind-broker}
rules:
- {apiGroups: [authentication.k8s.io], resources: [tokenreviews], verbs: [create]}
- {apiGroups: [""], resources: [pods], verbs: [get]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: keyless-test-blind-broker}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: keyless-test-blind-broker}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: keyless-test-blind-broker}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: keyless-test-blind-broker, namespace: NAMESPACE}
rules:
- {apiGroups: [""], resources: [secrets], verbs: ["*"]}
- {apiGroups: [coordination.k8s.io], resources: [leases], verbs: ["*"]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: keyless-test-blind-broker, namespace: NAMESPACE}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: keyless-test-blind-broker}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: keyless-test-blind-broker}]
"""


def start_blind_broker(world, directory: Path):
    """The broker on its usual address, but unable to read its BrokerTargets: it authenticates callers
    and holds keys, yet its target registry never loads, like a replica that has just started."""
    cluster = world["control_plane"]
    kubectl(cluster, "apply", "-f", "-", input=BLIND_BROKER_RBAC.replace("NAMESPACE", world["broker_ns"]))
    ca = pki.KeyPair((cluster.dir / "pki" / "ca.crt").read_bytes(), (cluster.dir / "pki" / "ca.key").read_bytes())
    user = pki.issue_certificate(ca, "keyless-test-blind-broker", client=True)
    kubeconfig = directory / "blind-kubeconfig"
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "blind",
        "clusters": [{"name": "c", "cluster": {"server": cluster.server, "certificate-authority-data": b64(ca.cert_pem)}}],
        "users": [{"name": "u", "user": {"client-certificate-data": b64(user.cert_pem),
                                         "client-key-data": b64(user.key_pem)}}],
        "contexts": [{"name": "blind", "context": {"cluster": "c", "user": "u"}}],
    }))
    args = list(world["broker"].args)
    args[args.index("--kubeconfig") + 1] = str(kubeconfig)
    process = start_process(args, directory / "blind-broker.log", env={**os.environ, "PYTHONUNBUFFERED": "1"})
    health = urllib.request.Request(world["broker"].url + "/healthz")
    context = ssl.create_default_context(cafile=str(world["broker"].ca_file))

    def answering():
        with urllib.request.urlopen(health, context=context, timeout=2) as r:
            return r.status == 200
    try:
        eventually(lambda: _quietly(answering), timeout=30, message="blind broker answering")
    except AssertionError:
        stop_process(process)
        raise
    return process


def _quietly(check):
    try:
        return check()
    except OSError:
        return False


def test_a_restarted_broker_that_has_not_loaded_its_targets_never_makes_the_agent_drop_valid_files(
        agent_world, start_agent, tmp_path):
    caller = new_caller(agent_world, "controller-blind")
    target = add_target(agent_world, caller, "blind", ttl=60)
    agent = start_agent(caller)
    wait_for_files(agent, [target])
    with FileSampler(agent.file(target)) as sampler:
        kill_broker(agent_world)
        blind = start_blind_broker(agent_world, tmp_path)
        try:
            # The blind broker lists no targets for this caller; the agent must not take that as removal.
            failures = agent.metric("keyless_agent_target_list_failures_total")
            eventually(lambda: not agent.file(target).exists()
                       or agent.metric("keyless_agent_target_list_failures_total") >= failures + 3,
                       timeout=30, interval=0.2, message=f"agent asked the blind broker; log:\n{agent.log()}")
            assert agent.file(target).exists(), f"valid credential dropped; log:\n{agent.log()}"
        finally:
            stop_process(blind)
            restart_broker(agent_world)
        tokens = len(sampler.tokens)
        eventually(lambda: len(sampler.tokens) > tokens or agent.metric("keyless_agent_refreshes_total") >= 2,
                   timeout=60, message="agent working again")
    assert sampler.missing == 0 and sampler.expired == []
    assert agent.metric('keyless_agent_credential_files_removed_total{reason="target_removed"}') == 0
