"""Is a RemoteTenantCluster one the API server would accept? Decided from the API server's own sources.

`keyless render` is a CI gate: what it accepts, `kubectl apply` must accept too. So nothing here restates
a rule. The rules are read from the files the cluster gets (shipped as package data, symlinks to the
repository's crds/ and policies/):

- the CRD's OpenAPI schema, checked structurally as the API server does (types, required, enum, unknown
  fields, minimum/maximum, lengths, item and property counts, pattern, format, list-type set/map);
- the CRD's x-kubernetes-validations CEL rules, evaluated with cel-python plus the Kubernetes CEL
  library functions they use (isURL, url, isIP, ...);
- the tenancy ValidatingAdmissionPolicy's validations, evaluated for a CREATE.

What render cannot know, and so skips: transition rules (those that read oldSelf: a create has no old
object), the policy's checks of the Namespace's keyless.dev/tenant label unless the Namespace is in the
input, and anything that depends on other objects in the cluster (who claimed a server first).
"""
from __future__ import annotations

import base64
import binascii
import datetime
import functools
import ipaddress
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any, Mapping
from urllib.parse import urlsplit

import celpy
import re2
import yaml
from celpy import celtypes

GROUP = "keyless.dev"
KIND = "RemoteTenantCluster"
CRD_FILE = "remotetenantclusters.keyless.dev.yaml"
POLICY_FILE = "remotetenantcluster-tenancy.yaml"


@dataclass(frozen=True)
class Problem:
    path: str  # field path, e.g. spec.access.tokenTTLSeconds ("" for the object as a whole)
    message: str

    def __str__(self) -> str:
        if not self.path or self.message.startswith(self.path + " "):  # a CEL message that names its field
            return self.message
        return f"{self.path}: {self.message}"


def _schema_text(name: str) -> str:
    return (resources.files("keyless.render") / "schema" / name).read_text()


@functools.cache
def crd() -> dict:
    return yaml.safe_load(_schema_text(CRD_FILE))


@functools.cache
def tenancy_policy() -> dict:
    return next(d for d in yaml.safe_load_all(_schema_text(POLICY_FILE))
                if d and d.get("kind") == "ValidatingAdmissionPolicy")


def served_versions() -> dict[str, dict]:
    """apiVersion -> openAPIV3Schema of every served version of the CRD."""
    spec = crd()["spec"]
    return {f"{spec['group']}/{v['name']}": v["schema"]["openAPIV3Schema"] for v in spec["versions"] if v.get("served")}


# ---- the Kubernetes CEL library functions the rules use ------------------------------------------------------
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*$")


def _parse_url(text: str):
    """Go's url.ParseRequestURI, closely enough: an absolute URL or an absolute path, no spaces."""
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7f for c in text):
        return None
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError:
        return None
    if parts.scheme and _SCHEME.match(parts.scheme):
        return parts
    return parts if text.startswith("/") else None


def _is_url(value):
    return celtypes.BoolType(_parse_url(str(value)) is not None)


class _URL(celtypes.StringType):
    """The value of url(string): the string, known to parse."""


def _url(value):
    if _parse_url(str(value)) is None:
        raise ValueError(f"URL parse error during conversion from string: {value}")
    return _URL(str(value))


def _get_hostname(u):
    return celtypes.StringType(_parse_url(str(u)).hostname or "")


def _get_scheme(u):
    return celtypes.StringType(_parse_url(str(u)).scheme)


def _get_port(u):
    port = _parse_url(str(u)).port
    return celtypes.StringType("" if port is None else str(port))


def _get_escaped_path(u):
    return celtypes.StringType(_parse_url(str(u)).path)


def _is_ip(value):
    text = str(value)
    if "%" in text:  # zones are refused
        return celtypes.BoolType(False)
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return celtypes.BoolType(False)
    mapped = isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None
    return celtypes.BoolType(not mapped)


KUBERNETES_FUNCTIONS = {
    "isURL": _is_url, "url": _url, "getHostname": _get_hostname, "getScheme": _get_scheme,
    "getPort": _get_port, "getEscapedPath": _get_escaped_path, "isIP": _is_ip,
}

_ENV = celpy.Environment()


@functools.cache
def _program(expression: str):
    ast = _ENV.compile(expression)
    identifiers = tuple(str(t) for t in ast.scan_values(lambda t: getattr(t, "type", None) == "IDENT"))
    return _ENV.program(ast, functions=KUBERNETES_FUNCTIONS), identifiers


