"""The `keyless` command and its subcommands; each delegates to its component's module."""
from __future__ import annotations

import argparse
import sys


def _not_yet(name: str):
    def run(args: argparse.Namespace) -> int:
        print(f"keyless {name}: not yet implemented", file=sys.stderr)
        return 2
    return run


def _configure_agent(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker-url", required=True, help="https URL of the broker")
    p.add_argument("--broker-ca-file", required=True, help="PEM bundle that signs the broker's serving certificate")
    p.add_argument("--token-file", required=True,
                   help="projected ServiceAccount token (audience keyless-broker); re-read on every request")
    p.add_argument("--dir", required=True, help="where to keep <target>.json (memory-backed, shared with Argo CD)")
    p.add_argument("--exec-api-version", default="client.authentication.k8s.io/v1",
                   choices=["client.authentication.k8s.io/v1", "client.authentication.k8s.io/v1beta1"],
                   help="apiVersion written into the files; must equal the exec config's apiVersion")
    p.add_argument("--health-listen", default="0.0.0.0:8091", metavar="HOST:PORT",
                   help="/healthz, /readyz and /metrics (default %(default)s)")
    p.add_argument("--targets-poll-seconds", type=float, default=15.0,
                   help="how often to re-list the targets this agent may use (default %(default)s)")

    def run(args: argparse.Namespace) -> int:
        from keyless.agent.main import run_agent
        return run_agent(args)
    p.set_defaults(run=run)


def _configure_token(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker-url", required=True, help="https URL of the broker")
    p.add_argument("--target", required=True, help="broker target name (<namespace>.<RemoteTenantCluster name>)")
    p.add_argument("--broker-ca-file", help="PEM bundle that signs the broker's serving certificate")
    p.add_argument("--token-file", help="projected ServiceAccount token with audience keyless-broker "
                                        "(default $KEYLESS_TOKEN_FILE, then /var/run/secrets/keyless.dev/broker/token)")

    def run(args: argparse.Namespace) -> int:
        from keyless import tokencmd
        return tokencmd.run(args.broker_url, args.target, args.broker_ca_file, args.token_file)
    p.set_defaults(run=run)


def _configure_broker(p: argparse.ArgumentParser) -> None:
    from keyless.broker import main as broker_main
    broker_main.add_arguments(p)
    p.set_defaults(run=broker_main.run)


def _configure_operator(p: argparse.ArgumentParser) -> None:
    from keyless import operator_main
    operator_main.add_arguments(p)


def _configure_render(p: argparse.ArgumentParser) -> None:
    from keyless import render_main
    render_main.add_arguments(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keyless",
        description="Argo CD to tenant clusters with 60-second tokens instead of long-lived credentials.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands = {
        "operator": "run the RemoteTenantCluster operator (kopf)",
        "broker": "run the token broker (OIDC issuer, token minting behind TokenReview)",
        "agent": "keep ExecCredential files fresh for Argo CD (sidecar)",
        "token": "print an ExecCredential for one target (kubectl exec plugin)",
        "render": "print every object the operator would create for a manifest",
    }
    for name, help_text in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(run=_not_yet(name))
    _configure_operator(sub.choices["operator"])
    _configure_render(sub.choices["render"])
    _configure_broker(sub.choices["broker"])
    _configure_agent(sub.choices["agent"])
    _configure_token(sub.choices["token"])
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["token"]:
        # Hot path (kubectl runs it on every token refresh): build only this subcommand's parser,
        # so no other subcommand's imports are paid for.
        token_parser = argparse.ArgumentParser(prog="keyless token", description="print an ExecCredential "
                                               "for one target (kubectl exec plugin)")
        _configure_token(token_parser)
        args = token_parser.parse_args(argv[1:])
        return args.run(args) or 0
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
