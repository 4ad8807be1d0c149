"""The operator's wiring, run by kopf's startup and cleanup handlers (handlers.py): one API client, the
Context with its informers and broker client, the registry seeded before the first reconcile, and the
Controller. Everything lives in kopf's memo (no module globals), so a second operator in the same
process, or a test, gets its own."""
from __future__ import annotations

import asyncio
from pathlib import Path

import kopf

from .brokerclient.aio import BrokerClient
from .controller import Controller
from .kube import Kube, KubeConfig, KubeError
from .kube.client import resource_path
from .kube.events import EventRecorder
from .kube.informer import Informer
from .model import names
from .model.spec import SpecError, parse
from .reconcile.context import ArgoClusterSecret, Context
from .reconcile.verifier import Verifier
from .settings import OperatorSettings


def _namespace_tenant(obj: dict) -> str | None:
    return (obj["metadata"].get("labels") or {}).get(names.LABEL_TENANT)


def _follow_namespace_owners(memo: kopf.Memo):
    """On a namespace's tenant label changing: reconcile its manifests (they may stop or start serving)
    and every manifest of the old and new tenant (their AppProject's sourceNamespaces)."""
    owners: dict[str, str | None] = {}

    def changed(key: str, tenant: str | None) -> None:
        namespace = key.lstrip("/")
        before = owners.get(namespace)
        owners[namespace] = tenant
        controller: Controller | None = getattr(memo, "controller", None)
        if controller is None or before == tenant:
            return  # before the first reconcile everything is reconciled anyway
        controller.ctx.namespaces_version += 1
        affected = {tenant, before} - {None}
        for ref, cluster in list(controller.ctx.registry.clusters.items()):
            if ref.startswith(namespace + "/") or cluster.tenant in affected:
                controller.spawn_handle(ref)

    return changed


async def _list_with_retry(kube: Kube, path: str, attempts: int = 30) -> dict:
    """Lists, riding out a briefly unavailable API (e.g. a CRD whose storage is still initializing)."""
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


def build_context(settings: OperatorSettings, kube: Kube) -> Context:
    """The Context every step receives. The broker's CA is read here, once."""
    broker = None
    if settings.verification_enabled:
        broker = BrokerClient(settings.broker_url, settings.broker_ca_file, settings.broker_token_file,
                              timeout=10.0, user_agent="keyless-operator")
    return Context(kube=kube, settings=settings, events=EventRecorder(kube), verifier=Verifier(settings, broker),
                   broker=broker,
                   broker_ca_pem=Path(settings.broker_ca_file).read_bytes() if settings.broker_ca_file else None)


async def start(memo: kopf.Memo) -> None:
    """Builds the Context and the Controller into `memo` and starts the informers and the resync."""
    settings: OperatorSettings = memo.settings
    kube = Kube(KubeConfig.default(memo.kubeconfig), user_agent="keyless-operator")
    ctx = build_context(settings, kube)
    # Which tenant owns each namespace: a manifest counts only in a namespace of its own tenant.
    ctx.namespaces = Informer(kube, resource_path("v1", "Namespace"), _namespace_tenant,
                              on_change=_follow_namespace_owners(memo), name="namespace-tenants")
    ctx.namespaces.start()
    for namespace in settings.argocd_namespaces:
        informer = Informer(kube, resource_path("v1", "Secret", namespace),
                            ArgoClusterSecret.of, label_selector=f"{names.ARGOCD_SECRET_TYPE_LABEL}=cluster",
                            name=f"argocd-secrets-{namespace}")
        informer.start()
        ctx.argo_secrets[namespace] = informer
    # Seed the registry with every manifest before the first reconcile, so conflict decisions
    # (oldest wins) do not depend on the order the watch happens to deliver objects.
    # Only the namespaces this operator watches (with --namespace, it may not list cluster-wide).
    for scope in memo.namespaces or [None]:
        listing = await _list_with_retry(kube, resource_path(names.API_VERSION, "RemoteTenantCluster", scope))
        for raw in listing.get("items", []):
            try:
                ctx.registry.put(parse(raw))
            except SpecError:
                pass
    informers = [ctx.namespaces, *ctx.argo_secrets.values()]
    await asyncio.wait_for(asyncio.gather(*(i.synced.wait() for i in informers)), timeout=60)
    controller = Controller(ctx)
    memo.controller = controller
    memo.resync = asyncio.create_task(controller.resync_forever())


async def stop(memo: kopf.Memo) -> None:
    controller: Controller | None = getattr(memo, "controller", None)
    if controller is None:
        return
    memo.resync.cancel()
    ctx = controller.ctx
    for informer in [ctx.namespaces, *ctx.argo_secrets.values()]:
        await informer.stop()
    if ctx.broker is not None:
        await ctx.broker.close()
    await ctx.kube.close()
