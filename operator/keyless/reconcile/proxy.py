"""Reconcile step ProxyReady, per proxy mode: Managed installs kube-oidc-proxy, its trust and least-privilege
RBAC on the tenant (tenant_access.py says how the tenant is reached, proxy_pki.py where its certificates
come from); External has nothing to do; Direct renders the tenant API server's AuthenticationConfiguration."""
from __future__ import annotations

from ..kube import Kube, KubeError
from ..kube.apply import OwnershipConflict, apply_if_changed, delete_if_owned
from ..kube.client import API_ERRORS, resource_path
from ..model import conditions as c
from ..model import names
from ..model.spec import ProxyMode, RemoteTenantCluster
from ..render.tenant import (PROXY_NAME, TRUST_CHECKSUM_ANNOTATION, render_authentication_configuration,
                             render_tenant_proxy)
from . import proxy_pki
from .context import Context, Flow, StepResult
from .errors import Retry, safe_error
from .tenant_access import TenantUnavailable, tenant_client, tenant_error

KIND = c.PROXY_READY
BROKER_CA_UNKNOWN = "BrokerCAUnknown"
# Kinds whose objects can become unwanted while the manifest lives (a role change, a ServiceAccount
# removed from spec.access.impersonation); the rest is fixed per manifest and removed on deletion.
_PRUNED_KINDS = ("ClusterRoleBinding", "RoleBinding", "Role")


async def reconcile_proxy(ctx: Context, cluster: RemoteTenantCluster, flow: Flow) -> StepResult:
    mode = cluster.proxy.mode
    if mode is ProxyMode.EXTERNAL:
        return StepResult(c.Condition(KIND, c.TRUE, "External",
                                      "kube-oidc-proxy is installed by other means; TokenVerified proves it trusts the broker"))
    if ctx.broker_ca_pem is None:
        need = ("Direct mode needs the broker's CA (--broker-ca-file) to render the tenant API server's "
                "AuthenticationConfiguration" if mode is ProxyMode.DIRECT
                else "the operator needs --broker-ca-file: the proxy must trust the broker's TLS")
        return StepResult(c.Condition(KIND, c.FALSE, BROKER_CA_UNKNOWN, need))
    if mode is ProxyMode.DIRECT:
        document = render_authentication_configuration(ctx.settings.broker_issuer, cluster.access.audience,
                                                       ctx.broker_ca_pem, ctx.settings.signing_algorithm)
        return StepResult(
            c.Condition(KIND, c.TRUE, "DirectMode",
                        "no proxy: the tenant API server must load status.authenticationConfiguration "
                        "(--authentication-config); TokenVerified proves it does"),
            status={"authenticationConfiguration": document})
    return await _install_managed_proxy(ctx, cluster, flow)


async def _install_managed_proxy(ctx: Context, cluster: RemoteTenantCluster, flow: Flow) -> StepResult:
    try:
        pki = await proxy_pki.ensure(ctx, cluster, flow)
    except OwnershipConflict as e:
        return StepResult(c.Condition(KIND, c.FALSE, "Conflict", f"cannot keep the proxy CA: {e}"))
    objects = render_tenant_proxy(cluster, ctx.settings, serving_cert_pem=pki["tls.crt"],
                                  serving_key_pem=pki["tls.key"], issuer_ca_pem=ctx.broker_ca_pem)
    try:
        client, via = await tenant_client(ctx, cluster, cluster.ca_pem or proxy_pki.trust_bundle(pki))
    except TenantUnavailable as e:
        return StepResult(c.Condition(KIND, c.FALSE, e.reason, str(e)))
    changes, pending = [], []
    try:
        async with client:
            for obj in objects:
                meta = obj["metadata"]
                try:
                    outcome = await apply_if_changed(client, obj, names.FIELD_MANAGER_OPERATOR, owner=cluster.ref)
                except KubeError as e:
                    # Impersonation rights for a namespace that does not exist yet (Argo CD may create it
                    # on the first sync): granted on a later reconcile, said in the condition meanwhile.
                    if e.status != 404 or meta.get("namespace") in (None, cluster.proxy.namespace):
                        raise
                    pending.append(meta["namespace"])
                    continue
                if outcome != "unchanged":
                    where = f"{meta['namespace']}/{meta['name']}" if meta.get("namespace") else meta["name"]
                    changes.append(f"{outcome.capitalize()} tenant {obj['kind']} {where} (via {via})")
            changes += await _prune_stale_bindings(client, cluster, objects)
            deployment = await client.get(resource_path("apps/v1", "Deployment", cluster.proxy.namespace, PROXY_NAME))
    except OwnershipConflict as e:
        return StepResult(c.Condition(KIND, c.FALSE, "Conflict", f"on the tenant cluster: {e}"), tuple(changes))
    except API_ERRORS as e:
        error = tenant_error(e, via)
        return StepResult(c.Condition(KIND, c.FALSE, error.reason, str(error)), tuple(changes))
    status = (deployment or {}).get("status") or {}
    ready, wanted = status.get("readyReplicas") or 0, cluster.proxy.replicas
    if ready < 1:
        return StepResult(c.Condition(KIND, c.FALSE, "ProxyNotReady",
                                      f"kube-oidc-proxy installed via {via}, {ready}/{wanted} replicas ready; "
                                      f"check its pods in namespace {cluster.proxy.namespace} on the tenant"),
                          tuple(changes))
    if not changes and _rolled_out(deployment, objects):
        try:
            changes += await proxy_pki.retire_previous(ctx, cluster, flow)
        except API_ERRORS as e:
            return StepResult(c.Condition(KIND, c.FALSE, "ProxyCAUnavailable",
                                          f"cannot end the proxy CA rotation: {safe_error(e)}"), retry=Retry.TRANSIENT)
    message = f"kube-oidc-proxy {ready}/{wanted} replicas ready (managed via {via})"
    if pending:
        message += (f"; impersonation of ServiceAccounts in namespace(s) {', '.join(sorted(set(pending)))} is "
                    f"granted once they exist")
    return StepResult(c.Condition(KIND, c.TRUE, "Ready", message), tuple(changes))


