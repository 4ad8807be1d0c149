"""`keyless broker`: wires the key store, target registry, reviewer and HTTP app, and serves HTTPS."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import ssl
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web

from ..guarded_site import ConnectionLimits, GuardedSite
from ..kube.client import Kube, KubeConfig
from ..model.names import DEFAULT_CALLER_AUDIENCE
from .app import DEFAULT_OPERATOR_IDENTITY, Broker, BrokerSettings
from .audit import AuditLog
from .keys import KeyStore, RotationPolicy
from .ratelimit import RateLimiter
from .review import CallerReviewer
from .signing import ALGORITHMS
from .targets import TargetRegistry
from .workers import SharedMetrics, WorkerPool, WorkerRole

log = logging.getLogger("keyless.broker")

# A request head: the bearer token (at most review.MAX_TOKEN_LENGTH) and a few short headers.
MAX_HEAD_BYTES = 24 * 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--issuer", required=True, help="the issuer URL (https); tokens' iss and discovery use it verbatim")
    parser.add_argument("--listen", default="0.0.0.0:8443", metavar="HOST:PORT",
                        help="the public listener (HTTPS): discovery, JWKS, token minting, /healthz, /readyz")
    parser.add_argument("--tls-cert-file", required=True, help="serving certificate (reloaded when the file changes)")
    parser.add_argument("--tls-key-file", required=True, help="the serving certificate's private key")
    parser.add_argument("--namespace", default="keyless-system", help="where BrokerTargets, the key Secret and Lease live")
    parser.add_argument("--kubeconfig", default=None,
                        help="kubeconfig of the control plane (default: $KUBECONFIG, then in-cluster)")
    parser.add_argument("--caller-audience", default=DEFAULT_CALLER_AUDIENCE,
                        help="audience the callers' ServiceAccount tokens must carry")
    parser.add_argument("--operator-identity", default=DEFAULT_OPERATOR_IDENTITY,
                        help="username allowed to get tokens for every target")
    parser.add_argument("--signing-algorithm", choices=ALGORITHMS, default="ES256",
                        help="algorithm of new signing keys")
    parser.add_argument("--key-rotation-seconds", type=float, default=86400.0,
                        help="how long a key signs before the next one takes over")
    parser.add_argument("--key-prepublish-seconds", type=float, default=3600.0,
                        help="how long a new key is in the JWKS before it signs (capped at the rotation period)")
    parser.add_argument("--max-token-ttl-seconds", type=int, default=3600,
                        help="longest token lifetime; keys stay published this long after they last signed")
    parser.add_argument("--clock-skew-seconds", type=float, default=30.0,
                        help="tolerated clock difference between the broker and token verifiers")
    parser.add_argument("--key-writer-lease-seconds", type=int, default=15,
                        help="how long the key writer's Lease lasts without renewal (another replica then takes over)")
    parser.add_argument("--review-cache-seconds", type=float, default=5.0,
                        help="how long a positive TokenReview is reused (never past the caller token's expiry)")
    # One caller (the application controller's agent) holds tokens for every cluster: 1,000 clusters
    # refreshed at half of a 60 s TTL is ~33 tokens/s, and all of them at once when the agent starts.
    parser.add_argument("--rate-limit-per-second", type=float, default=100.0,
                        help="sustained token requests per caller identity")
    parser.add_argument("--rate-limit-burst", type=float, default=1000.0,
                        help="token requests a caller may make at once (e.g. an agent starting with all its targets)")
    parser.add_argument("--review-rate-limit-per-second", type=float, default=20.0,
                        help="TokenReviews (cache misses) per remote address")
    parser.add_argument("--review-rate-limit-burst", type=float, default=50.0,
                        help="burst of the TokenReview rate limit")
    # Unauthenticated clients can open connections: these bound what they cost (guarded_site.py).
    parser.add_argument("--max-connections", type=int, default=256,
                        help="open connections at most; one more evicts the longest-waiting (default %(default)s)")
    parser.add_argument("--request-head-timeout-seconds", type=float, default=10.0,
                        help="a request head (and the TLS handshake) must arrive within this (default %(default)s)")
    parser.add_argument("--idle-timeout-seconds", type=float, default=30.0,
                        help="an idle keep-alive connection is closed after this (default %(default)s)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes serving --listen together (SO_REUSEPORT), one per core to use; they share "
                             "the keys, divide the rate limits and add up their metrics (default %(default)s)")
    parser.add_argument("--metrics-listen", default="", metavar="HOST:PORT",
                        help="a separate plain-HTTP listener for /metrics and /openapi.json, never served on "
                             "--listen (the public issuer) (default: off)")
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="least severe log level printed")


def _validate(args: argparse.Namespace) -> str | None:
    if urlsplit(args.issuer).scheme != "https":
        return "--issuer must be an https URL (Kubernetes and kube-oidc-proxy accept nothing else)"
    if urlsplit(args.issuer).query or urlsplit(args.issuer).fragment:
        return "--issuer must not have a query or fragment"
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        return "--listen must be HOST:PORT"
    for flag in ("tls_cert_file", "tls_key_file"):
        if not os.access(getattr(args, flag), os.R_OK):
            return f"--{flag.replace('_', '-')} {getattr(args, flag)} is not readable"
    if args.key_rotation_seconds <= 0 or args.key_prepublish_seconds < 0 or args.max_token_ttl_seconds < 1:
        return "rotation, pre-publication and TTL must be positive"
    if args.max_connections < 1 or args.request_head_timeout_seconds <= 0 or args.idle_timeout_seconds <= 0:
        return "--max-connections and the timeouts must be positive"
    if args.metrics_listen:
        metrics_host, _, metrics_port = args.metrics_listen.rpartition(":")
        if not metrics_host or not metrics_port.isdigit():
            return "--metrics-listen must be HOST:PORT"
        if args.metrics_listen == args.listen:
            return "--metrics-listen must differ from --listen"
    if not 1 <= args.workers <= 64:
        return "--workers must be between 1 and 64"
    return None


class _ReloadingTLS:
    """Serving certificate that follows its files (cert-manager renews them in place)."""

    def __init__(self, cert_file: str, key_file: str):
        self.cert_file, self.key_file = cert_file, key_file
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._stamp = None
        self.reload()

    def _mtimes(self):
        return (os.stat(self.cert_file).st_mtime_ns, os.stat(self.key_file).st_mtime_ns)

    def reload(self) -> None:
        stamp = self._mtimes()
        if stamp != self._stamp:
            self.context.load_cert_chain(self.cert_file, self.key_file)
            self._stamp = stamp

    async def run(self, every: float = 15.0) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                self.reload()
            except (OSError, ssl.SSLError) as e:
                log.warning("serving certificate not reloaded: %s", e)


async def serve(args: argparse.Namespace, role: WorkerRole = WorkerRole()) -> None:
    """One broker process: the only one, or worker `role.index` of `role.count` on a shared port."""
    kube = Kube(KubeConfig.default(args.kubeconfig), user_agent="keyless-broker")
    policy = RotationPolicy(algorithm=args.signing_algorithm, rotation_seconds=args.key_rotation_seconds,
                            prepublish_seconds=args.key_prepublish_seconds,
                            max_token_ttl_seconds=args.max_token_ttl_seconds,
                            clock_skew_seconds=args.clock_skew_seconds)
    keys = KeyStore(kube, args.namespace, policy, lease_seconds=args.key_writer_lease_seconds,
                    writer=role.writes_keys)
    targets = TargetRegistry(kube, args.namespace)
    # Each worker enforces its share of every limit: together they allow the limit, never N times it.
    reviewer = CallerReviewer(kube, args.caller_audience, cache_seconds=args.review_cache_seconds,
                              miss_limiter=RateLimiter(role.share(args.review_rate_limit_per_second),
                                                       max(1.0, role.share(args.review_rate_limit_burst))))
    audit = AuditLog(sys.stdout)
    settings = BrokerSettings(issuer=args.issuer, namespace=args.namespace, caller_audience=args.caller_audience,
                              operator_identity=args.operator_identity,
                              max_token_ttl_seconds=args.max_token_ttl_seconds)
    broker = Broker(settings, keys, targets, reviewer,
                    RateLimiter(role.share(args.rate_limit_per_second), max(1.0, role.share(args.rate_limit_burst))),
                    audit)
    background = [("keys", keys.run()), ("targets", targets.run()), ("audit", audit.run())]
    pool = None
    if role.shared_port:
        shared = SharedMetrics(role, broker.metrics.registry)
        broker.render_metrics = shared.render
        background.append(("metrics snapshots", shared.run()))
        if role.index == 0:
            pool = WorkerPool(role, _plain_values(args))
            background.append(("workers", pool.run()))
    tls = _ReloadingTLS(args.tls_cert_file, args.tls_key_file)
    host, _, port = args.listen.rpartition(":")
    runner = web.AppRunner(broker.application(), access_log=None, handle_signals=False)
    await runner.setup()
    limits = ConnectionLimits(max_connections=args.max_connections, head_timeout=args.request_head_timeout_seconds,
                              idle_timeout=args.idle_timeout_seconds, request_timeout=30.0,
                              max_head_bytes=MAX_HEAD_BYTES)
    site = GuardedSite(runner, host.strip("[]"), int(port), ssl_context=tls.context, backlog=1024, limits=limits,
                       reuse_port=role.shared_port or None)
    internal = None
    if args.metrics_listen and role.index == 0:
        # One metrics listener per pod (worker 0's: with several workers it shows the pod's sum), plain
        # HTTP and apart from the public issuer: /metrics and /openapi.json name every target.
        internal = web.AppRunner(broker.internal_application(), access_log=None, handle_signals=False)
        await internal.setup()
        metrics_host, _, metrics_port = args.metrics_listen.rpartition(":")
        await GuardedSite(internal, metrics_host.strip("[]"), int(metrics_port),
                          limits=ConnectionLimits(max_connections=32, max_head_bytes=8192,
                                                  request_timeout=10.0)).start()
    tasks = [asyncio.create_task(t, name=n) for n, t in (*background, ("tls", tls.run()))]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    done_task = asyncio.create_task(stop.wait())
    if role.index > 0:
        # Worker 0 answers probes from the start; a later worker (or one restarted) takes connections only
        # once it can mint, so no caller meets a worker that is still loading.
        await asyncio.wait([done_task, asyncio.create_task(_loaded(keys, targets)), *tasks],
                           return_when=asyncio.FIRST_COMPLETED)
    if not stop.is_set():
        await site.start()
        log.info("broker serving on https://%s (issuer %s, namespace %s, %s%s)", args.listen, args.issuer,
                 args.namespace, args.signing_algorithm,
                 f", worker {role.index} of {role.count}" if role.shared_port else "")
        finished, _ = await asyncio.wait([done_task, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in finished:
            if task is not done_task and task.exception():
                log.error("%s stopped: %r", task.get_name(), task.exception())
    if pool is not None:
        await pool.stop()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await runner.cleanup()
    if internal is not None:
        await internal.cleanup()
    audit.flush()
    await kube.close()


async def _loaded(keys: KeyStore, targets: TargetRegistry) -> None:
    await keys.loaded.wait()
    await targets.synced.wait()


def _plain_values(args: argparse.Namespace) -> dict:
    """The parsed arguments a worker needs (not the subcommand's function)."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run(args: argparse.Namespace) -> int:
    problem = _validate(args)
    if problem:
        print(f"keyless broker: {problem}", file=sys.stderr)
        return 2
    _configure_logging(args.log_level)
    if args.workers == 1:
        asyncio.run(serve(args))
        return 0
    directory = Path(tempfile.mkdtemp(prefix="keyless-broker-workers-"))
    try:
        asyncio.run(serve(args, WorkerRole(0, args.workers, directory)))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


def run_worker(args: argparse.Namespace, role: WorkerRole) -> int:
    """Workers 1..N-1 (see workers.py): the same broker, started by worker 0."""
    _configure_logging(args.log_level)
    asyncio.run(serve(args, role))
    return 0
