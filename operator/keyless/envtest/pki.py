"""Throw-away PKI for local test clusters; the generic parts live in keyless.pki."""
from __future__ import annotations

from ..pki import KeyPair, issue_certificate, new_ca, new_rsa_key_pem

__all__ = ["KeyPair", "issue_certificate", "new_ca", "new_rsa_key_pem"]