class RuleError(Exception):
    """A rule that could not be evaluated (its message says why)."""


def evaluate(expression: str, activation: Mapping[str, Any]):
    program, _ = _program(expression)
    try:
        result = program.evaluate({k: celpy.json_to_cel(v) for k, v in activation.items()})
    except Exception as e:  # celpy raises its own errors for bad input; the caller reports them as a refusal
        raise RuleError(str(e) or type(e).__name__) from None
    if isinstance(result, celpy.evaluation.CELEvalError):
        raise RuleError(str(result.args[0] if result.args else result))
    return result


def identifiers(expression: str) -> tuple[str, ...]:
    return _program(expression)[1]


# ---- the structural schema ---------------------------------------------------------------------------------
_TYPES = {"string": "a string", "integer": "an integer", "number": "a number", "boolean": "a boolean (true or false)",
          "object": "an object (a mapping of fields)", "array": "a list"}


def _is_type(value, kind: str) -> bool:
    if kind == "string":
        return isinstance(value, str)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    return True


def _describe(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {_quote(value)}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return "a value of another type"


def _quote(text: str, limit: int = 80) -> str:
    text = text if len(text) <= limit else text[:limit] + "..."
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _check_format(fmt: str, value: str) -> str | None:
    if fmt == "byte":
        try:
            base64.b64decode(value.replace("\n", "").replace("\r", ""), validate=True)
        except (binascii.Error, ValueError):
            return "must be base64 (format byte)"
    elif fmt == "date-time":
        try:
            datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return "must be an RFC 3339 date-time"
    return None


class _Checker:
    def __init__(self):
        self.problems: list[Problem] = []

    def add(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message))

    def check(self, schema: Mapping, value, path: str) -> None:
        before = len(self.problems)
        if value is None:
            if not schema.get("nullable"):
                kind = schema.get("type")
                self.add(path, f"must be {_TYPES.get(kind, 'set')}, not null")
            return
        kind = schema.get("type")
        if kind and not schema.get("x-kubernetes-int-or-string") and not _is_type(value, kind):
            self.add(path, f"must be {_TYPES.get(kind, kind)} (got {_describe(value)})")
            return
        if "enum" in schema and value not in schema["enum"]:
            allowed = ", ".join(_quote(v) if isinstance(v, str) else str(v) for v in schema["enum"])
            self.add(path, f"unsupported value {_quote(str(value))}: must be one of {allowed}")
        if isinstance(value, str):
            self._string(schema, value, path)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            self._number(schema, value, path)
        elif isinstance(value, list):
            self._array(schema, value, path)
        elif isinstance(value, dict):
            self._object(schema, value, path)
        if len(self.problems) == before:
            # Like the API server, CEL rules only see values that passed the schema.
            self._rules(schema, value, path)

    def _string(self, schema, value: str, path: str) -> None:
        if "minLength" in schema and len(value) < schema["minLength"]:
            self.add(path, "must not be empty" if schema["minLength"] == 1 else
                     f"must be at least {schema['minLength']} characters long")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            self.add(path, f"must be at most {schema['maxLength']} characters long (it has {len(value)})")
        if "pattern" in schema and not re2.search(schema["pattern"], value):
            self.add(path, f"{_quote(value)} does not match the pattern {schema['pattern']}")
        if "format" in schema:
            problem = _check_format(schema["format"], value)
            if problem:
                self.add(path, problem)

    def _number(self, schema, value, path: str) -> None:
        if "minimum" in schema:
            low = schema["minimum"]
            if value < low or (schema.get("exclusiveMinimum") and value == low):
                self.add(path, f"must be {'greater than' if schema.get('exclusiveMinimum') else 'at least'} "
                               f"{low} (got {value})")
        if "maximum" in schema:
            high = schema["maximum"]
            if value > high or (schema.get("exclusiveMaximum") and value == high):
                self.add(path, f"must be {'less than' if schema.get('exclusiveMaximum') else 'at most'} "
                               f"{high} (got {value})")

    def _array(self, schema, value: list, path: str) -> None:
        if "minItems" in schema and len(value) < schema["minItems"]:
            self.add(path, f"must have at least {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            self.add(path, f"must have at most {schema['maxItems']} items (it has {len(value)})")
        items = schema.get("items")
        for i, item in enumerate(value):
            if items is not None:
                self.check(items, item, f"{path}[{i}]")
        list_type = schema.get("x-kubernetes-list-type")
        if list_type == "set" or schema.get("uniqueItems"):
            seen = []
            for i, item in enumerate(value):
                if item in seen:
                    self.add(f"{path}[{i}]", f"duplicate value {_quote(str(item))} (the list is a set)")
                seen.append(item)
        elif list_type == "map":
            keys = schema.get("x-kubernetes-list-map-keys") or []
            seen = []
            for i, item in enumerate(value):
                key = tuple((item or {}).get(k) for k in keys) if isinstance(item, dict) else None
                if key in seen:
                    self.add(f"{path}[{i}]", f"duplicate entry for key {', '.join(map(str, key))}")
                seen.append(key)

    def _object(self, schema, value: dict, path: str) -> None:
        properties = schema.get("properties")
        for key in schema.get("required") or ():
            if key not in value:
                self.add(_join(path, key), "required field is missing")
        if "minProperties" in schema and len(value) < schema["minProperties"]:
            self.add(path, f"must have at least {schema['minProperties']} entries")
        if "maxProperties" in schema and len(value) > schema["maxProperties"]:
            self.add(path, f"must have at most {schema['maxProperties']} entries (it has {len(value)})")
        additional = schema.get("additionalProperties")
        for key, item in value.items():
            key_path = _join(path, str(key))
            if properties is not None and key in properties:
                self.check(properties[key], item, key_path)
            elif isinstance(additional, dict):
                self.check(additional, item, key_path)
            elif properties is not None and not schema.get("x-kubernetes-preserve-unknown-fields") \
                    and additional is not True:
                known = ", ".join(properties) or "none"
                self.add(key_path, f"unknown field {_quote(str(key))} (the fields here are: {known})")

    def _rules(self, schema, value, path: str) -> None:
        for rule in schema.get("x-kubernetes-validations") or ():
            expression = rule["rule"]
            if "oldSelf" in identifiers(expression):
                continue  # a transition rule: the API server evaluates it on updates only
            where = _join(path, rule["fieldPath"].lstrip(".")) if rule.get("fieldPath") else path
            try:
                ok = bool(evaluate(expression, {"self": value}))
            except RuleError as e:
                self.add(where, f"the rule {expression!r} could not be evaluated: {e}")
                continue
            if not ok:
                self.add(where, _rule_message(rule, {"self": value}))


def _rule_message(rule: Mapping, activation: Mapping) -> str:
    if rule.get("messageExpression"):
        try:
            return str(evaluate(rule["messageExpression"], activation))
        except RuleError:
            pass
    if rule.get("message"):
        return " ".join(str(rule["message"]).split())
    return f"failed rule: {' '.join((rule.get('rule') or rule.get('expression') or '').split())}"


# ---- metadata (ObjectMeta), as the API server checks it for a custom resource -------------------------------
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_OBJECT_META = ("name", "generateName", "namespace", "labels", "annotations", "uid", "resourceVersion", "generation",
                "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "ownerReferences",
                "finalizers", "managedFields", "selfLink")


def _check_metadata(meta, checker: _Checker) -> None:
    if not isinstance(meta, dict):
        checker.add("metadata", f"must be an object (got {_describe(meta)})")
        return
    for key in meta:
        if key not in _OBJECT_META:
            checker.add(f"metadata.{key}", f"unknown field {_quote(str(key))}")
    name = meta.get("name")
    if not name:
        checker.add("metadata.name", "required field is missing (kubectl apply needs a name)")
    elif not isinstance(name, str) or len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        checker.add("metadata.name", f"{_quote(str(name))} is not a valid name: lower-case letters, digits, '-' "
                                     f"and '.', starting and ending with a letter or digit, at most 253")
    namespace = meta.get("namespace")
    if namespace is not None and (not isinstance(namespace, str) or len(namespace) > 63
                                  or not _DNS_LABEL.match(namespace)):
        checker.add("metadata.namespace", f"{_quote(str(namespace))} is not a valid namespace name (a DNS label)")
    for field_name in ("labels", "annotations"):
        mapping = meta.get(field_name)
        if mapping is None:
            continue
        if not isinstance(mapping, dict):
            checker.add(f"metadata.{field_name}", f"must be an object of strings (got {_describe(mapping)})")
            continue
        for key, item in mapping.items():
            if not isinstance(item, str):
                checker.add(f"metadata.{field_name}.{key}", f"must be a string (got {_describe(item)})")
            elif field_name == "labels" and (len(item) > 63 or (item and not _LABEL_NAME.match(item))):
                checker.add(f"metadata.labels.{key}", f"{_quote(item)} is not a valid label value")
            prefix, _, label = str(key).rpartition("/")
            if not label or len(label) > 63 or not _LABEL_NAME.match(label) or \
                    (prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix))):
                checker.add(f"metadata.{field_name}", f"{_quote(str(key))} is not a valid key")


