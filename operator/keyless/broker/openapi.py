"""The OpenAPI 3 document of the broker's public HTTP API (--listen). It is served at /openapi.json on the
separate --metrics-listen listener, next to /metrics, never on the public one; fuzz tests start from it."""
from __future__ import annotations

TARGET_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"


def _error(description: str) -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def openapi_document(origin: str, issuer_path: str) -> dict:
    """`origin` is the issuer's scheme://host:port; `issuer_path` its path ('' for none)."""
    errors = {
        "400": _error("Malformed request (bad target name, query or body)."),
        "401": _error("No caller token, or the API server did not accept it, or its Pod is gone."),
        "403": _error("The caller is not allowed for this target."),
        "404": _error("No such target."),
        "409": _error("Another target names this target's audience: neither is served until only one does."),
        "413": _error("Request body too large."),
        "429": _error("Too many requests from this caller; see Retry-After."),
        "503": _error("The broker cannot decide now (API server unreachable, no signing key yet)."),
    }
    target_name = {"name": "name", "in": "path", "required": True,
                   "schema": {"type": "string", "pattern": TARGET_NAME_PATTERN, "maxLength": 253}}
    json_ok = lambda ref, text: {  # noqa: E731
        "description": text, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "Keyless token broker", "version": "v1",
                 "description": "Mints short-lived, audience-scoped tokens for tenant clusters, for callers proven "
                                "by a Kubernetes TokenReview of their Pod-bound ServiceAccount token."},
        "servers": [{"url": origin}],
        "security": [{"caller": []}],
        "paths": {
            f"{issuer_path}/.well-known/openid-configuration": {"get": {
                "summary": "OIDC discovery", "security": [],
                "responses": {"200": json_ok("Discovery", "The discovery document.")}}},
            f"{issuer_path}/openid/v1/jwks": {"get": {
                "summary": "Published verification keys (next, current, previous)", "security": [],
                "responses": {"200": {"description": "JWK set",
                                      "content": {"application/jwk-set+json": {"schema": {"$ref": "#/components/schemas/JWKS"}}}}}}},
            "/v1/targets/{name}/token": {"post": {
                "summary": "Mint a token for one target",
                "parameters": [target_name],
                "requestBody": {"required": False, "content": {"application/json": {"schema": {
                    "type": "object", "description": "Reserved; send nothing or {}."}}}},
                "responses": {"200": json_ok("TokenResponse", "A token for the target."), **errors}}},
            "/v1/targets": {"get": {
                "summary": "Targets the caller may get tokens for",
                "responses": {"200": json_ok("TargetList", "The caller's targets."),
                              **{k: v for k, v in errors.items() if k in ("401", "429", "503")}}}},
            "/api/get-target-token": {"get": {
                "summary": "Seed-compatible minting: the raw token as text",
                "parameters": [{"name": "targetName", "in": "query", "required": True,
                                "schema": {"type": "string", "pattern": TARGET_NAME_PATTERN, "maxLength": 253}}],
                "responses": {"200": {"description": "The raw token.",
                                      "content": {"text/plain": {"schema": {"type": "string"}}}}, **errors}}},
            "/healthz": {"get": {"summary": "Liveness", "security": [],
                                 "responses": {"200": json_ok("Health", "Alive.")}}},
            "/readyz": {"get": {"summary": "Readiness: keys loaded and targets synced", "security": [],
                                "responses": {"200": json_ok("Health", "Ready."),
                                              "503": json_ok("Health", "Not ready yet.")}}},
        },
        "components": {
            "securitySchemes": {"caller": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                                           "description": "The caller's Pod-bound projected ServiceAccount token."}},
            "schemas": {
                "Error": {"type": "object", "required": ["error", "message"], "properties": {
                    "error": {"type": "string"}, "message": {"type": "string"}}},
                "TokenResponse": {"type": "object",
                                  "required": ["token", "expirationTimestamp", "expiresIn", "target"],
                                  "properties": {"token": {"type": "string"},
                                                 "expirationTimestamp": {"type": "string", "format": "date-time"},
                                                 "expiresIn": {"type": "integer"},
                                                 "target": {"type": "string"}}},
                "TargetList": {"type": "object", "required": ["targets"], "properties": {"targets": {
                    "type": "array", "items": {"type": "object", "required": ["name", "tokenTTLSeconds", "audience"],
                                               "properties": {"name": {"type": "string"},
                                                              "tokenTTLSeconds": {"type": "integer"},
                                                              "audience": {"type": "string"}}}}}},
                "Discovery": {"type": "object", "required": ["issuer", "jwks_uri"], "properties": {
                    "issuer": {"type": "string"}, "jwks_uri": {"type": "string"}}},
                "JWKS": {"type": "object", "required": ["keys"],
                         "properties": {"keys": {"type": "array", "items": {"type": "object"}}}},
                "Health": {"type": "object", "properties": {"status": {"type": "string"}}},
            },
        },
    }
