"""`make demo` runs the whole product end to end with the real Argo CD; this keeps it working."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from .conftest import ROOT, require_binary

pytestmark = [pytest.mark.cluster, pytest.mark.node, pytest.mark.timeout(900), require_binary("argocd"), require_binary("redis")]


def test_demo_shows_argocd_syncing_both_tenants_through_their_real_proxies():
    result = subprocess.run([sys.executable, "-m", "keyless.envtest.demo"], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "Managed mode" in out
    assert out.count("True    Reconciled") == 2
    assert "execProviderConfig: cat /var/run/keyless/credentials/tenant-a.tenant-a-dev.json" in out
    for tenant in ("tenant-a", "tenant-b"):
        # The ApplicationSet's Application for the tenant's cluster, aimed at the proxy's Service (.100 of
        # the tenant's Service range), in the tenant's project, Synced and Healthy.
        assert re.search(rf"{tenant}-dev-hello\s+{tenant}\s+https://10\.\d+\.\d+\.100\s+Synced\s+Healthy\s+[0-9a-f]{{12}}",
                         out), out
        # The tenant's audit log: the proxy impersonated exactly the tenant's one identity.
        assert re.search(rf'{tenant}-dev: ConfigMap hello/hello .*"tenant": "{tenant}".*, created by keyless:{tenant}:argocd$',
                         out, re.M), out
    assert "every time as a child of the application controller" in out
    # kubectl with the Secret's config reaches tenant-a through its proxy, whose Pod logged the request.
    assert "(the proxy's Service)" in out and "kubectl auth whoami -> keyless:tenant-a:argocd" in out
    assert re.search(r"AuSuccess .*URI:/apis/authentication\.k8s\.io/v1/selfsubjectreviews.*inbound:\[keyless:tenant-a:argocd ",
                     out), out
    assert re.search(r"kube-oidc-proxy Pods: kube-oidc-proxy-\S+ on tenant-a-dev-node, kube-oidc-proxy-\S+ on tenant-a-dev-node",
                     out), out
    # It says what it is doing and how far along it is, also while it starts the stack.
    assert [int(n) for n in re.findall(r"==> \[(\d)/9\]", out)] == list(range(1, 10))
    assert re.search(r"\[6/6\] Argo CD \(Redis, repo-server, controllers\) and the agent: up in \d+\.\d s", out), out


def test_demo_runs_from_a_clone_in_an_unrelated_folder_without_the_shared_testdata(tmp_path):
    """The project stands on its own: Argo CD's CRDs come from the Argo CD module it builds, the binaries
    from the cache; nothing is read from ../shared (there is none beside this clone)."""
    clone = tmp_path / "elsewhere" / "keyless"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True, timeout=120)
    assert not (clone.parent / "shared").exists()
    env = {**os.environ, "PYTHONPATH": str(clone / "operator")}
    result = subprocess.run([sys.executable, "-m", "keyless.envtest.demo", "--proxy-mode", "Direct"], cwd=clone, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "tenant-a-dev-hello" in result.stdout and "Synced  Healthy" in result.stdout
