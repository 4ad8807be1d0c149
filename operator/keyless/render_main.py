"""`keyless render -f FILE`: print every object the operator would create, as a YAML stream."""
from __future__ import annotations

import argparse
import sys

import yaml


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--filename", required=True, help="manifest file with RemoteTenantClusters ('-' for stdin)")
    p.add_argument("--broker-namespace", default="keyless-system")
    p.add_argument("--broker-issuer", default="https://keyless-broker.keyless-system.svc")
    p.add_argument("--exec-mode", choices=["agent", "token"], default="agent")
    p.add_argument("--credential-dir", default="/var/run/keyless/credentials")
    p.add_argument("--broker-ca-file", help="the broker's CA, which the tenant side must trust (placeholder if unset)")
    p.add_argument("--signing-algorithm", choices=["ES256", "RS256"], default="ES256")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from .model.spec import SpecError
    from .render.argocd import ExecSettings
    from .render.everything import render_manifests
    from .settings import OperatorSettings

    settings = OperatorSettings(
        broker_namespace=args.broker_namespace, broker_issuer=args.broker_issuer,
        signing_algorithm=args.signing_algorithm,
        exec=ExecSettings(mode=args.exec_mode, credential_dir=args.credential_dir, broker_url=args.broker_issuer),
    )
    try:
        stream = sys.stdin if args.filename == "-" else open(args.filename)
        with stream:
            documents = list(yaml.safe_load_all(stream))
        ca = open(args.broker_ca_file, "rb").read() if args.broker_ca_file else None
        objects = render_manifests(documents, settings, ca)
    except KeyError as e:
        print(f"keyless render: a RemoteTenantCluster lacks the required field {e.args[0]!r} "
              f"(see `kubectl explain rtc.spec`)", file=sys.stderr)
        return 1
    except (OSError, yaml.YAMLError, SpecError, ValueError) as e:
        print(f"keyless render: {e.__class__.__name__}: {e}", file=sys.stderr)
        return 1
    yaml.safe_dump_all(objects, sys.stdout, sort_keys=False)
    return 0
