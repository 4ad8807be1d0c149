"""`keyless render -f FILE`: check RemoteTenantClusters as the API server would, then print every object the
operator would create for them, as a YAML stream a reviewer can read.

It takes the operator's own settings flags (settings.add_arguments) and builds the same OperatorSettings
from them, so `keyless render` with the operator's flags prints exactly what that operator applies.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import sys

import yaml

CHECKS = """\
Checks, before anything is printed (any failure: the problems on stderr, nothing on stdout, exit 1):
  the CRD's own OpenAPI schema (types, required fields, enums, unknown fields, limits, patterns, formats)
  and its x-kubernetes-validations CEL rules, read from the CRD the cluster gets; the tenancy admission
  policy's rules (policies/remotetenantcluster-tenancy.yaml); the operator's own checks of the spec.
What render cannot know, and so does not check: rules about changes (oldSelf: render sees a create), the
Namespace's keyless.dev/tenant label unless the Namespace is in the input (then it is checked), and
claims of other objects in the cluster (a server or Argo CD name another manifest registered first).
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from . import settings
    from .render.everything import DESTINATIONS

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = CHECKS
    p.add_argument("-f", "--filename", required=True, action="append",
                   help="manifest file with RemoteTenantClusters ('-' for stdin); may be repeated")
    p.add_argument("-n", "--namespace", default=None,
                   help="namespace of the manifests that set none, as `kubectl apply -n` would use (without it, "
                        "a manifest without metadata.namespace is an error)")
    p.add_argument("--only", action="append", choices=DESTINATIONS, default=None,
                   help="print only the objects for this destination (may be repeated): control-plane (the "
                        "cluster of Keyless and Argo CD; pipe to kubectl apply -f -), tenant (what the operator "
                        "installs on a Managed tenant), api-server-file (Direct mode: the tenant API server's "
                        "--authentication-config file, not an object)")
    settings.add_arguments(p)
    p.set_defaults(run=run)


class _Failed(Exception):
    pass


