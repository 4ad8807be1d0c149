"""The token broker against the real API server, with real API servers as token verifiers."""
from __future__ import annotations

import base64
import json
import time
import uuid

import jwt
import pytest
import requests
from kubernetes import client as k

from keyless.model.names import target_name

from .broker_fixtures import (CRD_DIR, apply_broker_target, bound_caller_token, caller_pod, ensure_namespace,
                              service_account_username, start_broker, start_verifiers, wait_for_verifier)
from .helpers import eventually, install_crds, kubectl

pytestmark = pytest.mark.cluster

CONTROLLER = "argocd-application-controller"


@pytest.fixture(scope="module")
def world(control_plane, control_api, run_dir):
    """A broker namespace with two targets (A, B), a caller Pod, the broker, and one verifier per target."""
    install_crds(control_plane, CRD_DIR / "brokertargets.keyless.dev.yaml")
    suffix = uuid.uuid4().hex[:6]
    broker_ns, callers_ns = f"kbroker-{suffix}", f"kcallers-{suffix}"
    for ns in (broker_ns, callers_ns):
        ensure_namespace(control_api, ns)
    controller = service_account_username(callers_ns, CONTROLLER)
    targets = {}
    for letter in ("a", "b"):
        name = target_name("tenants", f"cluster-{letter}-{suffix}")
        audience = f"keyless:tenants:cluster-{letter}-{suffix}"
        apply_broker_target(control_api, broker_ns, name, audience=audience,
                            username=f"keyless:tenant-{letter}:argocd", allowed_callers=[controller], ttl=30)
        targets[letter] = {"name": name, "audience": audience, "username": f"keyless:tenant-{letter}:argocd"}
    broker = start_broker(control_plane, broker_ns, run_dir / f"broker-{suffix}",
                          "--key-prepublish-seconds", "5", "--max-token-ttl-seconds", "300",
                          "--rate-limit-per-second", "1000", "--rate-limit-burst", "1000",
                          "--review-rate-limit-per-second", "1000", "--review-rate-limit-burst", "1000")
    verifiers = start_verifiers(run_dir / f"verifiers-{suffix}", broker.issuer, broker.ca_file.read_bytes(),
                                {"a": targets["a"]["audience"], "b": targets["b"]["audience"]})
    pod = caller_pod(control_api, callers_ns, CONTROLLER, "controller-0")
    yield {"broker": broker, "broker_ns": broker_ns, "callers_ns": callers_ns, "controller": controller,
           "targets": targets, "verifiers": dict(zip("ab", verifiers)), "pod": pod,
           "token": bound_caller_token(control_api, pod), "suffix": suffix}
    broker.stop()
    for v in verifiers:
        v.stop()


