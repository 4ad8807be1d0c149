"""`keyless webhooks` (also `python -m keyless.webhooks`): the guardrail webhooks alone in a kopf operator,
as the chart's keyless-webhooks Deployment runs them (and tests, benchmarks)."""
from __future__ import annotations

import argparse
import logging
import sys

from . import policy


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kubeconfig", help="kubeconfig of the control plane (default $KUBECONFIG, else in-cluster)")
    parser.add_argument("--listen", default="0.0.0.0:9443", metavar="HOST:PORT",
                        help="where to serve the admission webhooks over HTTPS (default %(default)s)")
    parser.add_argument("--tls-cert-file", required=True, help="serving certificate (reloaded when the file changes)")
    parser.add_argument("--tls-key-file", required=True, help="the serving certificate's private key")
    parser.add_argument("--cert-check-interval", type=float, default=10.0,
                        help="seconds between checks of the certificate files (default %(default)s)")
    parser.add_argument("--admin-user", action="append", default=[],
                        help="exempt user (repeatable; default none)")
    parser.add_argument("--admin-group", action="append", default=None,
                        help=f"exempt group (repeatable; default {', '.join(policy.DEFAULT_ADMIN_GROUPS)})")
    parser.add_argument("--argocd-namespace", action="append", default=None,
                        help="namespace of an Argo CD whose controllers are exempt (repeatable; default argocd)")
    parser.add_argument("--environment-label", default=policy.DEFAULT_ENVIRONMENT_LABEL,
                        help="the Namespace label that names a namespace's environment (default %(default)s)")
    parser.add_argument("--metrics-listen", default="", metavar="HOST:PORT",
                        help="serve Prometheus metrics (decisions by kind and reason) here (default: off)")
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="least severe log level printed; DEBUG logs every admission handler call "
                             "(default %(default)s)")
    parser.set_defaults(run=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m keyless.webhooks", description=__doc__)
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


def run(args: argparse.Namespace) -> int:
    # Imported here: importing the handlers registers them with kopf, which only this command runs.
    import kopf

    from ..kube.login import kopf_connection_info
    from . import handlers

    host, _, port = args.listen.rpartition(":")
    logging.basicConfig(level=logging.INFO if args.log_level == "DEBUG" else args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level == "DEBUG":
        logging.getLogger("keyless.webhooks").setLevel(logging.DEBUG)  # every decision, not only refusals
    else:
        # kopf logs each handler call per object; at hundreds of reviews a second that is noise.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)

    if args.metrics_listen:
        from prometheus_client import start_http_server

        metrics_host, _, metrics_port = args.metrics_listen.rpartition(":")
        start_http_server(int(metrics_port), addr=metrics_host.strip("[]") or "0.0.0.0")

    @kopf.on.startup()
    async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
        settings.posting.enabled = False
        handlers.configure_admission(
            settings, memo, listen_host=host.strip("[]") or "0.0.0.0", port=int(port),
            cert_file=args.tls_cert_file, key_file=args.tls_key_file, kubeconfig=args.kubeconfig,
            admin_users=args.admin_user,
            admin_groups=policy.DEFAULT_ADMIN_GROUPS if args.admin_group is None else args.admin_group,
            argocd_namespaces=args.argocd_namespace or ["argocd"],
            environment_label=args.environment_label, cert_check_interval=args.cert_check_interval,
        )

    @kopf.on.login()
    def login(**_) -> kopf.ConnectionInfo:
        # The operator's own login: kubeconfig, then in-cluster (kopf's default would use the kubernetes
        # library, which is not a runtime dependency).
        return kopf_connection_info(args.kubeconfig)

    kopf.run(clusterwide=True, standalone=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
