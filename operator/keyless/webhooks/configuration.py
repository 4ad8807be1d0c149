"""Renders the ValidatingWebhookConfiguration and MutatingWebhookConfiguration (pure, no I/O).

Scope: only argoproj.io/v1alpha1 applications and applicationsets, only CREATE and UPDATE, in every
namespace (Argo CD accepts Applications from any namespace a project's sourceNamespaces lists, so a
namespace selector would be a way around the guardrails), and, through CEL `matchConditions`, never
for admins or Argo CD's own controllers (validation) and only for Applications without a destination
(mutation). Everything else never reaches the webhook.

failurePolicy, chosen deliberately:

- Validation: **Fail** (fail closed). The guardrail is a security boundary; failing open would
  let anyone bypass it by making the webhook slow or unreachable. The cost is bounded: while the
  webhook is down, only non-admin users writing Applications/ApplicationSets are refused (with the API server's "failed calling webhook" error). Argo CD's own
  controllers are excluded by matchConditions before any call, so syncing and the application
  controller's frequent status updates (Applications have no status subresource: each one is an
  UPDATE of the whole object) never depend on the webhook; admins are excluded the same way and
  can always repair things. Other objects never match the rules.
- Mutation: **Ignore**. Filling in a missing destination is a convenience that grants nothing:
  if it cannot run, the validator (Fail) still refuses the destination-less Application with a
  message naming the clusters to choose from, so ignoring a failure never admits anything unsafe.

timeoutSeconds is 5 (the API server's default is 10, maximum 30): decisions are in-memory lookups
that take milliseconds, and a short timeout keeps a stuck webhook from holding API requests.
"""
from __future__ import annotations

import base64
import json
from typing import Iterable

from keyless.model.names import LABEL_MANAGED_BY, MANAGED_BY

from .policy import Exemptions

# The webhook URL paths; the kopf handlers carry the same ids (kopf routes /<id> to that handler).
VALIDATE_APPLICATION = "validate-application"
VALIDATE_APPLICATION_SET = "validate-applicationset"
MUTATE_APPLICATION = "mutate-application"

DEFAULT_NAME = "keyless-tenant-guardrails"
WEBHOOK_DOMAIN = "guardrails.keyless.dev"
TIMEOUT_SECONDS = 5
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set by the API server on every namespace


def url_client_config(base_url: str, ca_pem: bytes, handler_id: str) -> dict:
    """clientConfig for a webhook reached by URL (e.g. https://127.0.0.1:9443 in tests)."""
    return {"url": f"{base_url.rstrip('/')}/{handler_id}", "caBundle": base64.b64encode(ca_pem).decode()}


def service_client_config(namespace: str, name: str, port: int, ca_pem: bytes, handler_id: str) -> dict:
    """clientConfig for a webhook reached through a Service (in-cluster installation)."""
    return {"service": {"namespace": namespace, "name": name, "port": port, "path": f"/{handler_id}"},
            "caBundle": base64.b64encode(ca_pem).decode()}


def _cel_list(values: Iterable[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in sorted(values)) + "]"


def exemption_match_conditions(exemptions: Exemptions) -> list[dict]:
    """CEL conditions that keep admins' and Argo CD controllers' requests away from the validator."""
    conditions = []
    if exemptions.users:
        conditions.append({"name": "not-exempt-user",
                           "expression": f"!(request.userInfo.username in {_cel_list(exemptions.users)})"})
    if exemptions.groups:
        conditions.append({"name": "not-exempt-group",
                           "expression": f"!request.userInfo.groups.exists(g, g in {_cel_list(exemptions.groups)})"})
    return conditions


# Only Applications without destination server and name need the mutating webhook.
_WITHOUT_DESTINATION = (
    "!has(object.spec) || !has(object.spec.destination) || "
    "((!has(object.spec.destination.server) || object.spec.destination.server == '') && "
    "(!has(object.spec.destination.name) || object.spec.destination.name == ''))"
)


def _scope(namespaces: Iterable[str] | None) -> dict:
    """All namespaces (the default), or only these (e.g. to try a configuration on one namespace)."""
    if namespaces is None:
        return {}
    return {"namespaceSelector": {"matchExpressions": [
        {"key": NAMESPACE_NAME_LABEL, "operator": "In", "values": sorted(set(namespaces))}]}}


def _rule(resource: str) -> dict:
    return {"apiGroups": ["argoproj.io"], "apiVersions": ["v1alpha1"], "resources": [resource],
            "operations": ["CREATE", "UPDATE"], "scope": "Namespaced"}


def _metadata(name: str) -> dict:
    return {"name": name, "labels": {LABEL_MANAGED_BY: MANAGED_BY}}


def render_validating_webhook_configuration(client_config, *, exemptions: Exemptions,
                                            application_namespaces: Iterable[str] | None = None,
                                            name: str = DEFAULT_NAME) -> dict:
    """`client_config(handler_id) -> clientConfig`, e.g. functools.partial(url_client_config, url, ca)."""
    def webhook(handler_id: str, resource: str) -> dict:
        return {
            "name": f"{handler_id}.{WEBHOOK_DOMAIN}",
            "clientConfig": client_config(handler_id),
            "rules": [_rule(resource)],
            **_scope(application_namespaces),
            "matchConditions": exemption_match_conditions(exemptions),
            "failurePolicy": "Fail",
            "matchPolicy": "Equivalent",
            "sideEffects": "None",
            "timeoutSeconds": TIMEOUT_SECONDS,
            "admissionReviewVersions": ["v1"],
        }

    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": _metadata(name),
        "webhooks": [webhook(VALIDATE_APPLICATION, "applications"),
                     webhook(VALIDATE_APPLICATION_SET, "applicationsets")],
    }


def render_mutating_webhook_configuration(client_config, *, application_namespaces: Iterable[str] | None = None,
                                          name: str = DEFAULT_NAME) -> dict:
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": _metadata(name),
        "webhooks": [{
            "name": f"{MUTATE_APPLICATION}.{WEBHOOK_DOMAIN}",
            "clientConfig": client_config(MUTATE_APPLICATION),
            "rules": [_rule("applications")],
            **_scope(application_namespaces),
            "matchConditions": [{"name": "without-destination", "expression": _WITHOUT_DESTINATION}],
            "failurePolicy": "Ignore",
            "matchPolicy": "Equivalent",
            "sideEffects": "None",
            "timeoutSeconds": TIMEOUT_SECONDS,
            "reinvocationPolicy": "Never",
            "admissionReviewVersions": ["v1"],
        }],
    }