def _read(filename: str) -> list:
    label = "stdin" if filename == "-" else filename
    try:
        if filename == "-":
            return list(yaml.safe_load_all(sys.stdin))
        with open(filename) as stream:
            return list(yaml.safe_load_all(stream))
    except OSError as e:
        raise _Failed(f"{label}: cannot read it: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        where = ""
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(e, "problem", None) or str(e)
        raise _Failed(f"{label}: not valid YAML{where}: {problem}") from None


def _is_cluster(doc: dict) -> bool:
    return doc.get("kind") == "RemoteTenantCluster"


def _collect(args: argparse.Namespace) -> tuple[list[tuple[str, dict]], dict[str, dict], list[str]]:
    """(source, manifest) of every RemoteTenantCluster, the Namespaces in the input, and the problems."""
    clusters: list[tuple[str, dict]] = []
    namespaces: dict[str, dict] = {}
    problems: list[str] = []
    for filename in args.filename:
        label = "stdin" if filename == "-" else filename
        found = 0
        for index, doc in enumerate(_read(filename), start=1):
            source = f"{label}#{index}"
            if doc is None:
                continue
            if not isinstance(doc, dict):
                what = "a list" if isinstance(doc, list) else f"the scalar {str(doc)[:40]!r}"
                problems.append(f"{source}: a document must be a YAML mapping (an object), not {what}")
                continue
            if doc.get("kind") == "Namespace" and doc.get("apiVersion") == "v1":
                name = (doc.get("metadata") or {}).get("name")
                if isinstance(name, str):
                    namespaces[name] = doc
            if not _is_cluster(doc):
                continue
            found += 1
            meta = doc.get("metadata")
            if isinstance(meta, dict):
                namespace = meta.get("namespace")
                who = f"{namespace or '(no namespace)'}/{meta.get('name') or '(no name)'}"
                if not namespace and args.namespace:
                    doc = {**doc, "metadata": {**meta, "namespace": args.namespace}}
                elif not namespace:
                    problems.append(f"{source} {who} metadata.namespace: not set, and keyless render cannot know "
                                    f"which namespace kubectl would use: set it, or pass --namespace")
                    continue
                elif args.namespace and namespace != args.namespace:
                    problems.append(f"{source} {who} metadata.namespace: {namespace!r} differs from --namespace "
                                    f"{args.namespace!r} (kubectl apply refuses that too)")
                    continue
            clusters.append((source, doc))
        if not found and not problems:
            problems.append(f"{label}: no RemoteTenantCluster in it (kind: RemoteTenantCluster, apiVersion: "
                            f"keyless.dev/v1alpha1): nothing to check or render")
    return clusters, namespaces, problems


def _who(doc: dict) -> str:
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    return f"{meta.get('namespace') or '(no namespace)'}/{meta.get('name') or '(no name)'}"


def _readable(obj: dict) -> dict:
    """A Secret whose values are text, with `stringData` instead of base64 `data` (kubectl apply stores
    the same bytes)."""
    if obj.get("kind") != "Secret" or obj.get("apiVersion") != "v1" or not obj.get("data"):
        return obj
    try:
        text = {k: base64.b64decode(v, validate=True).decode("utf-8") for k, v in obj["data"].items()}
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return obj
    return {("stringData" if k == "data" else k): (text if k == "data" else v) for k, v in obj.items()}


def _header(destination: str, cluster, source: str) -> str:
    from .render.everything import API_SERVER_FILE, CONTROL_PLANE

    if destination == CONTROL_PLANE:
        where = "the control plane, the cluster where Keyless and Argo CD run"
    elif destination == API_SERVER_FILE:
        where = ("a file of the tenant API server, not a Kubernetes object: kube-apiserver "
                 "--authentication-config (Direct mode)")
    else:
        where = ("the tenant cluster, where the operator installs it with the bootstrap kubeconfig (Managed "
                 "mode; certificates are issued at install time)")
    return f"# goes to {where} (--only {destination})\n# for {cluster.namespace}/{cluster.name} ({source})\n"


def run(args: argparse.Namespace) -> int:
    from . import settings
    from .model.spec import SpecError, parse
    from .render.everything import render_clusters
    from .render.validate import validate

    def fail(lines: list[str]) -> int:
        for line in lines:
            print(f"keyless render: {line}", file=sys.stderr)
        print(f"keyless render: {len(lines)} problem(s); nothing rendered", file=sys.stderr)
        return 1

    try:
        documents, namespaces, problems = _collect(args)
    except _Failed as e:
        return fail([str(e)])
    clusters, sources, notes = [], {}, []
    for source, doc in documents:
        verdict = validate(doc, namespaces.get((doc.get("metadata") or {}).get("namespace")))
        problems.extend(f"{source} {_who(doc)} {p}" for p in verdict.problems)
        if verdict.problems:
            continue
        if verdict.skipped:
            notes.append(f"{source} {_who(doc)}: namespace {doc['metadata']['namespace']} is not in the input, so "
                         f"whether it belongs to tenant {doc['spec']['tenant']} (its keyless.dev/tenant label) "
                         f"was not checked")
        try:
            cluster = parse(doc)
        except SpecError as e:
            problems.append(f"{source} {_who(doc)} {e}")
            continue
        clusters.append(cluster)
        sources[id(cluster)] = source
    if problems:
        return fail(problems)
    try:
        ca = open(args.broker_ca_file, "rb").read() if args.broker_ca_file else None
        operator_settings = settings.from_args(args)
    except OSError as e:
        return fail([f"--broker-ca-file {args.broker_ca_file}: cannot read it: {e.strerror or e}"])
    except ValueError as e:
        return fail([str(e)])
    for note in notes:
        print(f"keyless render: note: {note}", file=sys.stderr)
    out = []
    for destination, cluster, obj in render_clusters(clusters, operator_settings, ca):
        if args.only and destination not in args.only:
            continue
        out.append("---\n" + _header(destination, cluster, sources[id(cluster)])
                   + yaml.safe_dump(_readable(obj), sort_keys=False, width=1 << 16))
    if not out:
        print(f"keyless render: note: nothing for --only {' '.join(args.only or [])}", file=sys.stderr)
    sys.stdout.write("".join(out))
    return 0
