"""What Keyless puts in a ClusterProfile and in the Argo CD Secret for sharding, as pure rendering, and how
`keyless token` finds its target when a ClusterProfile consumer runs it. The real consumer (SIG Multicluster's
pkg/access reaching a tenant) is proven in test_cluster_profile_consumer.py."""
from __future__ import annotations

import base64
import json

import pytest

from keyless import pki, tokencmd
from keyless.model.conditions import Condition
from keyless.model.spec import parse
from keyless.render import cluster_profile as render
from keyless.render.argocd import ExecSettings, render_argocd_cluster_secret
from keyless.render.everything import render_manifests
from keyless.settings import OperatorSettings


@pytest.fixture(scope="module")
def ca_data() -> str:
    ca, _ = pki.new_ca("tenant")
    return base64.b64encode(ca.cert_pem).decode()


def manifest(ca_data: str, **spec) -> dict:
    return {"apiVersion": "keyless.dev/v1alpha1", "kind": "RemoteTenantCluster",
            "metadata": {"namespace": "team-a", "name": "prod"},
            "spec": {"tenant": "team-a", "server": "https://prod.example.com", "caData": ca_data,
                     "access": {"clusterRole": "edit"}, "proxy": {"mode": "Direct"}, **spec}}


def test_access_provider_names_the_server_ca_and_target_for_both_plugin_styles(ca_data):
    cluster = parse(manifest(ca_data))
    status = render.render_cluster_profile_status(cluster, cluster.ca_data, "/var/run/keyless/credentials")
    provider = status["accessProviders"][0]
    assert provider["name"] == "keyless"
    assert provider["cluster"]["server"] == "https://prod.example.com"
    assert provider["cluster"]["certificate-authority-data"] == ca_data
    extensions = {e["name"]: e["extension"] for e in provider["cluster"]["extensions"]}
    assert extensions["client.authentication.k8s.io/exec"] == {"target": "team-a.prod",
                                                               "audience": "keyless:team-a:prod"}
    assert extensions["clusterprofiles.multicluster.x-k8s.io/exec/additional-envs"] == {
        "KEYLESS_TARGET": "team-a.prod",
        "KEYLESS_CREDENTIAL_FILE": "/var/run/keyless/credentials/team-a.prod.json"}
    # Every extension is an object: the published CRD's schema refuses anything else there.
    assert all(isinstance(e, dict) for e in extensions.values())
    # Older consumers read the deprecated field: the same provider is there too.
    assert status["credentialProviders"] == status["accessProviders"]
    assert not any(k in json.dumps(status) for k in ("token", "password"))


def test_profile_is_named_for_the_manifest_and_prefixed_outside_its_namespace(ca_data):
    cluster = parse(manifest(ca_data))
    own = render.render_cluster_profile(cluster, "team-a")
    shared = render.render_cluster_profile(cluster, "fleet")
    assert own["metadata"]["name"] == "prod"
    assert shared["metadata"]["name"] == "team-a-prod"
    assert shared["metadata"]["labels"]["x-k8s.io/cluster-manager"] == "keyless"
    assert shared["spec"] == {"displayName": "prod", "clusterManager": {"name": "keyless"}}
    assert shared["metadata"]["annotations"]["keyless.dev/owner"] == "team-a/prod"


def test_control_plane_healthy_follows_token_verified():
    assert render.control_plane_healthy(None).status == "Unknown"
    assert render.control_plane_healthy(Condition("TokenVerified", "True", "Verified")).status == "True"
    failed = render.control_plane_healthy(Condition("TokenVerified", "False", "TokenRejected", "refused"))
    assert (failed.type, failed.status, failed.reason) == ("ControlPlaneHealthy", "False", "TokenRejected")


def test_keyless_render_prints_the_profile_only_when_asked_and_not_when_the_manifest_opts_out(ca_data):
    documents = [manifest(ca_data)]
    kinds = [o["kind"] for o in render_manifests(documents, OperatorSettings())]
    assert "ClusterProfile" not in kinds
    with_profiles = OperatorSettings(cluster_profiles=True, cluster_profile_namespace="fleet")
    profiles = [o for o in render_manifests(documents, with_profiles) if o["kind"] == "ClusterProfile"]
    assert [p["metadata"]["namespace"] for p in profiles] == ["fleet"]
    opted_out = [manifest(ca_data, clusterProfile={"enabled": False})]
    assert "ClusterProfile" not in [o["kind"] for o in render_manifests(opted_out, with_profiles)]


def test_shard_is_written_to_the_argocd_secret_only_when_set(ca_data):
    plain = render_argocd_cluster_secret(parse(manifest(ca_data)), ExecSettings())
    assert "shard" not in plain["data"]
    sharded = render_argocd_cluster_secret(parse(manifest(ca_data, argocd={"shard": 2})), ExecSettings())
    assert base64.b64decode(sharded["data"]["shard"]) == b"2"


def test_token_command_takes_the_target_from_flag_env_or_cluster_info(monkeypatch):
    info = {"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
            "spec": {"interactive": False, "cluster": {"server": "https://x", "config": {"target": "team-a.prod"}}}}
    monkeypatch.delenv(tokencmd.TARGET_ENV, raising=False)
    monkeypatch.setenv("KUBERNETES_EXEC_INFO", json.dumps(info))
    assert tokencmd.resolve_target(None) == "team-a.prod"
    monkeypatch.setenv(tokencmd.TARGET_ENV, "team-a.from-env")
    assert tokencmd.resolve_target(None) == "team-a.from-env"
    assert tokencmd.resolve_target("team-a.flag") == "team-a.flag"
    monkeypatch.delenv(tokencmd.TARGET_ENV)
    monkeypatch.setenv("KUBERNETES_EXEC_INFO", json.dumps({**info, "spec": {"cluster": {"server": "https://x"}}}))
    with pytest.raises(tokencmd.TokenCommandError, match="no target"):
        tokencmd.resolve_target(None)