def _claims(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


def _header(token: str) -> dict:
    return jwt.get_unverified_header(token)


def _audit_for(broker, predicate) -> dict:
    return eventually(lambda: next((a for a in reversed(broker.audit_lines()) if predicate(a)), None),
                      timeout=10, message="audit line")


# ---- discovery -----------------------------------------------------------------------------------------
def test_discovery_names_the_configured_issuer_even_when_the_host_header_lies(world):
    broker = world["broker"]
    doc = broker.get("/.well-known/openid-configuration", headers={"Host": "evil.example.com"}).json()
    assert doc["issuer"] == broker.issuer
    assert doc["jwks_uri"] == broker.issuer + "/openid/v1/jwks"
    assert doc["id_token_signing_alg_values_supported"] == ["ES256"]
    response = broker.get("/openid/v1/jwks")
    jwks = response.json()
    assert len(jwks["keys"]) >= 2, "the next key must be published before it signs"
    # go-oidc verifiers do not refetch on an unknown kid while max-age lasts: it must stay inside the
    # pre-publication time (5 s here), so a cached JWKS always holds the next key before it signs.
    assert int(response.headers["Cache-Control"].split("max-age=")[1]) < 5
    assert all(key["kty"] == "EC" and key["alg"] == "ES256" and "d" not in key for key in jwks["keys"])


# ---- happy path ------------------------------------------------------------------------------------------
def test_pod_bound_caller_gets_a_token_the_targets_verifier_maps_to_the_one_username(world):
    broker, target = world["broker"], world["targets"]["a"]
    response = broker.mint(target["name"], world["token"])
    assert response.status_code == 200, response.text
    body = response.json()
    token = body["token"]
    claims = _claims(token)
    assert claims["iss"] == broker.issuer
    assert claims["sub"] == target["username"]
    assert claims["aud"] == target["audience"]
    assert claims["exp"] - claims["iat"] == 30 and claims["nbf"] == claims["iat"]
    assert claims["jti"] and "groups" not in claims
    assert body["expiresIn"] <= 30 and body["target"] == target["name"]
    assert body["expirationTimestamp"].endswith("Z")
    jwks = broker.get("/openid/v1/jwks").json()
    assert _header(token)["alg"] == "ES256" and _header(token)["kid"] in {key["kid"] for key in jwks["keys"]}

    status, username = wait_for_verifier(world["verifiers"]["a"], token)
    assert (status, username) == (201, target["username"])

    audit = _audit_for(broker, lambda a: a["jti"] == claims["jti"])
    assert audit["outcome"] == "granted" and audit["caller"] == world["controller"]
    assert audit["pod"] == f"{world['callers_ns']}/controller-0" and audit["target"] == target["name"]
    assert audit["exp"] and "token" not in audit


def test_seed_compatible_endpoint_returns_the_raw_token(world):
    broker, target = world["broker"], world["targets"]["b"]
    response = broker.get(f"/api/get-target-token?targetName={target['name']}", token=world["token"])
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/plain")
    assert _claims(response.text)["aud"] == target["audience"]
    assert wait_for_verifier(world["verifiers"]["b"], response.text) == (201, target["username"])


def test_token_for_target_a_is_refused_by_target_b_verifier(world):
    a, b = world["verifiers"]["a"], world["verifiers"]["b"]
    token_a = world["broker"].mint(world["targets"]["a"]["name"], world["token"]).json()["token"]
    token_b = world["broker"].mint(world["targets"]["b"]["name"], world["token"]).json()["token"]
    assert wait_for_verifier(b, token_b)[0] == 201  # B works, so a refusal below is about the audience
    assert b.whoami(token_a) == (401, None)
    assert a.whoami(token_b) == (401, None)


def test_caller_sees_only_targets_it_may_use(world, control_api):
    listed = world["broker"].get("/v1/targets", token=world["token"]).json()["targets"]
    assert {t["name"] for t in listed} >= {world["targets"]["a"]["name"], world["targets"]["b"]["name"]}
    other = caller_pod(control_api, world["callers_ns"], "bystander")
    assert world["broker"].get("/v1/targets", token=bound_caller_token(control_api, other)).json() == {"targets": []}


# ---- refusals -------------------------------------------------------------------------------------------
def _expired_service_account_token(control_plane, namespace: str, pod: k.V1Pod) -> str:
    """A correctly signed control-plane ServiceAccount token whose exp has passed (TokenRequest's minimum
    lifetime is 10 minutes, so sign one with the API server's own ServiceAccount key)."""
    key = (control_plane.dir / "pki" / "sa.key").read_bytes()
    now = int(time.time())
    claims = {"iss": control_plane.service_account_issuer, "aud": ["keyless-broker"],
              "sub": service_account_username(namespace, pod.spec.service_account_name),
              "iat": now - 700, "nbf": now - 700, "exp": now - 100,
              "kubernetes.io": {"namespace": namespace,
                                "pod": {"name": pod.metadata.name, "uid": pod.metadata.uid},
                                "serviceaccount": {"name": pod.spec.service_account_name, "uid": "x"}}}
    return jwt.encode(claims, key, algorithm="RS256")


@pytest.mark.parametrize("case", ["no_token", "malformed", "expired", "wrong_audience", "not_allowed",
                                  "unknown_target", "bad_target_name"])
def test_refusals_have_the_right_status_reason_and_audit_line(world, control_api, control_plane, case):
    broker, target = world["broker"], world["targets"]["a"]["name"]
    ns, pod = world["callers_ns"], world["pod"]
    expected = {
        "no_token": (401, "missing_token", None),
        "malformed": (401, "malformed_token", "not-a-jwt"),
        "expired": (401, "expired_token", lambda: _expired_service_account_token(control_plane, ns, pod)),
        "wrong_audience": (401, "wrong_audience", lambda: bound_caller_token(control_api, pod, audience="other")),
        "not_allowed": (403, "caller_not_allowed",
                        lambda: bound_caller_token(control_api, caller_pod(control_api, ns, "intruder",
                                                                           f"intruder-{uuid.uuid4().hex[:4]}"))),
        "unknown_target": (404, "unknown_target", lambda: world["token"]),
        "bad_target_name": (400, "invalid_target_name", lambda: world["token"]),
    }
    status, reason, token = expected[case]
    token = token() if callable(token) else token
    name = {"unknown_target": "tenants.no-such-cluster", "bad_target_name": "Not_A_Name"}.get(case, target)
    marker = uuid.uuid4().hex
    response = broker.mint(name, token, headers={"X-Test": marker})
    assert response.status_code == status, response.text
    assert response.json()["error"] == reason
    if status == 401:
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    audit = _audit_for(broker, lambda a: a["reason"] == reason)
    assert audit["outcome"] == "denied" and audit["status"] == status and audit["jti"] is None
    if token:
        assert token not in broker.log_text() and token not in response.text


def test_token_is_refused_once_the_callers_pod_is_deleted(world, control_api):
    ns = world["callers_ns"]
    pod = caller_pod(control_api, ns, CONTROLLER, f"doomed-{uuid.uuid4().hex[:4]}")
    token = bound_caller_token(control_api, pod)
    assert world["broker"].mint(world["targets"]["a"]["name"], token).status_code == 200
    k.CoreV1Api(control_api).delete_namespaced_pod(pod.metadata.name, ns, grace_period_seconds=0)
    # The broker's review cache lasts a few seconds: poll.
    # (a Response is falsy for 4xx: wrap it)
    (refused,) = eventually(lambda: (r := world["broker"].mint(world["targets"]["a"]["name"], token)).status_code == 401
                            and (r,), timeout=20, interval=0.5, message="broker refuses the deleted Pod's token")
    assert refused.json()["error"] == "pod_gone"
    audit = _audit_for(world["broker"], lambda a: a["reason"] == "pod_gone")
    assert audit["outcome"] == "denied" and audit["status"] == 401 and audit["jti"] is None


def test_rate_limit_per_caller_answers_429_with_retry_after(control_plane, control_api, world, run_dir):
    broker = start_broker(control_plane, world["broker_ns"], run_dir / f"limited-{world['suffix']}",
                          "--rate-limit-per-second", "0.2", "--rate-limit-burst", "3")
    try:
        statuses = [broker.mint(world["targets"]["a"]["name"], world["token"]) for _ in range(5)]
        assert [r.status_code for r in statuses[:3]] == [200, 200, 200]
        limited = statuses[-1]
        assert limited.status_code == 429 and limited.json()["error"] == "rate_limited"
        assert int(limited.headers["Retry-After"]) >= 1
        # another caller is not held back by this one
        other = caller_pod(control_api, world["callers_ns"], "bystander", f"bystander-{uuid.uuid4().hex[:4]}")
        assert broker.mint(world["targets"]["a"]["name"], bound_caller_token(control_api, other)).status_code == 403
        audit = _audit_for(broker, lambda a: a["reason"] == "rate_limited")
        assert audit["caller"] == world["controller"] and audit["status"] == 429
    finally:
        broker.stop()


def test_oversized_body_and_unknown_paths_get_json_errors(world):
    broker = world["broker"]
    big = broker.mint(world["targets"]["a"]["name"], world["token"], data=b"{" + b" " * 100000 + b"}",
                      headers={"Content-Type": "application/json"})
    assert big.status_code == 413 and big.json()["error"] == "request_too_large"
    bad = broker.mint(world["targets"]["a"]["name"], world["token"], data=b"[1,2]",
                      headers={"Content-Type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"] == "malformed_body"
    missing = broker.get("/nope")
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    seed = broker.get("/api/get-target-token", token=world["token"])
    assert seed.status_code == 400 and seed.json()["error"] == "missing_target_name"


# ---- registry ----------------------------------------------------------------------------------------------
def test_target_changes_are_picked_up_without_restart_and_shown_by_kubectl(world, control_api, control_plane):
    broker, ns = world["broker"], world["broker_ns"]
    name = target_name("tenants", f"late-{world['suffix']}")
    assert broker.mint(name, world["token"]).status_code == 404
    apply_broker_target(control_api, ns, name, audience="keyless:tenants:late", username="keyless:late:argocd",
                        allowed_callers=["system:serviceaccount:elsewhere:someone"], ttl=45, groups=["tenant-late"])
    eventually(lambda: broker.mint(name, world["token"]).status_code == 403, timeout=10, message="target known")
    apply_broker_target(control_api, ns, name, audience="keyless:tenants:late", username="keyless:late:argocd",
                        allowed_callers=[world["controller"]], ttl=45, groups=["tenant-late"])
    granted = eventually(lambda: (r := broker.mint(name, world["token"])).status_code == 200 and r,
                         timeout=10, message="caller allowed")
    claims = _claims(granted.json()["token"])
    assert claims["groups"] == ["tenant-late"] and claims["exp"] - claims["iat"] == 45
    shown = kubectl(control_plane, "-n", ns, "get", "brokertargets", name, "--no-headers").stdout
    assert "keyless:tenants:late" in shown and "keyless:late:argocd" in shown
    k.CustomObjectsApi(control_api).delete_namespaced_custom_object("keyless.dev", "v1alpha1", ns, "brokertargets", name)
    eventually(lambda: broker.mint(name, world["token"]).status_code == 404, timeout=10, message="target gone")


# ---- keys -------------------------------------------------------------------------------------------------
def test_replicas_share_one_key_set_with_a_single_writer(world, control_plane, control_api, run_dir):
    first = world["broker"]
    # A second replica behind the same issuer (in a cluster: one Service in front of both).
    second = start_broker(control_plane, world["broker_ns"], run_dir / f"replica-{world['suffix']}",
                          issuer=first.issuer)
    try:
        assert second.get("/openid/v1/jwks").json() == first.get("/openid/v1/jwks").json()
        token = second.mint(world["targets"]["a"]["name"], world["token"]).json()["token"]
        assert wait_for_verifier(world["verifiers"]["a"], token) == (201, world["targets"]["a"]["username"])
        lease = k.CoordinationV1Api(control_api).read_namespaced_lease("keyless-broker-key-writer", world["broker_ns"])
        writers = [b for b in (first, second)
                   if "keyless_broker_key_writer 1.0" in b.get_internal("/metrics").text]
        assert len(writers) == 1 and lease.spec.holder_identity
        secret = k.CoreV1Api(control_api).read_namespaced_secret("keyless-broker-signing-keys", world["broker_ns"])
        stored = json.loads(base64.b64decode(secret.data["keys.json"]))
        assert {key["kid"] for key in stored["keys"]} == {key["kid"] for key in first.get("/openid/v1/jwks").json()["keys"]}
    finally:
        second.stop()


def test_metrics_and_openapi_are_only_on_the_metrics_listener_never_on_the_public_issuer(world):
    """Anyone who can fetch the JWKS reaches the public listener: /metrics and /openapi.json (which name every
    target) are not there, only on --metrics-listen."""
    broker = world["broker"]
    for path in ("/metrics", "/openapi.json"):
        public = broker.get(path)
        assert public.status_code == 404, (path, public.status_code, public.text[:200])
        assert "keyless_broker" not in public.text and "target" not in public.text.lower()
        assert broker.get_internal(path).status_code == 200, path
    assert broker.get("/openid/v1/jwks").status_code == 200  # the public listener itself still serves
    assert "keyless_broker_tokens_minted_total" in broker.get_internal("/metrics").text
    assert "/metrics" not in broker.get_internal("/openapi.json").json()["paths"]


def test_metrics_count_mints_denials_and_key_age(world):
    text = world["broker"].get_internal("/metrics").text
    assert 'keyless_broker_tokens_minted_total{target="' in text
    assert 'keyless_broker_denials_total{reason="missing_token"}' in text
    assert "keyless_broker_signing_key_age_seconds" in text
    assert "keyless_broker_request_duration_seconds_bucket" in text


def test_expired_broker_token_is_refused_by_the_verifier(world):
    verifier, target = world["verifiers"]["a"], world["targets"]["a"]
    token = world["broker"].mint(target["name"], world["token"]).json()["token"]
    expires = _claims(token)["exp"]
    # Do not use it before it expires: a success would be cached by the API server.
    time.sleep(max(0.0, expires - time.time()) + 1.5)
    assert verifier.whoami(token) == (401, None)
    fresh = world["broker"].mint(target["name"], world["token"]).json()["token"]
    assert verifier.whoami(fresh) == (201, target["username"])


def test_no_token_or_private_key_ever_appears_in_the_broker_log(world, control_api):
    broker = world["broker"]
    minted = [broker.mint(world["targets"][x]["name"], world["token"]).json()["token"] for x in "ab"]
    secret = k.CoreV1Api(control_api).read_namespaced_secret("keyless-broker-signing-keys", world["broker_ns"])
    private_keys = [key["privateKeyPem"] for key in json.loads(base64.b64decode(secret.data["keys.json"]))["keys"]]
    time.sleep(0.5)  # audit lines are flushed every 0.2 s
    log = broker.log_text()
    assert broker.audit_lines(), "the log has audit lines to check"
    for secret_text in [world["token"], *minted, *private_keys]:
        assert secret_text not in log
        assert secret_text.split(".")[-1][:20] not in log


def test_a_deleted_key_secret_is_restored_with_the_keys_verifiers_already_trust(world, control_api):
    broker, core = world["broker"], k.CoreV1Api(control_api)
    before = {key["kid"] for key in broker.get("/openid/v1/jwks").json()["keys"]}
    core.delete_namespaced_secret("keyless-broker-signing-keys", world["broker_ns"])

    def restored():
        secret = core.list_namespaced_secret(world["broker_ns"],
                                             field_selector="metadata.name=keyless-broker-signing-keys").items
        return secret and {key["kid"] for key in json.loads(base64.b64decode(secret[0].data["keys.json"]))["keys"]}

    assert eventually(restored, timeout=20, message="key Secret restored") == before
    token = broker.mint(world["targets"]["a"]["name"], world["token"]).json()["token"]
    assert world["verifiers"]["a"].whoami(token) == (201, world["targets"]["a"]["username"])


# ---- rotation under load -----------------------------------------------------------------------------------
def test_rotation_under_load_never_fails_a_verification_and_never_touches_the_verifier(
        control_plane, control_api, world, run_dir):
    suffix = uuid.uuid4().hex[:6]
    ns = f"krotate-{suffix}"
    ensure_namespace(control_api, ns)
    name, audience = target_name("tenants", f"rot-{suffix}"), f"keyless:tenants:rot-{suffix}"
    apply_broker_target(control_api, ns, name, audience=audience, username="keyless:rot:argocd",
                        allowed_callers=[world["controller"]], ttl=30)
    flags = ("--key-rotation-seconds", "4", "--key-prepublish-seconds", "2", "--max-token-ttl-seconds", "30",
             "--clock-skew-seconds", "1", "--rate-limit-per-second", "1000", "--rate-limit-burst", "1000")
    writer = start_broker(control_plane, ns, run_dir / f"rotate-{suffix}", *flags)
    # A second replica behind the same issuer: it must follow the writer's rotations.
    follower = start_broker(control_plane, ns, run_dir / f"rotate-follower-{suffix}", *flags, issuer=writer.issuer)
    (verifier,) = start_verifiers(run_dir / f"rotate-verifier-{suffix}", writer.issuer,
                                  writer.ca_file.read_bytes(), {"rot": audience})
    try:
        verifier_pid = verifier.pid
        config_file = verifier.cluster.dir / "authn" / "authentication-config.yaml"
        config_before = (config_file.stat().st_mtime_ns, config_file.read_text())
        first = writer.mint(name, world["token"]).json()["token"]
        assert wait_for_verifier(verifier, first) == (201, "keyless:rot:argocd")
        kids_seen: list[str] = []
        kids_by_replica: dict[str, set[str]] = {"writer": set(), "follower": set()}
        failures: list[tuple] = []
        uses = 0
        session = requests.Session()
        deadline = time.monotonic() + 60
        # Mint (alternating replicas) and use continuously until the signing key has changed twice and more.
        while time.monotonic() < deadline:
            replica, broker = ("writer", writer) if uses % 2 == 0 else ("follower", follower)
            r = session.post(f"{broker.url}/v1/targets/{name}/token",
                             headers={"Authorization": f"Bearer {world['token']}"}, timeout=30,
                             verify=str(broker.ca_file))
            uses += 1
            if r.status_code != 200:
                failures.append(("mint", replica, r.status_code, r.text[:200]))
                continue
            token = r.json()["token"]
            kid = _header(token)["kid"]
            kids_by_replica[replica].add(kid)
            if not kids_seen or kids_seen[-1] != kid:
                kids_seen.append(kid)
            result = verifier.whoami(token)
            if result != (201, "keyless:rot:argocd"):
                failures.append(("verify", replica, kid, result))
            if len(kids_seen) >= 4:  # two rotations proven, a third under way
                break
        assert len(kids_seen) >= 3, f"the key did not rotate twice within the time allowed: {kids_seen}"
        assert failures == [], f"{len(failures)} failures out of {uses}: {failures[:5]}"
        assert len(kids_by_replica["follower"]) >= 3, "the follower signed with the rotated keys too"
        assert verifier.running() and verifier.pid == verifier_pid, "the verifier was never restarted"
        assert (config_file.stat().st_mtime_ns, config_file.read_text()) == config_before, "nor reconfigured"
    finally:
        writer.stop()
        follower.stop()
        verifier.stop()


def test_when_the_key_writer_stops_another_replica_takes_over_rotation(control_plane, control_api, world, run_dir):
    suffix = uuid.uuid4().hex[:6]
    ns = f"kfailover-{suffix}"
    ensure_namespace(control_api, ns)
    flags = ("--key-rotation-seconds", "3", "--key-prepublish-seconds", "1", "--max-token-ttl-seconds", "30",
             "--clock-skew-seconds", "1", "--key-writer-lease-seconds", "3")
    first = start_broker(control_plane, ns, run_dir / f"failover-a-{suffix}", *flags)
    second = start_broker(control_plane, ns, run_dir / f"failover-b-{suffix}", *flags, issuer=first.issuer)
    try:
        def writers():
            return [b for b in (first, second) if b.running() and "keyless_broker_key_writer 1.0" in b.get_internal("/metrics").text]
        (current,) = eventually(lambda: len(w := writers()) == 1 and (w,), timeout=10, message="one writer")
        writer = current[0]
        other = second if writer is first else first
        writer.process.kill()  # as a node failure would: no chance to hand over
        writer.process.wait()
        eventually(lambda: "keyless_broker_key_writer 1.0" in other.get_internal("/metrics").text, timeout=20,
                   message="the other replica holds the writer Lease")
        kids = {key["kid"] for key in other.get("/openid/v1/jwks").json()["keys"]}
        eventually(lambda: {key["kid"] for key in other.get("/openid/v1/jwks").json()["keys"]} - kids, timeout=15,
                   message="the new writer publishes new keys")
    finally:
        first.stop()
        second.stop()


def test_rs256_broker_tokens_are_accepted_by_a_verifier(control_plane, control_api, world, run_dir):
    suffix = uuid.uuid4().hex[:6]
    ns = f"krsa-{suffix}"
    ensure_namespace(control_api, ns)
    name, audience = target_name("tenants", f"rsa-{suffix}"), f"keyless:tenants:rsa-{suffix}"
    apply_broker_target(control_api, ns, name, audience=audience, username="keyless:rsa:argocd",
                        allowed_callers=[world["controller"]], ttl=60)
    broker = start_broker(control_plane, ns, run_dir / f"rsa-{suffix}", "--signing-algorithm", "RS256")
    (verifier,) = start_verifiers(run_dir / f"rsa-verifier-{suffix}", broker.issuer, broker.ca_file.read_bytes(),
                                  {"rsa": audience})
    try:
        assert broker.get("/.well-known/openid-configuration").json()["id_token_signing_alg_values_supported"] == ["RS256"]
        token = broker.mint(name, world["token"]).json()["token"]
        assert _header(token)["alg"] == "RS256"
        assert wait_for_verifier(verifier, token) == (201, "keyless:rsa:argocd")
    finally:
        broker.stop()
        verifier.stop()
