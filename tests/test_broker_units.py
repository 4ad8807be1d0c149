"""Pure parts of the broker: token signing, the key rotation policy, rate limiting, audit lines."""
from __future__ import annotations

import asyncio
import io
import json
import time

import jwt
import pytest
from jwt import PyJWK

from keyless.broker.audit import AuditLog
from keyless.broker.keys import KeySet, RotationPolicy, plan_rotation
from keyless.broker.ratelimit import RateLimiter
from keyless.broker.review import CallerReviewer, Refused, _why_unauthenticated
from keyless.broker.signing import ClaimsTemplate, SigningKey, TokenSigner, token_claims, unverified_claims
from keyless.broker.targets import Target


@pytest.mark.parametrize("algorithm", ["ES256", "RS256"])
def test_signed_token_verifies_with_the_published_jwk_and_carries_the_contract_claims(algorithm):
    key = SigningKey.generate(algorithm, 0, 0)
    now = int(time.time())
    token = TokenSigner(key).sign(token_claims("https://broker.example/x", "keyless:t:argocd", "keyless:ns:c",
                                               now, 60))
    header = jwt.get_unverified_header(token)
    assert header == {"alg": algorithm, "kid": key.kid, "typ": "JWT"}
    public = PyJWK(key.jwk())
    claims = jwt.decode(token, public.key, algorithms=[algorithm], audience="keyless:ns:c",
                        issuer="https://broker.example/x")
    assert claims["sub"] == "keyless:t:argocd" and claims["exp"] == now + 60 and claims["nbf"] == claims["iat"] == now
    assert "groups" not in claims and len(claims["jti"]) >= 16
    other = SigningKey.generate(algorithm, 0, 0)
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, PyJWK(other.jwk()).key, algorithms=[algorithm], audience="keyless:ns:c")


def test_groups_claim_only_when_configured_and_every_jti_differs():
    a = token_claims("https://i", "s", "a", 1, 60, ["g1"])
    b = token_claims("https://i", "s", "a", 1, 60)
    assert a["groups"] == ["g1"] and "groups" not in b and a["jti"] != b["jti"]


def test_jwk_never_contains_private_material_and_kid_is_its_thumbprint():
    for algorithm in ("ES256", "RS256"):
        key = SigningKey.generate(algorithm, 0, 0)
        jwk = key.jwk()
        assert not {"d", "p", "q", "dp", "dq", "qi"} & set(jwk)
        assert jwk["kid"] == key.kid == SigningKey(key.kid, algorithm, key.private_key, 0, 0).kid
        assert "PRIVATE" not in repr(key)


def test_unverified_claims_rejects_what_is_not_a_jwt():
    assert unverified_claims("not-a-jwt") is None
    assert unverified_claims("a..c") is None
    assert unverified_claims("a.!!!.c") is None
    assert unverified_claims("eyJhbGciOiJub25lIn0.eyJleHAiOjF9.sig") == {"exp": 1}


# ---- rotation policy ------------------------------------------------------------------------------------
POLICY = RotationPolicy(algorithm="ES256", rotation_seconds=100, prepublish_seconds=30,
                        max_token_ttl_seconds=60, clock_skew_seconds=5)


def _roll(keys: KeySet, now: float, policy=POLICY, **kw) -> KeySet:
    planned = plan_rotation(keys, now, policy, **kw)
    return planned if planned is not None else keys


def test_bootstrap_signs_at_once_and_publishes_a_next_key_that_waits_for_its_turn():
    keys = _roll(KeySet(), 1000)
    first = keys.signing_key(1000)
    assert first is not None and len(keys.keys) == 2
    nxt = keys.keys[1]
    assert nxt.signing_from == 1100 and nxt.published_at == 1000
    assert plan_rotation(keys, 1001, POLICY) is None, "a steady key set is not rewritten"


def test_a_key_signs_only_after_its_prepublication_and_stays_until_max_ttl_after_it_last_signed():
    keys = _roll(KeySet(), 1000)
    first, second = keys.keys
    for now in range(1000, 1400, 1):
        keys = _roll(keys, now)
        signer = keys.signing_key(now)
        assert now - signer.published_at >= POLICY.prepublish_seconds or signer.kid == first.kid
        # every key that signed within max TTL (+ skew) is still published
        assert any(k.kid == first.kid for k in keys.keys) == (now < 1100 + 60 + 5)
        # there is always a published next key
        assert any(k.signing_from > now for k in keys.keys)
    assert keys.signing_key(1399).kid not in {first.kid, second.kid}


def test_forced_rotation_waits_for_prepublication_of_the_next_key():
    keys = _roll(KeySet(), 1000)
    forced = _roll(keys, 1010, force=True)
    nxt = [k for k in forced.keys if k.published_at == 1000 and k.signing_from > 1000][0]
    assert nxt.signing_from == 1030, "not before it was published for prepublish_seconds"
    assert forced.signing_key(1030).kid == nxt.kid


