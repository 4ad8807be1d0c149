"""`python -m keyless.webhooks`: the guardrail webhooks alone in a kopf operator (tests, benchmarks,
or running them apart from `keyless operator`)."""
from __future__ import annotations

import argparse
import logging
import os
import sys

import kopf

from . import handlers, policy


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m keyless.webhooks", description=__doc__)
    parser.add_argument("--kubeconfig", help="default: $KUBECONFIG, else in-cluster")
    parser.add_argument("--listen", default="0.0.0.0:9443", help="HOST:PORT (default 0.0.0.0:9443)")
    parser.add_argument("--tls-cert-file", required=True)
    parser.add_argument("--tls-key-file", required=True)
    parser.add_argument("--cert-check-interval", type=float, default=10.0,
                        help="seconds between checks of the certificate files (default 10)")
    parser.add_argument("--admin-user", action="append", default=[], help="exempt user (repeatable)")
    parser.add_argument("--admin-group", action="append", default=None,
                        help=f"exempt group (repeatable; default {', '.join(policy.DEFAULT_ADMIN_GROUPS)})")
    parser.add_argument("--argocd-namespace", action="append", default=None,
                        help="namespace of an Argo CD whose controllers are exempt (repeatable; default argocd)")
    parser.add_argument("--environment-label", default=policy.DEFAULT_ENVIRONMENT_LABEL)
    parser.add_argument("--verbose", action="store_true", help="log every admission handler call")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.verbose:
        logging.getLogger("keyless.webhooks").setLevel(logging.DEBUG)  # every decision, not only refusals
    else:
        # kopf logs each handler call per object; at hundreds of reviews a second that is noise.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)

    @kopf.on.startup()
    async def configure(settings: kopf.OperatorSettings, **_) -> None:
        settings.posting.enabled = False
        handlers.configure_admission(
            settings, listen_host=host.strip("[]") or "0.0.0.0", port=int(port),
            cert_file=args.tls_cert_file, key_file=args.tls_key_file, kubeconfig=args.kubeconfig,
            admin_users=args.admin_user,
            admin_groups=policy.DEFAULT_ADMIN_GROUPS if args.admin_group is None else args.admin_group,
            argocd_namespaces=args.argocd_namespace or ["argocd"],
            environment_label=args.environment_label, cert_check_interval=args.cert_check_interval,
        )

    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig

        @kopf.on.login()
        def login(**kwargs):
            # kopf's default login goes through the kubernetes library, which read $KUBECONFIG at import.
            return kopf.login_with_kubeconfig(**kwargs)

    kopf.run(clusterwide=True, standalone=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
