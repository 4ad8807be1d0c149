"""kopf's credentials: the same as our own client's (kubeconfig, then in-cluster), so kopf needs no
`kubernetes` library (not a runtime dependency) and reads no other kubeconfig than we do."""
from __future__ import annotations

import kopf

from .client import KubeConfig


def kopf_connection_info(kubeconfig: str | None) -> kopf.ConnectionInfo:
    config = KubeConfig.default(kubeconfig)
    token = config.token_file.read_text().strip() if config.token_file else config.token
    return kopf.ConnectionInfo(
        server=config.server,
        ca_data=config.ca_pem,
        insecure=config.insecure,
        certificate_data=config.client_cert_pem,
        private_key_data=config.client_key_pem,
        scheme="Bearer" if token else None,
        token=token,
        expiration=None,
    )
