"""kopf admission handlers for Argo CD Applications and ApplicationSets (thin: decode, ask policy).

Wiring into an operator (what `keyless operator` does): import this module, and call
`configure_admission` from a kopf startup handler:

    import keyless.webhooks.handlers as guardrails

    @kopf.on.startup()
    async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_):
        guardrails.configure_admission(
            settings, memo, listen_host="0.0.0.0", port=9443,
            cert_file="/etc/keyless/webhook-tls/tls.crt", key_file="/etc/keyless/webhook-tls/tls.key",
            kubeconfig=memo.kubeconfig,               # None: $KUBECONFIG, else in-cluster
            admin_users=[], admin_groups=["system:masters", "platform-admins"],
            argocd_namespaces=["argocd"])

Importing this module registers the handlers in kopf's default registry, and kopf refuses to
start with admission handlers but no `settings.admission.server`: import it only when the webhooks
are enabled, and then always call `configure_admission`. It sets `settings.admission.server` (TLS,
certificate files re-read on change), puts the `Guardrails` into kopf's memo (`memo.guardrails`, where
the handlers find them) and starts the RemoteTenantCluster watch with the server.
kopf does not manage the webhook configurations (`settings.admission.managed` stays None): the chart
installs what `configuration.py` renders. The URL paths are the handler ids
(https://<service>:9443/validate-application, /validate-applicationset, /mutate-application);
GET /readyz answers 200 once the Namespaces and RemoteTenantClusters are listed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import jsonpatch
import kopf

from keyless.kube.client import Kube, KubeConfig

from . import metrics, policy
from .configuration import MUTATE_APPLICATION, VALIDATE_APPLICATION, VALIDATE_APPLICATION_SET
from .directory import TenantDirectory
from .serving import ReloadingWebhookServer
from .watch import DirectoryKeeper

log = logging.getLogger(__name__)

ARGOCD_GROUP, ARGOCD_VERSION = "argoproj.io", "v1alpha1"
OPERATIONS = ["CREATE", "UPDATE"]


@dataclass
class Guardrails:
    keeper: DirectoryKeeper
    exemptions: policy.Exemptions
    environment_label: str = policy.DEFAULT_ENVIRONMENT_LABEL

    @property
    def directory(self) -> TenantDirectory:
        return self.keeper.directory


def configure_admission(settings: kopf.OperatorSettings, memo: kopf.Memo, *, listen_host: str, port: int,
                        cert_file: str | Path, key_file: str | Path, ca_file: str | Path | None = None,
                        kubeconfig: str | None = None, admin_users: Iterable[str] = (),
                        admin_groups: Iterable[str] = policy.DEFAULT_ADMIN_GROUPS,
                        argocd_namespaces: Iterable[str] = ("argocd",),
                        environment_label: str = policy.DEFAULT_ENVIRONMENT_LABEL,
                        cert_check_interval: float = 10.0) -> ReloadingWebhookServer:
    """Makes kopf serve the guardrail webhooks; returns the server (for its `reloads` counter)."""
    argocd_namespaces = tuple(argocd_namespaces)
    keeper = DirectoryKeeper(Kube(KubeConfig.default(kubeconfig), user_agent="keyless-webhooks"),
                             control_namespaces=argocd_namespaces)
    memo.guardrails = Guardrails(
        keeper=keeper,
        exemptions=policy.Exemptions.build(admin_users, admin_groups, argocd_namespaces),
        environment_label=environment_label,
    )

    async def start_directory() -> None:
        keeper.start()

    server = ReloadingWebhookServer(
        addr=listen_host, port=port, certfile=cert_file, pkeyfile=key_file, cafile=ca_file,
        file_check_interval=cert_check_interval,
        ready=lambda: keeper.directory.ready, on_start=start_directory, on_stop=keeper.stop,
    )
    settings.admission.server = server
    settings.admission.managed = None
    logging.getLogger("kopf.objects").addFilter(_drop_expected_refusals)
    return server


def _drop_expected_refusals(record: logging.LogRecord) -> bool:
    # kopf logs every admission refusal as an ERROR; for guardrails a refusal is the expected outcome,
    # already logged above at INFO with its reason. Unexpected handler failures still get through.
    message = record.getMessage()
    return not any(message.startswith(f"Webhook '{handler_id}' failed permanently")
                   for handler_id in (VALIDATE_APPLICATION, VALIDATE_APPLICATION_SET, MUTATE_APPLICATION))


def _current(memo: kopf.Memo) -> Guardrails:
    guardrails = getattr(memo, "guardrails", None)
    if guardrails is None:
        raise kopf.AdmissionError("Keyless guardrails are not configured on this operator.", code=500)
    return guardrails


def _enforce(decision: policy.Decision, kind: str, body, userinfo) -> None:
    metadata = body.get("metadata") or {}
    metrics.observe(kind, decision.allowed, decision.reason)
    log.log(logging.DEBUG if decision.allowed else logging.INFO, "%s %s %s/%s for %s: %s",
            "Allowed" if decision.allowed else "Refused", kind, metadata.get("namespace"),
            metadata.get("name"), (userinfo or {}).get("username"), decision.reason)
    if decision.allowed:
        return
    raise kopf.AdmissionError(f"{decision.reason}: {decision.message}", code=403)


def _log_exempt(body, userinfo) -> None:
    # The webhook configurations' matchConditions normally keep exempt users from reaching us at all.
    metadata = body.get("metadata") or {}
    log.debug("Exempt %s %s/%s for %s", body.get("kind"), metadata.get("namespace"), metadata.get("name"),
              (userinfo or {}).get("username"))


def _directory_or_refuse(guardrails: Guardrails) -> TenantDirectory:
    directory = guardrails.directory
    if not directory.ready:
        # Fail closed: an empty directory would make every tenant cluster look unowned.
        raise kopf.AdmissionError(
            "Keyless guardrails are still loading the namespaces and RemoteTenantClusters; retry in a few seconds.",
            code=503)
    return directory


def _validate(memo: kopf.Memo, body, old, userinfo, review, kind: str) -> None:
    guardrails = _current(memo)
    if guardrails.exemptions.exempts(userinfo):
        _log_exempt(body, userinfo)
        return
    _enforce(review(body, _directory_or_refuse(guardrails), old=old), kind, body, userinfo)


@kopf.on.validate(ARGOCD_GROUP, ARGOCD_VERSION, "applications", id=VALIDATE_APPLICATION, operations=OPERATIONS)
async def validate_application(body, old, userinfo, memo: kopf.Memo, **_) -> None:
    _validate(memo, body, old, userinfo, policy.review_application, "Application")


@kopf.on.validate(ARGOCD_GROUP, ARGOCD_VERSION, "applicationsets", id=VALIDATE_APPLICATION_SET,
                  operations=OPERATIONS)
async def validate_application_set(body, old, userinfo, memo: kopf.Memo, **_) -> None:
    _validate(memo, body, old, userinfo, policy.review_application_set, "ApplicationSet")


@kopf.on.mutate(ARGOCD_GROUP, ARGOCD_VERSION, "applications", id=MUTATE_APPLICATION, operations=OPERATIONS)
async def default_application_destination(body, patch: kopf.Patch, memo: kopf.Memo, **_) -> None:
    guardrails = _current(memo)
    if not guardrails.directory.ready:
        return  # nothing to add yet; the validator refuses until the directory is synced
    ops = policy.default_destination_patch(body, guardrails.directory, guardrails.environment_label)
    if ops:
        # kopf diffs the transformed body against the original and sends the JSON patch.
        patch.fns.append(lambda raw: jsonpatch.apply_patch(raw, ops, in_place=True))
