"""The token broker: an OIDC issuer that mints short-lived, audience-scoped tokens for reviewed callers."""
