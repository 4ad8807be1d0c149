"""`keyless token`: the on-demand client-go exec plugin; asks the broker for one target's token.

It runs on every token refresh of kubectl and scripts, so start-up is kept short: only the standard
library, imported when needed (no aiohttp, no kubernetes client). Errors go to stderr with exit code 1
and never carry a token: not the caller's ServiceAccount token, not a minted one.
"""
from __future__ import annotations

import os
import sys

TOKEN_FILE_ENV = "KEYLESS_TOKEN_FILE"
TARGET_ENV = "KEYLESS_TARGET"
REQUEST_TIMEOUT_SECONDS = 15.0


class TokenCommandError(Exception):
    """A failure the user can act on; the message is safe to print."""


def exec_credential_json(minted, api_version: str) -> str:
    import json

    from keyless.agent.exec_credential import build_exec_credential, real_expiry, stated_expiry

    expiry = real_expiry(minted.requested_at, minted.expires_in, minted.broker_expiration)
    credential = build_exec_credential(minted.token, stated_expiry(expiry, minted.expires_in), api_version)
    return json.dumps(credential, separators=(",", ":"))


def target_from_exec_info(exec_info: str | None) -> str | None:
    """The target a ClusterProfile names for this cluster: client-go hands the cluster's
    `client.authentication.k8s.io/exec` extension to the plugin as spec.cluster.config (with
    provideClusterInfo: true), and Keyless's ClusterProfiles put {"target": ...} there."""
    import json

    try:
        config = ((json.loads(exec_info or "{}").get("spec") or {}).get("cluster") or {}).get("config") or {}
    except (ValueError, AttributeError):
        return None
    target = config.get("target") if isinstance(config, dict) else None
    return target if isinstance(target, str) and target else None


def resolve_target(target: str | None) -> str:
    """--target, else $KEYLESS_TARGET (a ClusterProfile's additional-envs), else the cluster info."""
    found = target or os.environ.get(TARGET_ENV) or target_from_exec_info(os.environ.get("KUBERNETES_EXEC_INFO"))
    if not found:
        raise TokenCommandError(f"no target: pass --target, set {TARGET_ENV}, or run with provideClusterInfo: true "
                                f"against a ClusterProfile that Keyless wrote")
    return found


def run(broker_url: str, target: str | None, ca_file: str | None = None, token_file: str | None = None) -> int:
    from keyless.agent.exec_credential import UnsupportedApiVersion, api_version_from_exec_info
    from keyless.brokerclient import blocking
    from keyless.brokerclient.reply import BrokerError, BrokerRefused, read_caller_token
    from keyless.model.names import DEFAULT_CALLER_TOKEN_FILE

    try:
        target = resolve_target(target)
        api_version = api_version_from_exec_info(os.environ.get("KUBERNETES_EXEC_INFO"))
        caller_token = read_caller_token(
            token_file or os.environ.get(TOKEN_FILE_ENV) or DEFAULT_CALLER_TOKEN_FILE,
            missing_hint=f"; pass --token-file (or set {TOKEN_FILE_ENV}) to a projected ServiceAccount token "
                         f"with audience keyless-broker")
        minted = blocking.mint(broker_url, target, caller_token, ca_file, REQUEST_TIMEOUT_SECONDS)
        output = exec_credential_json(minted, api_version)
    except BrokerRefused as e:
        detail = f"{e.error}: {e.message}" if e.error or e.message else "no error details"
        print(f"keyless token: the broker refused a token for target {target!r} (HTTP {e.status}) {detail}",
              file=sys.stderr)
        return 1
    except (TokenCommandError, BrokerError, UnsupportedApiVersion) as e:
        print(f"keyless token: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(output + "\n")
    sys.stdout.flush()
    return 0
