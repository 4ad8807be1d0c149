"""A kubeconfig from a bootstrap Secret is someone else's text: it must not steer our own credentials."""
from __future__ import annotations

import pytest

from keyless.kube.client import KubeConfig


def kubeconfig(cluster: dict, user: dict) -> dict:
    return {"contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
            "clusters": [{"name": "c", "cluster": {"server": "https://tenant.example.com", **cluster}}],
            "users": [{"name": "u", "user": user}]}


@pytest.mark.parametrize("cluster, user, key", [
    ({}, {"tokenFile": "/var/run/secrets/kubernetes.io/serviceaccount/token"}, "tokenFile"),
    ({"insecure-skip-tls-verify": True}, {"token": "t"}, "insecure-skip-tls-verify"),
    ({"certificate-authority": "/etc/ssl/ca.pem"}, {"token": "t"}, "certificate-authority"),
    ({}, {"client-key": "/var/run/keyless/tls.key", "client-certificate": "/c"}, "client-key"),
    ({}, {"exec": {"command": "sh", "args": ["-c", "cat /etc/shadow"]}}, "exec"),
    ({}, {"auth-provider": {"name": "gcp"}}, "auth-provider"),
])
def test_untrusted_kubeconfig_may_not_point_at_local_files_programs_or_skip_tls(cluster, user, key):
    with pytest.raises(ValueError, match=key):
        KubeConfig.from_kubeconfig_dict(kubeconfig(cluster, user), untrusted=True)


def test_untrusted_kubeconfig_must_use_https():
    data = kubeconfig({}, {"token": "t"})
    data["clusters"][0]["cluster"]["server"] = "http://tenant.example.com"
    with pytest.raises(ValueError, match="https"):
        KubeConfig.from_kubeconfig_dict(data, untrusted=True)


def test_inline_credentials_are_accepted():
    config = KubeConfig.from_kubeconfig_dict(
        kubeconfig({"certificate-authority-data": "Q0E="}, {"client-certificate-data": "Qw==", "client-key-data": "Sw=="}),
        untrusted=True)
    assert config.ca_pem == b"CA" and config.client_key_pem == b"K" and not config.insecure
    assert "Sw==" not in repr(config) and "client_key" not in repr(config)
