"""kopf entry points: decorators only, delegating to the Controller."""
from __future__ import annotations

import asyncio
import logging

import kopf

from .controller import Controller
from .kube import Kube, KubeConfig
from .kube.client import resource_path
from .kube.events import EventRecorder
from .kube.informer import Informer
from .model import names
from .reconcile.context import ArgoClusterSecret, Context
from .reconcile.verify import Verifier
from .model.spec import parse, SpecError

log = logging.getLogger(__name__)


def _secret_projection(obj: dict) -> ArgoClusterSecret:
    import base64

    data = obj.get("data") or {}

    def field(key: str) -> str:
        try:
            return base64.b64decode(data.get(key, "")).decode()
        except (ValueError, UnicodeDecodeError):
            return ""

    meta = obj["metadata"]
    owner = (meta.get("annotations") or {}).get(names.ANNOTATION_OWNER)
    if (meta.get("labels") or {}).get(names.LABEL_MANAGED_BY) != names.MANAGED_BY:
        owner = None
    return ArgoClusterSecret(name=meta["name"], cluster_name=field("name"), server=field("server"), owner=owner)


async def _list_with_retry(kube: Kube, path: str, attempts: int = 30) -> dict:
    """Lists, riding out a briefly unavailable API (e.g. a CRD whose storage is still initializing)."""
    from .kube import KubeError

    for attempt in range(attempts):
        try:
            return await kube.list(path)
        except KubeError as e:
            if e.status not in (404, 429, 500, 503) or attempt == attempts - 1:
                raise
        except OSError:
            if attempt == attempts - 1:
                raise
        await asyncio.sleep(min(0.2 * (attempt + 1), 2))
    raise AssertionError("unreachable")


@kopf.on.login()
def login(memo: kopf.Memo, **_) -> kopf.ConnectionInfo:
    """kopf uses the same credentials as our own client (kubeconfig or in-cluster token)."""
    config = KubeConfig.default(memo.kubeconfig)
    token = config.token
    if config.token_file:
        token = config.token_file.read_text().strip()
    return kopf.ConnectionInfo(
        server=config.server,
        ca_data=config.ca_pem,
        insecure=config.insecure,
        certificate_data=config.client_cert_pem,
        private_key_data=config.client_key_pem,
        scheme="Bearer" if token else None,
        token=token,
        expiration=None,
    )


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    # Events are posted by our own recorder (only for transitions and fixable failures).
    settings.posting.enabled = False
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    if getattr(memo, "webhooks", None):
        from .webhooks import handlers as guardrails

        guardrails.configure_admission(settings, **memo.webhooks)
    operator_settings = memo.settings
    kube = Kube(KubeConfig.default(memo.kubeconfig), user_agent="keyless-operator")
    ctx = Context(kube=kube, settings=operator_settings, events=EventRecorder(kube),
                  verifier=Verifier(operator_settings))
    for namespace in operator_settings.argocd_namespaces:
        informer = Informer(kube, resource_path("v1", "Secret", namespace),
                            _secret_projection, label_selector=f"{names.ARGOCD_SECRET_TYPE_LABEL}=cluster",
                            name=f"argocd-secrets-{namespace}")
        informer.start()
        ctx.argo_secrets[namespace] = informer
    # Seed the registry with every manifest before the first reconcile, so conflict decisions
    # (oldest wins) do not depend on the order the watch happens to deliver objects.
    # Only the namespaces this operator watches (with --namespace, it may not list cluster-wide).
    scopes = getattr(memo, "namespaces", None) or [None]
    items: list[dict] = []
    for scope in scopes:
        listing = await _list_with_retry(kube, resource_path(names.API_VERSION, "RemoteTenantCluster", scope))
        items.extend(listing.get("items", []))
    for raw in items:
        try:
            ctx.registry.put(parse(raw))
        except (SpecError, KeyError, ValueError, TypeError):
            pass
    await asyncio.wait_for(asyncio.gather(*(i.synced.wait() for i in ctx.argo_secrets.values())), timeout=60)
    controller = Controller(ctx)
    memo.controller = controller
    memo.resync = asyncio.create_task(controller.resync_forever())


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_) -> None:
    controller: Controller | None = getattr(memo, "controller", None)
    if controller is None:
        return
    memo.resync.cancel()
    for informer in controller.ctx.argo_secrets.values():
        await informer.stop()
    await controller.ctx.verifier.close()
    await controller.ctx.kube.close()


@kopf.on.event(names.GROUP, names.VERSION, "remotetenantclusters")
async def remote_tenant_cluster_event(event: dict, memo: kopf.Memo, **_) -> None:
    controller: Controller = memo.controller
    raw = controller.observe(event.get("type") or "", event["object"])
    if raw is not None and controller.needs_reconcile(raw):
        await controller.handle(controller.ref(raw))
