"""Pure rendering of a cluster's broker registration: a Keyless BrokerTarget or an OpenUnison Target."""
from __future__ import annotations

import base64
from typing import Mapping, Sequence

from ..model import names
from ..model.spec import BrokerKind, RemoteTenantCluster
from ..settings import OperatorSettings


def render_target(cluster: RemoteTenantCluster, settings: OperatorSettings) -> dict:
    """The cluster's registration with whichever broker mints its tokens."""
    labels = cluster.ownership_labels()
    annotations = cluster.ownership_annotations()
    if cluster.broker_kind is BrokerKind.OPENUNISON:
        ou = cluster.openunison
        return render_openunison_target(
            name=names.dns_label(cluster.namespace, cluster.name), namespace=ou.namespace,
            url=cluster.server, ca_pem=cluster.ca_pem, issuer=ou.issuer, idp=ou.idp,
            username=cluster.access.username, audience=cluster.access.audience,
            labels=labels, annotations=annotations,
        )
    return render_broker_target(
        name=cluster.target_name, namespace=settings.broker_namespace,
        audience=cluster.access.audience, username=cluster.access.username,
        groups=list(cluster.access.groups), allowed_callers=list(cluster.access.allowed_callers),
        ttl_seconds=cluster.access.token_ttl_seconds,
        cluster_namespace=cluster.namespace, cluster_name=cluster.name,
        labels=labels, annotations=annotations,
    )


def render_broker_target(*, name: str, namespace: str, audience: str, username: str, groups: Sequence[str],
                         allowed_callers: Sequence[str], ttl_seconds: int, cluster_namespace: str,
                         cluster_name: str, labels: Mapping[str, str] | None = None,
                         annotations: Mapping[str, str] | None = None) -> dict:
    spec: dict = {
        "audience": audience,
        "username": username,
        "allowedCallers": sorted(set(allowed_callers)),
        "tokenTTLSeconds": int(ttl_seconds),
        "clusterRef": {"namespace": cluster_namespace, "name": cluster_name},
    }
    if groups:
        spec["groups"] = sorted(set(groups))
    return {
        "apiVersion": names.API_VERSION,
        "kind": "BrokerTarget",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {}),
                     "annotations": dict(annotations or {})},
        "spec": spec,
    }


def render_openunison_target(*, name: str, namespace: str, url: str, ca_pem: bytes | None, issuer: str, idp: str,
                             username: str, audience: str, labels: Mapping[str, str] | None = None,
                             annotations: Mapping[str, str] | None = None) -> dict:
    """OpenUnison's OpenShiftTarget in OIDC token mode (the seed's broker): OpenUnison mints the token."""
    params = [
        {"name": "url", "value": url},
        {"name": "useToken", "value": "true"},
        {"name": "certificate", "value": base64.b64encode(ca_pem).decode() if ca_pem else ""},
        {"name": "tokenType", "value": "oidc"},
        {"name": "oidcIdp", "value": idp},
        {"name": "oidcSub", "value": username},
        {"name": "oidcAudience", "value": audience},
    ]
    return {
        "apiVersion": "openunison.tremolo.io/v1",
        "kind": "Target",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {}),
                     "annotations": {**dict(annotations or {}), "keyless.dev/issuer": issuer}},
        "spec": {
            "className": "com.tremolosecurity.unison.openshiftv3.OpenShiftTarget",
            "params": params,
            "secretParams": [],
            "targetAttributes": [{"name": "sub", "source": "sub", "sourceType": "user"}],
        },
    }
