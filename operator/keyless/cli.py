"""The `keyless` command and its subcommands; each delegates to its component's module."""
from __future__ import annotations

import argparse
import sys

from . import __version__

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default: argparse's "(default: X)" unless the help already says
    what the default is; an unset default, a switch or an empty repeatable flag reads as such. Descriptions
    and epilogs are printed as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.required or action.default is argparse.SUPPRESS \
                or not action.option_strings:
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return f"{text} (default: {'on' if action.default else 'off'})"
        if action.default is None:
            return f"{text} (default: unset)"
        if action.default == [] or action.default == "":
            return f"{text} (default: none)"
        return f"{text} (default: %(default)s)"


def add_log_level(p: argparse.ArgumentParser) -> None:
    """The one log-level flag every long-running command takes."""
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                   help="least severe log level printed")


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
    add_log_level(p)

    def run(args: argparse.Namespace) -> int:
        from keyless.agent.main import run_agent
        return run_agent(args)
    p.set_defaults(run=run)


def _configure_token(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker-url", required=True, help="https URL of the broker")
    p.add_argument("--target", help="broker target name (<namespace>.<RemoteTenantCluster name>); default "
                                     "$KEYLESS_TARGET, then the target a Keyless ClusterProfile passes in the "
                                     "exec cluster info (provideClusterInfo: true)")
    p.add_argument("--broker-ca-file", help="PEM bundle that signs the broker's serving certificate "
                                            "(default: the system trust store)")
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


def _configure_doctor(p: argparse.ArgumentParser) -> None:
    from keyless import doctor

    doctor.add_arguments(p)


def _configure_webhooks(p: argparse.ArgumentParser) -> None:
    from keyless.webhooks import __main__ as webhooks_main

    webhooks_main.add_arguments(p)


def _configure_render(p: argparse.ArgumentParser) -> None:
    from keyless import render_main
    render_main.add_arguments(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keyless",
        description="Argo CD to tenant clusters with 60-second tokens instead of long-lived credentials.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"keyless {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands = {
        "operator": "run the RemoteTenantCluster operator (kopf)",
        "broker": "run the token broker (OIDC issuer, token minting behind TokenReview)",
        "agent": "keep ExecCredential files fresh for Argo CD (sidecar)",
        "token": "print an ExecCredential for one target (kubectl exec plugin)",
        "render": "print every object the operator would create for a manifest",
        "webhooks": "serve the tenant guardrail admission webhooks (the chart's keyless-webhooks Deployment)",
        "doctor": "walk one cluster's chain and say what works and what to fix (also `kubectl keyless doctor`)",
    }
    for name, help_text in commands.items():
        sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
    _configure_operator(sub.choices["operator"])
    _configure_render(sub.choices["render"])
    _configure_broker(sub.choices["broker"])
    _configure_agent(sub.choices["agent"])
    _configure_token(sub.choices["token"])
    _configure_webhooks(sub.choices["webhooks"])
    _configure_doctor(sub.choices["doctor"])
    for command in sub.choices.values():
        # A subcommand may ask for raw descriptions (render's epilog); this formatter keeps them raw too.
        if issubclass(HelpFormatter, command.formatter_class):
            command.formatter_class = HelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--version"]:
        print(f"keyless {__version__}")
        return 0
    if argv[:1] == ["token"]:
        # Hot path (kubectl runs it on every token refresh): build only this subcommand's parser,
        # so no other subcommand's imports are paid for.
        token_parser = argparse.ArgumentParser(prog="keyless token", description="print an ExecCredential "
                                               "for one target (kubectl exec plugin)", formatter_class=HelpFormatter)
        _configure_token(token_parser)
        args = token_parser.parse_args(argv[1:])
        return args.run(args) or 0
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