# ---- the tenancy admission policy ----------------------------------------------------------------------------
_UNKNOWABLE = {"authorizer", "params", "userInfo", "oldObject"}


def _policy_problems(obj: dict, namespace_object: dict | None) -> tuple[list[Problem], list[str]]:
    """The tenancy policy's verdict on creating `obj`: (problems, what was skipped because render cannot know it)."""
    policy = tenancy_policy()["spec"]
    meta = obj.get("metadata") or {}
    unknown = set(_UNKNOWABLE) | ({"namespaceObject"} if namespace_object is None else set())
    activation: dict[str, Any] = {
        "object": obj, "oldObject": None,
        "request": {"operation": "CREATE", "namespace": meta.get("namespace", ""), "name": meta.get("name", ""),
                    "kind": {"group": GROUP, "version": "v1alpha1", "kind": KIND},
                    "resource": {"group": GROUP, "version": "v1alpha1", "resource": "remotetenantclusters"},
                    "dryRun": False},
    }
    if namespace_object is not None:
        activation["namespaceObject"] = namespace_object

    def needs_unknown(expression: str) -> bool:
        found = identifiers(expression)
        if unknown & set(found):
            return True
        return any(a == "variables" and b in unknown_variables for a, b in zip(found, found[1:]))

    unknown_variables: set[str] = set()
    variables: dict[str, Any] = {}
    for variable in policy.get("variables") or ():
        if needs_unknown(variable["expression"]):
            unknown_variables.add(variable["name"])
            continue
        try:
            variables[variable["name"]] = _to_json(evaluate(variable["expression"], {**activation,
                                                                                      "variables": variables}))
        except RuleError:
            unknown_variables.add(variable["name"])
    activation["variables"] = variables
    for condition in policy.get("matchConditions") or ():
        if needs_unknown(condition["expression"]):
            continue  # assume it matches: a create of a manifest writes its spec
        try:
            if not bool(evaluate(condition["expression"], activation)):
                return [], []
        except RuleError:
            continue
    problems, skipped = [], []
    for validation in policy.get("validations") or ():
        expression = validation["expression"]
        if needs_unknown(expression):
            skipped.append(" ".join(expression.split()))
            continue
        try:
            ok = bool(evaluate(expression, activation))
        except RuleError as e:
            problems.append(Problem("", f"admission policy {tenancy_policy()['metadata']['name']}: the rule "
                                        f"{expression!r} could not be evaluated: {e}"))
            continue
        if not ok:
            problems.append(Problem("", f"admission policy {tenancy_policy()['metadata']['name']} refuses it: "
                                        f"{_rule_message(validation, activation)}"))
    return problems, skipped


