"""`keyless broker`: wires the key store, target registry, reviewer and HTTP app, and serves HTTPS."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import ssl
import sys
from urllib.parse import urlsplit

from aiohttp import web

from ..kube.client import Kube, KubeConfig
from ..model.names import DEFAULT_CALLER_AUDIENCE
from .app import DEFAULT_OPERATOR_IDENTITY, Broker, BrokerSettings
from .audit import AuditLog
from .keys import KeyStore, RotationPolicy
from .ratelimit import RateLimiter
from .review import CallerReviewer
from .signing import ALGORITHMS
from .targets import TargetRegistry

log = logging.getLogger("keyless.broker")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--issuer", required=True, help="the issuer URL (https); tokens' iss and discovery use it verbatim")
    parser.add_argument("--listen", default="0.0.0.0:8443", help="HOST:PORT to serve HTTPS on")
    parser.add_argument("--tls-cert-file", required=True)
    parser.add_argument("--tls-key-file", required=True)
    parser.add_argument("--namespace", default="keyless-system", help="where BrokerTargets, the key Secret and Lease live")
    parser.add_argument("--kubeconfig", default=None, help="default: $KUBECONFIG, then in-cluster")
    parser.add_argument("--caller-audience", default=DEFAULT_CALLER_AUDIENCE,
                        help="audience the callers' ServiceAccount tokens must carry")
    parser.add_argument("--operator-identity", default=DEFAULT_OPERATOR_IDENTITY,
                        help="username allowed to get tokens for every target")
    parser.add_argument("--signing-algorithm", choices=ALGORITHMS, default="ES256")
    parser.add_argument("--key-rotation-seconds", type=float, default=86400.0)
    parser.add_argument("--key-prepublish-seconds", type=float, default=3600.0,
                        help="how long a new key is in the JWKS before it signs (capped at the rotation period)")
    parser.add_argument("--max-token-ttl-seconds", type=int, default=3600,
                        help="longest token lifetime; keys stay published this long after they last signed")
    parser.add_argument("--clock-skew-seconds", type=float, default=30.0)
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
    parser.add_argument("--review-rate-limit-burst", type=float, default=50.0)
    parser.add_argument("--log-level", default="INFO")


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


async def serve(args: argparse.Namespace) -> None:
    kube = Kube(KubeConfig.default(args.kubeconfig), user_agent="keyless-broker")
    policy = RotationPolicy(algorithm=args.signing_algorithm, rotation_seconds=args.key_rotation_seconds,
                            prepublish_seconds=args.key_prepublish_seconds,
                            max_token_ttl_seconds=args.max_token_ttl_seconds,
                            clock_skew_seconds=args.clock_skew_seconds)
    keys = KeyStore(kube, args.namespace, policy, lease_seconds=args.key_writer_lease_seconds)
    targets = TargetRegistry(kube, args.namespace)
    reviewer = CallerReviewer(kube, args.caller_audience, cache_seconds=args.review_cache_seconds,
                              miss_limiter=RateLimiter(args.review_rate_limit_per_second, args.review_rate_limit_burst))
    audit = AuditLog(sys.stdout)
    settings = BrokerSettings(issuer=args.issuer, namespace=args.namespace, caller_audience=args.caller_audience,
                              operator_identity=args.operator_identity,
                              max_token_ttl_seconds=args.max_token_ttl_seconds)
    broker = Broker(settings, keys, targets, reviewer, RateLimiter(args.rate_limit_per_second, args.rate_limit_burst),
                    audit)
    tls = _ReloadingTLS(args.tls_cert_file, args.tls_key_file)
    host, _, port = args.listen.rpartition(":")
    runner = web.AppRunner(broker.application(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host.strip("[]"), int(port), ssl_context=tls.context, backlog=1024)
    tasks = [asyncio.create_task(t, name=n) for n, t in (
        ("keys", keys.run()), ("targets", targets.run()), ("audit", audit.run()), ("tls", tls.run()))]
    await site.start()
    log.info("broker serving on https://%s (issuer %s, namespace %s, %s)", args.listen, args.issuer,
             args.namespace, args.signing_algorithm)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    done_task = asyncio.create_task(stop.wait())
    finished, _ = await asyncio.wait([done_task, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for task in finished:
        if task is not done_task and task.exception():
            log.error("%s stopped: %r", task.get_name(), task.exception())
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await runner.cleanup()
    audit.flush()
    await kube.close()


def run(args: argparse.Namespace) -> int:
    problem = _validate(args)
    if problem:
        print(f"keyless broker: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args))
    return 0