def test_a_shortened_rotation_period_brings_the_planned_next_key_forward():
    """A broker restarted with a smaller --key-rotation-seconds adopts the stored key set, whose next key was
    planned with the old period: it must not wait for that (a day, by default) before rotating."""
    daily = RotationPolicy(algorithm="ES256", rotation_seconds=86400, prepublish_seconds=30, max_token_ttl_seconds=60)
    keys = _roll(KeySet(), 1000, daily)
    first = keys.signing_key(1000)
    assert max(k.signing_from for k in keys.keys) == 1000 + 86400
    shortened = _roll(keys, 1010)
    nxt = [k for k in shortened.keys if k.signing_from > 1010]
    assert len(nxt) == 1 and nxt[0].signing_from == 1100, "the current key's start + the new period"
    assert plan_rotation(shortened, 1011, POLICY) is None, "and then steady"
    assert _roll(shortened, 1100).signing_key(1100).kid != first.kid
    # Overdue under the new period: the next key signs as soon as its pre-publication allows.
    late = _roll(keys, 1500)
    assert late.signing_key(1500).kid != first.kid and late.signing_key(1500).published_at == 1000


def test_changing_algorithm_replaces_the_unused_next_key_and_keeps_the_signing_one():
    keys = _roll(KeySet(), 1000)
    rs = RotationPolicy(algorithm="RS256", rotation_seconds=100, prepublish_seconds=30, max_token_ttl_seconds=60)
    changed = _roll(keys, 1001, rs)
    assert changed.signing_key(1001).algorithm == "ES256"
    assert [k.algorithm for k in changed.keys if k.signing_from > 1001] == ["RS256"]
    assert changed.signing_key(1200).algorithm == "RS256"


def test_key_set_round_trips_through_its_secret_format():
    keys = _roll(KeySet(), 1000)
    again = KeySet.from_json(keys.to_json())
    assert [(k.kid, k.signing_from) for k in again.keys] == [(k.kid, k.signing_from) for k in keys.keys]
    assert again.jwks() == keys.jwks()


