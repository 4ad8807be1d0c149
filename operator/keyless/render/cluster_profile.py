"""Pure rendering of a SIG Multicluster ClusterProfile (KEP-4322, access providers of KEP-5339). No I/O.

A ClusterProfile consumer (multicluster-runtime, Kueue, ...) builds its client from `status.accessProviders`
with `sigs.k8s.io/cluster-inventory-api/pkg/access` and a provider file of its own that maps the provider
name `keyless` to an exec plugin. Two ways to tell that plugin which cluster it is for:

- the `client.authentication.k8s.io/exec` extension (`{"target": ...}`), which client-go hands to the plugin
  as `spec.cluster.config` in KUBERNETES_EXEC_INFO when the provider sets `provideClusterInfo: true`
  (`keyless token` without `--target` reads it);
- KEP-5339's additional-envs extension (`KEYLESS_TARGET`, `KEYLESS_CREDENTIAL_FILE`), passed to the plugin's
  environment when the provider sets `profileSourcedEnvVarsPolicy` (a `sh -c 'cat "$KEYLESS_CREDENTIAL_FILE"'`
  then reads the agent's file). KEP-5339's additional-args extension holds a list, which the published CRD's
  schema (`extension: object`) refuses, so it is not used.
"""
from __future__ import annotations

import copy

from ..model import names
from ..model.conditions import Condition
from ..model.spec import RemoteTenantCluster
from ..settings import OperatorSettings

API_VERSION = "multicluster.x-k8s.io/v1alpha1"
KIND = "ClusterProfile"
PROVIDER_NAME = "keyless"
CLUSTER_MANAGER = "keyless"
LABEL_CLUSTER_MANAGER = "x-k8s.io/cluster-manager"
EXEC_EXTENSION = "client.authentication.k8s.io/exec"
ADDITIONAL_ENVS_EXTENSION = "clusterprofiles.multicluster.x-k8s.io/exec/additional-envs"
CONTROL_PLANE_HEALTHY = "ControlPlaneHealthy"
PROPERTY_TENANT = "keyless.dev/tenant"


def wanted(cluster: RemoteTenantCluster, settings: OperatorSettings) -> bool:
    """--cluster-profiles is on and the manifest did not opt out."""
    return settings.cluster_profiles and cluster.cluster_profile.enabled is not False


def profile_namespace(cluster: RemoteTenantCluster, settings: OperatorSettings) -> str:
    """spec.clusterProfile.namespace, else the operator's --cluster-profile-namespace, else the manifest's own."""
    return cluster.cluster_profile.namespace or settings.cluster_profile_namespace or cluster.namespace


def cluster_profile_name(cluster: RemoteTenantCluster, namespace: str) -> str:
    """The manifest's name in its own namespace; elsewhere (a shared inventory namespace) prefixed with the
    manifest's namespace, as the Argo CD cluster Secrets are."""
    return cluster.name if namespace == cluster.namespace else names.dns_label(cluster.namespace, cluster.name)


def render_cluster_profile(cluster: RemoteTenantCluster, namespace: str) -> dict:
    """The object without status (status is its own subresource, written separately)."""
    labels = {**cluster.ownership_labels(), LABEL_CLUSTER_MANAGER: CLUSTER_MANAGER}
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": cluster_profile_name(cluster, namespace), "namespace": namespace,
                     "labels": labels, "annotations": cluster.ownership_annotations()},
        "spec": {"displayName": cluster.argocd.cluster_name, "clusterManager": {"name": CLUSTER_MANAGER}},
    }


def render_access_provider(cluster: RemoteTenantCluster, ca_data: str | None, credential_dir: str) -> dict:
    """The `keyless` access provider: where the cluster is, the CA to trust, and which target to ask for."""
    target = cluster.target_name
    endpoint: dict = {
        "server": cluster.server.rstrip("/"),
        "extensions": [
            {"name": EXEC_EXTENSION, "extension": {"target": target, "audience": cluster.access.audience}},
            {"name": ADDITIONAL_ENVS_EXTENSION, "extension": {
                "KEYLESS_TARGET": target,
                "KEYLESS_CREDENTIAL_FILE": f"{credential_dir.rstrip('/')}/{target}.json"}},
        ],
    }
    if ca_data:
        endpoint["certificate-authority-data"] = ca_data
    return {"name": PROVIDER_NAME, "cluster": endpoint}


def control_plane_healthy(verified: Condition | None) -> Condition:
    """ClusterProfile's ControlPlaneHealthy, from the operator's own proof of the chain (TokenVerified)."""
    if verified is None:
        return Condition(CONTROL_PLANE_HEALTHY, "Unknown", "NotVerifiedYet",
                         "Keyless has not yet reached the cluster with one of its tokens")
    if verified.is_true:
        return Condition(CONTROL_PLANE_HEALTHY, "True", "Verified",
                         "Keyless reached the cluster's API with a short-lived broker token")
    return Condition(CONTROL_PLANE_HEALTHY, verified.status, verified.reason or "NotVerified", verified.message)


def render_cluster_profile_status(cluster: RemoteTenantCluster, ca_data: str | None, credential_dir: str) -> dict:
    """status without conditions: access providers (and the deprecated credentialProviders, which older
    consumers read), and the tenant as a property."""
    provider = render_access_provider(cluster, ca_data, credential_dir)
    return {
        "accessProviders": [provider],
        "credentialProviders": [copy.deepcopy(provider)],
        "properties": [{"name": PROPERTY_TENANT, "value": cluster.tenant}],
    }
