"""The `keyless` command and its subcommands; each delegates to its component's module."""
from __future__ import annotations

import argparse
import sys


def _not_yet(name: str):
    def run(args: argparse.Namespace) -> int:
        print(f"keyless {name}: not yet implemented", file=sys.stderr)
        return 2
    return run


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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