# ---- limits, audit, targets ---------------------------------------------------------------------------------
def test_rate_limiter_allows_a_burst_then_refills_per_caller():
    clock = [0.0]
    limiter = RateLimiter(2, 3, clock=lambda: clock[0])
    assert [limiter.allow("a")[0] for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("b")[0]
    allowed, retry = limiter.allow("a")
    assert not allowed and 0 < retry <= 0.5
    clock[0] += 0.5
    assert limiter.allow("a")[0]


def test_audit_line_is_one_json_object_without_the_token():
    stream = io.StringIO()
    audit = AuditLog(stream)
    audit.decision(outcome="granted", reason="allowed", status=200, target="ns.c",
                   caller='system:serviceaccount:a:"b"', pod="a/p", jti="j", expires=1_800_000_000,
                   remote="127.0.0.1", endpoint="token")
    assert stream.getvalue() == ""  # written by the flush loop, not on the mint path
    audit.flush()
    (line,) = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["caller"] == 'system:serviceaccount:a:"b"' and record["exp"] == "2027-01-15T08:00:00Z"
    assert set(record) == {"ts", "audit", "outcome", "reason", "status", "target", "caller", "pod", "jti", "exp",
                           "remote", "endpoint"}


def test_refusal_reasons_are_named_from_the_unverified_claims():
    now = 1000
    assert _why_unauthenticated({"exp": 999, "aud": ["keyless-broker"]}, "keyless-broker", now) == "expired_token"
    assert _why_unauthenticated({"exp": 2000, "aud": ["other"]}, "keyless-broker", now) == "wrong_audience"
    assert _why_unauthenticated({"exp": 2000, "aud": "keyless-broker"}, "keyless-broker", now) == "invalid_token"


def test_incomplete_broker_target_is_not_served():
    good = {"metadata": {"name": "ns.c"}, "spec": {"audience": "a", "username": "u", "allowedCallers": ["x"],
                                                   "tokenTTLSeconds": 60, "groups": ["g"]}}
    assert Target.from_object(good) == Target("ns.c", "a", "u", frozenset({"x"}), 60, ("g",))
    assert Target.from_object({"metadata": {"name": "ns.c"}, "spec": {"audience": "a"}}) is None


# ---- review cache -------------------------------------------------------------------------------------------
class _FakeKube:
    """Answers TokenReviews and Pod reads like an API server would, counting the reviews."""

    def __init__(self, authenticated=True, pod_uid="uid-1"):
        self.authenticated = authenticated
        self.pod_uid = pod_uid
        self.reviews = 0

    async def create(self, path, body):
        self.reviews += 1
        await asyncio.sleep(0.01)
        if not self.authenticated:
            return {"status": {"authenticated": False}}
        return {"status": {"authenticated": True, "audiences": body["spec"]["audiences"], "user": {
            "username": "system:serviceaccount:argocd:controller",
            "extra": {"authentication.kubernetes.io/pod-name": ["controller-0"],
                      "authentication.kubernetes.io/pod-uid": ["uid-1"]}}}}

    async def get(self, path):
        return {"metadata": {"uid": self.pod_uid}} if self.pod_uid else None


def _caller_token(exp: float) -> str:
    return jwt.encode({"exp": int(exp), "aud": ["keyless-broker"]}, "k" * 32, algorithm="HS256")


def test_positive_reviews_are_cached_briefly_and_never_past_the_caller_tokens_expiry():
    clock = [1000.0]
    kube = _FakeKube()
    reviewer = CallerReviewer(kube, "keyless-broker", cache_seconds=5, clock=lambda: clock[0])
    long_lived, short_lived = _caller_token(2000), _caller_token(1002)

    async def scenario():
        # concurrent requests with one token share one review
        callers = await asyncio.gather(*[reviewer.caller(long_lived) for _ in range(10)])
        assert {c.pod for c in callers} == {"argocd/controller-0"} and kube.reviews == 1
        clock[0] = 1004.9
        await reviewer.caller(long_lived)
        assert kube.reviews == 1, "within the cache window"
        clock[0] = 1005.1
        await reviewer.caller(long_lived)
        assert kube.reviews == 2, "the window is a few seconds, then the API server is asked again"
        clock[0] = 1000.0
        await reviewer.caller(short_lived)
        clock[0] = 1002.5  # still inside 5 s, but past the caller token's exp
        await reviewer.caller(short_lived)
        assert kube.reviews == 4

    asyncio.run(scenario())


def test_review_of_a_token_whose_pod_is_gone_is_refused_and_not_cached():
    kube = _FakeKube(pod_uid=None)
    reviewer = CallerReviewer(kube, "keyless-broker", cache_seconds=5)

    async def scenario():
        for _ in range(2):
            with pytest.raises(Refused) as refused:
                await reviewer.caller(_caller_token(time.time() + 600))
            assert (refused.value.status, refused.value.reason) == (401, "pod_gone")
        assert kube.reviews == 2

    asyncio.run(scenario())


@pytest.mark.parametrize("groups", [(), ("g1", 'quote"d')])
def test_claims_template_encodes_the_same_claims_as_token_claims(groups):
    template = ClaimsTemplate("https://broker/x", 'sub"ject', "keyless:ns:c", groups)
    payload, jti, exp = template.payload(1000, 60)
    expected = token_claims("https://broker/x", 'sub"ject', "keyless:ns:c", 1000, 60, list(groups))
    expected["jti"] = jti
    assert json.loads(payload) == expected and list(json.loads(payload)) == list(expected) and exp == 1060
    assert template.payload(1000, 60)[1] != jti


# ---- HTTP layer in process (no API server: reviewer answers from its cache) --------------------------------
def _in_process_broker(issuer: str):
    import base64
    import hashlib

    from keyless.broker.app import Broker, BrokerSettings
    from keyless.broker.keys import KeyStore
    from keyless.broker.review import Caller
    from keyless.broker.targets import TargetRegistry

    keys = KeyStore(None, "ns", POLICY)
    key_set = KeySet((SigningKey.generate("ES256", 0, 0),))
    keys._adopt({"metadata": {"name": "keyless-broker-signing-keys", "resourceVersion": "1"},
                 "data": {"keys.json": base64.b64encode(key_set.to_json().encode()).decode()}})
    registry = TargetRegistry(None, "ns")
    registry.targets["ns.c"] = Target("ns.c", "keyless:ns:c", "keyless:t:argocd", frozenset({"sa"}), 60)
    registry.synced.set()
    reviewer = CallerReviewer(None, "keyless-broker", cache_seconds=1000)
    caller_token = "header.payload.signature"
    reviewer._cache[hashlib.sha256(caller_token.encode()).digest()] = (Caller("sa", "ns", "p", "u"), time.time() + 1000)
    audit = io.StringIO()
    broker = Broker(BrokerSettings(issuer, "ns"), keys, registry, reviewer, RateLimiter(100, 100), AuditLog(audit))
    return broker, caller_token, audit


def test_issuer_path_is_honoured_and_tokens_are_never_cacheable():
    from aiohttp.test_utils import TestClient, TestServer

    broker, caller_token, audit = _in_process_broker("https://broker.example.com/keyless")

    async def scenario():
        async with TestClient(TestServer(broker.application())) as client:
            discovery = await (await client.get("/keyless/.well-known/openid-configuration")).json()
            assert discovery["issuer"] == "https://broker.example.com/keyless"
            assert discovery["jwks_uri"] == "https://broker.example.com/keyless/openid/v1/jwks"
            jwks = await client.get("/keyless/openid/v1/jwks")
            assert jwks.status == 200 and (await jwks.json())["keys"]
            assert (await client.get("/.well-known/openid-configuration")).status == 404
            minted = await client.post("/v1/targets/ns.c/token", headers={"Authorization": f"Bearer {caller_token}"})
            assert minted.status == 200 and minted.headers["Cache-Control"] == "no-store"
            token = (await minted.json())["token"]
            claims = jwt.decode(token, PyJWK((await jwks.json())["keys"][0]).key, algorithms=["ES256"],
                                audience="keyless:ns:c", issuer="https://broker.example.com/keyless")
            assert claims["sub"] == "keyless:t:argocd"
            raw = await client.get("/api/get-target-token", params={"targetName": "ns.c"},
                                   headers={"Authorization": f"Bearer {caller_token}"})
            assert raw.status == 200 and raw.headers["Cache-Control"] == "no-store"
            refused = await client.post("/v1/targets/ns.other/token", headers={"Authorization": f"Bearer {caller_token}"})
            assert refused.status == 404 and caller_token not in await refused.text()
            return token

    token = asyncio.run(scenario())
    broker.audit.flush()
    assert token not in audit.getvalue() and caller_token not in audit.getvalue()
    assert len(audit.getvalue().splitlines()) == 3


def test_before_the_registry_is_listed_the_broker_answers_503_not_unknown_or_empty():
    from aiohttp.test_utils import TestClient, TestServer

    broker, caller_token, _ = _in_process_broker("https://broker.example.com")
    broker.targets.synced.clear()
    headers = {"Authorization": f"Bearer {caller_token}"}

    async def scenario():
        async with TestClient(TestServer(broker.application())) as client:
            listed = await client.get("/v1/targets", headers=headers)
            minted = await client.post("/v1/targets/ns.unknown/token", headers=headers)
            broker.targets.synced.set()
            after = await client.post("/v1/targets/ns.unknown/token", headers=headers)
            return listed.status, listed.headers.get("Retry-After"), minted.status, after.status

    assert asyncio.run(scenario()) == (503, "1", 503, 404)


def test_deeply_nested_token_payload_is_just_not_a_jwt():
    import base64 as b64

    from keyless.broker.signing import unverified_claims

    payload = b64.urlsafe_b64encode(b"[" * 20000).decode().rstrip("=")
    assert unverified_claims(f"eyJhbGciOiJFUzI1NiJ9.{payload}.c2ln") is None


# ---- the unverified token's Pod reference ----------------------------------------------------------------
class _RecordingKube:
    """Refuses every TokenReview and records every GET: what a forged token makes the broker ask for."""

    def __init__(self):
        self.paths: list[str] = []

    async def create(self, path, body):
        return {"status": {"authenticated": False}}

    async def get(self, path):
        self.paths.append(path)
        return None


def _forged_token(namespace, pod_name, uid="0b7a6f3e-9f6d-4a0e-8f6b-0d6c8d1a2b3c") -> str:
    claims = {"exp": int(time.time()) + 600, "aud": ["keyless-broker"],
              "kubernetes.io": {"namespace": namespace, "pod": {"name": pod_name, "uid": uid}}}
    return jwt.encode(claims, "k" * 32, algorithm="HS256")


@pytest.mark.parametrize("namespace, pod_name", [
    ("keyless-system/secrets/keyless-broker-signing-keys/..", "x"),
    ("argocd", "../../secrets/keyless-broker-signing-keys"),
    ("argocd", "controller-0/../../secrets/x"),
    ("argocd", "%2e%2e"),
    ("Argocd", "controller-0"),
    ("argocd", "x" * 254),
])
def test_a_failed_review_never_looks_up_a_path_built_from_an_unverified_token(namespace, pod_name):
    kube = _RecordingKube()
    reviewer = CallerReviewer(kube, "keyless-broker")
    with pytest.raises(Refused) as refused:
        asyncio.run(reviewer.caller(_forged_token(namespace, pod_name)))
    assert (refused.value.status, refused.value.reason) == (401, "invalid_token")
    assert kube.paths == []


def test_a_failed_review_of_a_well_formed_pod_reference_names_a_gone_pod():
    kube = _RecordingKube()
    reviewer = CallerReviewer(kube, "keyless-broker")
    with pytest.raises(Refused) as refused:
        asyncio.run(reviewer.caller(_forged_token("argocd", "controller-0")))
    assert refused.value.reason == "pod_gone"
    assert kube.paths == ["/api/v1/namespaces/argocd/pods/controller-0"]
