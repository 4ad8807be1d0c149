"""Signing keys and compact JWS tokens (ES256 / RS256), built by hand because it is the hot path."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

ALGORITHMS = ("ES256", "RS256")

_SHA256 = hashes.SHA256()
_ECDSA_SHA256 = ec.ECDSA(_SHA256)
_PKCS1 = padding.PKCS1v15()
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _int_b64(value: int, length: int | None = None) -> str:
    length = length or (value.bit_length() + 7) // 8
    return b64url(value.to_bytes(length, "big"))


def generate_private_key(algorithm: str):
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unsupported signing algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)}")


def private_key_pem(private_key) -> str:
    return private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()).decode("ascii")


def load_private_key_pem(pem: str):
    return serialization.load_pem_private_key(pem.encode("ascii"), password=None)


def public_jwk(private_key, algorithm: str) -> dict:
    """The public JWK without kid/use/alg (the members RFC 7638 thumbprints are computed over)."""
    public = private_key.public_key()
    if algorithm == "ES256":
        numbers = public.public_numbers()
        return {"crv": "P-256", "kty": "EC", "x": _int_b64(numbers.x, 32), "y": _int_b64(numbers.y, 32)}
    numbers = public.public_numbers()
    return {"e": _int_b64(numbers.e), "kty": "RSA", "n": _int_b64(numbers.n)}


def thumbprint(jwk: dict) -> str:
    """RFC 7638 JWK thumbprint: a kid that is derived from the key itself, so replicas always agree."""
    canonical = json.dumps(jwk, separators=(",", ":"), sort_keys=True).encode()
    return b64url(hashlib.sha256(canonical).digest())


@dataclass(frozen=True)
class SigningKey:
    """One key of the broker's key set; `signing_from` is when it starts to sign (epoch seconds)."""

    kid: str
    algorithm: str
    private_key: object = field(repr=False, compare=False)
    published_at: float
    signing_from: float

    @classmethod
    def generate(cls, algorithm: str, published_at: float, signing_from: float) -> "SigningKey":
        private_key = generate_private_key(algorithm)
        return cls(thumbprint(public_jwk(private_key, algorithm)), algorithm, private_key, published_at, signing_from)

    def jwk(self) -> dict:
        return {**public_jwk(self.private_key, self.algorithm), "kid": self.kid, "use": "sig", "alg": self.algorithm}

    def __repr__(self) -> str:  # never show key material
        return f"SigningKey(kid={self.kid!r}, algorithm={self.algorithm!r}, signing_from={self.signing_from})"


class TokenSigner:
    """Signs compact JWS tokens with one key; the encoded header is computed once per key."""

    def __init__(self, key: SigningKey):
        self.key = key
        self._header = b64url(_dumps({"alg": key.algorithm, "kid": key.kid, "typ": "JWT"}).encode()) + "."
        private_key = key.private_key
        if key.algorithm == "ES256":
            def sign(data: bytes) -> bytes:
                r, s = decode_dss_signature(private_key.sign(data, _ECDSA_SHA256))
                return r.to_bytes(32, "big") + s.to_bytes(32, "big")
        else:
            def sign(data: bytes) -> bytes:
                return private_key.sign(data, _PKCS1, _SHA256)
        self._sign = sign

    def sign(self, claims: dict) -> str:
        return self.sign_payload(_dumps(claims))

    def sign_payload(self, payload_json: str) -> str:
        signing_input = self._header + b64url(payload_json.encode())
        return signing_input + "." + b64url(self._sign(signing_input.encode("ascii")))


class ClaimsTemplate:
    """The claims of one target with the constant part encoded once; `payload()` adds the per-token part.

    Produces exactly token_claims()'s JSON (same members, same order) without a dict per token.
    """

    def __init__(self, issuer: str, subject: str, audience: str, groups: list[str] | tuple[str, ...] = ()):
        self._head = _dumps({"iss": issuer, "sub": subject, "aud": audience})[:-1] + ","
        self._tail = ("," + _dumps({"groups": list(groups)})[1:]) if groups else "}"

    def payload(self, now: int, ttl_seconds: int) -> tuple[str, str, int]:
        """(payload JSON, jti, exp)."""
        jti = b64url(os.urandom(16))
        exp = now + ttl_seconds
        return f'{self._head}"iat":{now},"nbf":{now},"exp":{exp},"jti":"{jti}"{self._tail}', jti, exp


def token_claims(issuer: str, subject: str, audience: str, now: int, ttl_seconds: int,
                 groups: list[str] | tuple[str, ...] | None = None) -> dict:
    claims = {"iss": issuer, "sub": subject, "aud": audience, "iat": now, "nbf": now,
              "exp": now + ttl_seconds, "jti": secrets.token_urlsafe(16)}
    if groups:
        claims["groups"] = list(groups)
    return claims


def unverified_claims(token: str) -> dict | None:
    """The payload of a JWT without checking it: only for bounding caches and naming refusals."""
    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        return None
    try:
        payload = parts[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, UnicodeDecodeError, RecursionError):  # e.g. a payload of 12 KB of "["
        return None
    return claims if isinstance(claims, dict) else None
