"""What Argo CD builds from a cluster Secret: the client configuration, as a kubeconfig (pure).

Argo CD turns `server`, `config.tlsClientConfig` and `config.execProviderConfig` into a client-go
rest.Config with `interactiveMode: Never` (util/db `SecretToCluster`, `Cluster.RawRestConfig`).
The same values in a kubeconfig let kubectl, tests and `keyless doctor` do exactly what Argo CD does.
"""
from __future__ import annotations

import base64
import json
from typing import Mapping


def cluster_secret_fields(secret: Mapping) -> dict[str, str]:
    """The decoded data of an Argo CD cluster Secret (`data` base64, or `stringData`)."""
    fields = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    fields.update(secret.get("stringData") or {})
    return fields


def kubeconfig_from_cluster_secret(secret: Mapping, context: str = "argocd") -> dict:
    """A kubeconfig with exactly the server, CA and exec credential Argo CD would use."""
    fields = cluster_secret_fields(secret)
    config = json.loads(fields.get("config") or "{}")
    tls = config.get("tlsClientConfig") or {}
    cluster: dict = {"server": fields["server"]}
    if tls.get("caData"):
        cluster["certificate-authority-data"] = tls["caData"]
    if tls.get("insecure"):
        cluster["insecure-skip-tls-verify"] = True
    user: dict = {}
    exec_config = config.get("execProviderConfig")
    if exec_config:
        user["exec"] = {"apiVersion": exec_config["apiVersion"], "command": exec_config["command"],
                        "args": list(exec_config.get("args") or ()), "interactiveMode": "Never",
                        **({"env": [{"name": k, "value": v} for k, v in exec_config["env"].items()]}
                           if exec_config.get("env") else {})}
    elif config.get("bearerToken"):
        user["token"] = config["bearerToken"]
    name = fields.get("name") or context
    return {
        "apiVersion": "v1", "kind": "Config", "current-context": context,
        "clusters": [{"name": name, "cluster": cluster}],
        "users": [{"name": context, "user": user}],
        "contexts": [{"name": context, "context": {"cluster": name, "user": context}}],
    }
