"""kopf entry points: decorators only. The wiring is in startup.py, the loop in controller.py, and the
path from a RemoteTenantCluster to each derived object in reconcile/steps.py (docs/ARCHITECTURE.md)."""
from __future__ import annotations

import kopf

from . import startup
from .kube.login import kopf_connection_info
from .model import names


@kopf.on.login()
def login(memo: kopf.Memo, **_) -> kopf.ConnectionInfo:
    return kopf_connection_info(memo.kubeconfig)


@kopf.on.startup()
async def on_startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    # Events are posted by our own recorder (only for transitions and fixable failures).
    settings.posting.enabled = False
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    if memo.webhooks:
        from .webhooks import handlers as guardrails

        guardrails.configure_admission(settings, memo, **memo.webhooks)
    await startup.start(memo)


@kopf.on.cleanup()
async def on_cleanup(memo: kopf.Memo, **_) -> None:
    await startup.stop(memo)


@kopf.on.event(names.GROUP, names.VERSION, "remotetenantclusters")
async def remote_tenant_cluster_event(event: dict, memo: kopf.Memo, **_) -> None:
    controller = memo.controller
    raw = controller.observe(event.get("type") or "", event["object"])
    if raw is not None and controller.needs_reconcile(raw):
        await controller.handle(controller.ref(raw))
