"""`keyless operator`: parse flags into OperatorSettings, optionally wait for leadership, run kopf."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

PROXY_IMAGE = "ghcr.io/tremolosecurity/kube-oidc-proxy:1.0.11"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kubeconfig", help="kubeconfig of the control plane (default $KUBECONFIG, then in-cluster)")
    p.add_argument("--namespace", action="append", default=[],
                   help="watch RemoteTenantClusters only in this namespace (repeatable; default all)")
    p.add_argument("--argocd-namespace", action="append", default=[],
                   help="an Argo CD namespace the operator may write cluster Secrets to (repeatable; default argocd)")
    p.add_argument("--broker-namespace", default="keyless-system", help="where BrokerTargets go (default %(default)s)")
    p.add_argument("--pki-namespace", default="",
                   help="where the per-cluster proxy CA Secrets go (default: the broker namespace; use a "
                        "separate one so the operator needs no Secret rights next to the broker's signing keys)")
    p.add_argument("--broker-issuer", default="https://keyless-broker.keyless-system.svc",
                   help="the broker's OIDC issuer URL, which tenant clusters trust")
    p.add_argument("--broker-url", help="URL the operator uses to mint verification tokens (default: the issuer)")
    p.add_argument("--broker-ca-file", help="CA bundle of the broker's serving certificate")
    p.add_argument("--broker-token-file", help="the operator's own Pod-bound token for the broker")
    p.add_argument("--exec-mode", choices=["agent", "token"], default="agent",
                   help="Argo CD's exec command: read the agent's file (default) or run `keyless token`")
    p.add_argument("--credential-dir", default="/var/run/keyless/credentials",
                   help="where the agent keeps ExecCredential files in the Argo CD pods")
    p.add_argument("--exec-broker-url", help="broker URL as seen from the Argo CD pods (token mode)")
    p.add_argument("--exec-broker-ca-file", default="/var/run/keyless/broker-ca/ca.crt",
                   help="broker CA path inside the Argo CD pods (token mode)")
    p.add_argument("--exec-token-file", default="/var/run/secrets/keyless.dev/broker/token",
                   help="projected token path inside the Argo CD pods (token mode)")
    p.add_argument("--exec-command", default="keyless", help="path of keyless inside the Argo CD pods (token mode)")
    p.add_argument("--resync-seconds", type=float, default=60.0, help="drift-repair interval (default %(default)s)")
    p.add_argument("--retry-seconds", type=float, default=5.0, help="base delay before retrying a failed step")
    p.add_argument("--deletion-give-up-seconds", type=float, default=120.0,
                   help="stop trying to clean an unreachable tenant after this long, with an Event (default %(default)s)")
    p.add_argument("--tenant-api-timeout-seconds", type=float, default=10.0,
                   help="timeout of each call to a tenant API (default %(default)s)")
    p.add_argument("--verify-seconds", type=float, default=300.0,
                   help="how often a verified chain is proven again with a real token (default %(default)s)")
    p.add_argument("--signing-algorithm", choices=["ES256", "RS256"], default="ES256",
                   help="the broker's signing algorithm, for the tenant side's trust configuration")
    p.add_argument("--proxy-image", default=PROXY_IMAGE, help="kube-oidc-proxy image for Managed mode")
    p.add_argument("--metrics-listen", default="0.0.0.0:8080", metavar="HOST:PORT",
                   help="Prometheus metrics (default %(default)s; empty to disable)")
    p.add_argument("--health-listen", default="0.0.0.0:8081", metavar="HOST:PORT",
                   help="kopf liveness probe at /healthz (default %(default)s; empty to disable)")
    p.add_argument("--webhook-listen", default="", metavar="HOST:PORT",
                   help="serve the tenant guardrail admission webhooks here (default: disabled)")
    p.add_argument("--webhook-tls-cert-file", default="/etc/keyless/webhook-tls/tls.crt",
                   help="webhook serving certificate (reloaded when the file changes)")
    p.add_argument("--webhook-tls-key-file", default="/etc/keyless/webhook-tls/tls.key")
    p.add_argument("--webhook-admin-user", action="append", default=[],
                   help="a user exempt from the guardrails (repeatable)")
    p.add_argument("--webhook-admin-group", action="append", default=[],
                   help="a group exempt from the guardrails (repeatable; default system:masters)")
    p.add_argument("--leader-election", action="store_true",
                   help="run as one of several replicas: only the holder of the Lease reconciles")
    p.add_argument("--leader-election-namespace", default="keyless-system")
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(run=run)


def settings_from_args(args: argparse.Namespace):
    from .render.argocd import ExecSettings
    from .settings import OperatorSettings

    exec_settings = ExecSettings(
        mode=args.exec_mode,
        credential_dir=args.credential_dir,
        broker_url=args.exec_broker_url or args.broker_url or args.broker_issuer,
        broker_ca_file=args.exec_broker_ca_file,
        token_file=args.exec_token_file,
        keyless_command=args.exec_command,
    )
    return OperatorSettings(
        argocd_namespaces=tuple(args.argocd_namespace or ["argocd"]),
        broker_namespace=args.broker_namespace,
        pki_namespace=args.pki_namespace or args.broker_namespace,
        broker_issuer=args.broker_issuer.rstrip("/"),
        broker_url=(args.broker_url or args.broker_issuer).rstrip("/"),
        broker_ca_file=args.broker_ca_file,
        broker_token_file=args.broker_token_file,
        exec=exec_settings,
        resync_seconds=args.resync_seconds,
        retry_seconds=args.retry_seconds,
        proxy_image=args.proxy_image,
        verify_seconds=args.verify_seconds,
        deletion_give_up_seconds=args.deletion_give_up_seconds,
        tenant_api_timeout_seconds=args.tenant_api_timeout_seconds,
        signing_algorithm=args.signing_algorithm,
    )


def _webhook_options(args: argparse.Namespace) -> dict | None:
    if not args.webhook_listen:
        return None
    host, port = _split(args.webhook_listen)
    options = {"listen_host": host, "port": port, "cert_file": args.webhook_tls_cert_file,
               "key_file": args.webhook_tls_key_file, "kubeconfig": args.kubeconfig,
               "admin_users": args.webhook_admin_user,
               "argocd_namespaces": args.argocd_namespace or ["argocd"]}
    if args.webhook_admin_group:
        options["admin_groups"] = args.webhook_admin_group
    return options


async def _serve_standby_health(listen: str):
    from aiohttp import web

    async def healthz(_request):
        return web.json_response({"status": "standby"})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, port = _split(listen)
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    return runner


def _split(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host or "0.0.0.0", int(port)


def run(args: argparse.Namespace) -> int:
    import kopf
    from prometheus_client import start_http_server

    from . import handlers  # noqa: F401  (registers the kopf handlers)

    if args.webhook_listen:
        # Importing registers the admission handlers; kopf then needs configure_admission (startup).
        from .webhooks import handlers as guardrails  # noqa: F401
    from .kube.lease import hold_leadership

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig
    settings = settings_from_args(args)
    if args.metrics_listen:
        host, port = _split(args.metrics_listen)
        start_http_server(port, addr=host)
    liveness = None
    if args.health_listen:
        host, port = _split(args.health_listen)
        liveness = f"http://{host}:{port}/healthz"

    async def main() -> None:
        stop = asyncio.Event()
        leadership = None
        if args.leader_election:
            # A standby is alive, just not leading: answer the liveness probe meanwhile, or the
            # kubelet would restart it forever. kopf takes the port over once this replica leads.
            standby = await _serve_standby_health(args.health_listen) if args.health_listen else None
            try:
                leadership = await hold_leadership(args.kubeconfig, args.leader_election_namespace,
                                                   "keyless-operator", stop)
            finally:
                if standby is not None:
                    await standby.cleanup()
        try:
            await kopf.operator(
                standalone=True,
                clusterwide=not args.namespace,
                namespaces=args.namespace,
                memo=kopf.Memo(settings=settings, kubeconfig=args.kubeconfig, webhooks=_webhook_options(args),
                               namespaces=list(args.namespace)),
                liveness_endpoint=liveness,
                stop_flag=stop,
            )
        finally:
            if leadership is not None:
                leadership.cancel()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="keyless operator")
    add_arguments(parser)
    ns = parser.parse_args()
    sys.exit(ns.run(ns))
