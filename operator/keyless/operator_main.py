"""`keyless operator`: flags into one OperatorSettings, optionally wait for leadership, run kopf."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    from . import settings

    p.add_argument("--kubeconfig", help="kubeconfig of the control plane (default $KUBECONFIG, then in-cluster)")
    p.add_argument("--namespace", action="append", default=[],
                   help="watch RemoteTenantClusters only in this namespace (repeatable; default all)")
    settings.add_arguments(p)
    p.add_argument("--metrics-listen", default="0.0.0.0:8080", metavar="HOST:PORT",
                   help="Prometheus metrics (default %(default)s; empty to disable)")
    p.add_argument("--health-listen", default="0.0.0.0:8081", metavar="HOST:PORT",
                   help="kopf liveness probe at /healthz (default %(default)s; empty to disable)")
    p.add_argument("--webhook-listen", default="", metavar="HOST:PORT",
                   help="serve the tenant guardrail admission webhooks here (default: disabled)")
    p.add_argument("--webhook-tls-cert-file", default="/etc/keyless/webhook-tls/tls.crt",
                   help="webhook serving certificate (reloaded when the file changes; default %(default)s)")
    p.add_argument("--webhook-tls-key-file", default="/etc/keyless/webhook-tls/tls.key",
                   help="the webhook serving certificate's private key")
    p.add_argument("--webhook-admin-user", action="append", default=[],
                   help="a user exempt from the guardrails (repeatable; default none)")
    p.add_argument("--webhook-admin-group", action="append", default=[],
                   help="a group exempt from the guardrails (repeatable; default system:masters)")
    p.add_argument("--leader-election", action="store_true",
                   help="run as one of several replicas: only the holder of the Lease reconciles")
    p.add_argument("--leader-election-namespace", default="keyless-system",
                   help="the Lease's namespace (default %(default)s)")
    p.add_argument("--leader-election-name", default="keyless-operator", help="the Lease's name (default %(default)s)")
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="least severe log level printed; DEBUG includes kopf's per-object detail "
                        "(default %(default)s)")
    p.set_defaults(run=run)


def _webhook_options(args: argparse.Namespace, operator_settings) -> dict | None:
    if not args.webhook_listen:
        return None
    host, port = _split(args.webhook_listen)
    options = {"listen_host": host, "port": port, "cert_file": args.webhook_tls_cert_file,
               "key_file": args.webhook_tls_key_file, "kubeconfig": args.kubeconfig,
               "admin_users": args.webhook_admin_user,
               "argocd_namespaces": list(operator_settings.argocd_namespaces)}
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
    from . import settings as operator_settings

    if args.webhook_listen:
        # Importing registers the admission handlers; kopf then needs configure_admission (startup).
        from .webhooks import handlers as guardrails  # noqa: F401
    from .kube.lease import hold_leadership

    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level != "DEBUG":
        # kopf's "Handler ... succeeded" per watch event says nothing (Keyless's own line per outcome does,
        # keyless.controller); its warnings and errors still show.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig
    settings = operator_settings.from_args(args)
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
                                                   args.leader_election_name, stop)
            finally:
                if standby is not None:
                    await standby.cleanup()
        try:
            await kopf.operator(
                standalone=True,
                clusterwide=not args.namespace,
                namespaces=args.namespace,
                memo=kopf.Memo(settings=settings, kubeconfig=args.kubeconfig, webhooks=_webhook_options(args, settings),
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