def _rolled_out(deployment: dict | None, objects: list[dict]) -> bool:
    """Every replica of the proxy runs the Pod template just rendered (so serves its certificate)."""
    wanted = next((o for o in objects if o["kind"] == "Deployment"), None)
    if not deployment or wanted is None:
        return False
    live_template = (deployment["spec"]["template"]["metadata"].get("annotations") or {})
    desired_template = (wanted["spec"]["template"]["metadata"].get("annotations") or {})
    status, replicas = deployment.get("status") or {}, deployment["spec"].get("replicas", 1)
    return (live_template.get(TRUST_CHECKSUM_ANNOTATION) == desired_template.get(TRUST_CHECKSUM_ANNOTATION)
            and status.get("observedGeneration") == deployment["metadata"].get("generation")
            and status.get("updatedReplicas") == replicas and status.get("availableReplicas") == replicas
            and (status.get("replicas") or 0) == replicas)


async def _prune_stale_bindings(client: Kube, cluster: RemoteTenantCluster, objects: list[dict]) -> list[str]:
    """Removes this cluster's RBAC objects on the tenant that are no longer wanted."""
    rbac = "rbac.authorization.k8s.io/v1"
    labels = cluster.ownership_labels()
    selector = ",".join(f"{k}={labels[k]}" for k in (names.LABEL_CLUSTER_NAMESPACE, names.LABEL_CLUSTER_NAME))
    removed = []
    for kind in _PRUNED_KINDS:
        wanted = {(o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects if o["kind"] == kind}
        listing = await client.list(resource_path(rbac, kind), label_selector=selector)
        for item in listing.get("items", []):
            meta = item["metadata"]
            key = (meta.get("namespace"), meta["name"])
            owner = (meta.get("annotations") or {}).get(names.ANNOTATION_OWNER)
            if key not in wanted and owner == cluster.ref:
                await client.delete(resource_path(rbac, kind, key[0], key[1]))
                where = f"{key[0]}/{key[1]}" if key[0] else key[1]
                removed.append(f"Deleted stale tenant {kind} {where}")
    return removed


async def cleanup_proxy(ctx: Context, cluster: RemoteTenantCluster) -> list[str]:
    """Removes what was installed on the tenant, then the proxy CA; raises TenantUnavailable when it cannot."""
    if cluster.proxy.mode is not ProxyMode.MANAGED:
        return []
    done: list[str] = []
    pki = await proxy_pki.read(ctx, cluster)
    if pki is not None and ctx.broker_ca_pem is not None:
        client, via = await tenant_client(ctx, cluster, cluster.ca_pem or proxy_pki.trust_bundle(pki))
        objects = render_tenant_proxy(cluster, ctx.settings, serving_cert_pem=pki["tls.crt"],
                                      serving_key_pem=pki["tls.key"], issuer_ca_pem=ctx.broker_ca_pem)
        try:
            async with client:
                # Reverse order: the Deployment goes before the RBAC it uses; the Namespace last.
                for obj in reversed(objects):
                    meta = obj["metadata"]
                    if await delete_if_owned(client, obj["apiVersion"], obj["kind"], meta.get("namespace"),
                                             meta["name"], cluster.ref):
                        done.append(f"Deleted tenant {obj['kind']} {meta['name']} (via {via})")
        except API_ERRORS as e:
            raise tenant_error(e, via) from None
    return done + await proxy_pki.delete(ctx, cluster)
