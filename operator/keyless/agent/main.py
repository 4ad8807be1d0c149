"""`keyless agent`: wires the broker client, the credential keeper and the health/metrics server."""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import ssl
import sys
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..brokerclient.aio import BrokerClient
from ..guarded_site import ConnectionLimits, GuardedSite
from .exec_credential import check_api_version
from .keeper import CredentialKeeper
from .metrics import AgentMetrics

log = logging.getLogger("keyless.agent")


def parse_listen(value: str) -> tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT or :PORT (all interfaces)."""
    host, _, port = value.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def health_app(keeper: CredentialKeeper, metrics: AgentMetrics) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        if keeper.alive():
            return web.Response(text="ok\n")
        return web.Response(status=500, text="the target list loop stopped\n")

    async def readyz(_: web.Request) -> web.Response:
        ready, message = keeper.readiness()
        return web.Response(status=200 if ready else 503, text=message + "\n")

    async def prometheus(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", prometheus)
    return app


async def serve(args: argparse.Namespace) -> None:
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    metrics = AgentMetrics()
    broker = BrokerClient(args.broker_url, args.broker_ca_file, args.token_file, user_agent="keyless-agent")
    keeper = CredentialKeeper(broker, directory, args.exec_api_version, metrics,
                              targets_poll_seconds=args.targets_poll_seconds)
    runner = web.AppRunner(health_app(keeper, metrics), access_log=None)
    await runner.setup()
    host, port = parse_listen(args.health_listen)
    # Probes and scrapes only: a few connections, short heads, quick answers.
    await GuardedSite(runner, host, port, limits=ConnectionLimits(max_connections=32, max_head_bytes=8192,
                                                                  request_timeout=10.0)).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("keeping credentials for %s in %s (health on %s:%d)", args.broker_url, directory, host, port)
    try:
        await keeper.run(stop)
    finally:
        await broker.close()
        await runner.cleanup()
    # Files are left in place on shutdown: a restarted sidecar keeps serving the still-valid ones.


def run_agent(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(args, "log_level", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        check_api_version(args.exec_api_version)
        parse_listen(args.health_listen)
    except ValueError as e:
        print(f"keyless agent: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(args))
    except (OSError, ssl.SSLError) as e:
        print(f"keyless agent: {e}", file=sys.stderr)
        return 1
    return 0