def _to_json(value):
    if isinstance(value, celtypes.BoolType):
        return bool(value)
    if isinstance(value, celtypes.IntType):
        return int(value)
    if isinstance(value, celtypes.StringType):
        return str(value)
    if isinstance(value, (celtypes.ListType, list)):
        return [_to_json(v) for v in value]
    if isinstance(value, (celtypes.MapType, dict)):
        return {str(k): _to_json(v) for k, v in value.items()}
    return value


# ---- the one entry point -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    problems: list[Problem]
    skipped: list[str]  # policy rules render could not evaluate (what it cannot know)


def validate(obj: dict, namespace_object: dict | None = None) -> Verdict:
    """What the API server (CRD schema + CEL) and the tenancy policy would say to creating `obj`."""
    checker = _Checker()
    schemas = served_versions()
    api_version = obj.get("apiVersion")
    if api_version not in schemas:
        known = ", ".join(sorted(schemas))
        checker.add("apiVersion", f"{_quote(str(api_version))} is not served for {KIND} (served: {known})")
        return Verdict(checker.problems, [])
    schema = schemas[api_version]
    _check_metadata(obj.get("metadata"), checker)
    # The API server drops status on create (status subresource); metadata is ObjectMeta, checked above.
    body = {k: v for k, v in obj.items() if k not in ("status", "metadata")}
    structural = {**schema, "properties": {k: v for k, v in schema.get("properties", {}).items()
                                           if k not in ("status", "metadata")}}
    checker.check(structural, body, "")
    if checker.problems:
        return Verdict(checker.problems, [])
    problems, skipped = _policy_problems(obj, namespace_object)
    return Verdict(problems, skipped)
