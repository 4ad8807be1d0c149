"""The Argo CD harness's own promises, without Argo CD: it reads the agent sidecar from the chart's values
file, and Pod volumes appear at their pod paths (private mounts) or map to the run's folders."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from keyless.envtest.argocd import AgentSidecar, ArgoCD, Mount, in_private_mounts, private_mounts_available
from keyless.envtest.cluster import LocalCluster


@pytest.mark.parametrize("component", ["controller", "applicationSet"])
def test_agent_sidecar_is_read_from_argocd_values_with_the_components_read_only_credentials(component):
    sidecar = AgentSidecar.from_values(component)
    assert sidecar.args[0] == "agent"
    assert sidecar.flag("dir") == "/var/run/keyless/credentials"
    assert sidecar.flag("token-file").startswith("/var/run/secrets/keyless.dev/broker/")
    assert [(m.pod_path, m.read_only) for m in sidecar.component_mounts] == [("/var/run/keyless/credentials", True)]
    assert ("/var/run/keyless/credentials", False) in [(m.pod_path, m.read_only) for m in sidecar.agent_mounts]
    projection = sidecar.broker_token_projection()
    assert projection["audience"] == "keyless-broker" and projection["expirationSeconds"] > 0


def test_pod_paths_map_to_the_runs_folders_without_mount_namespaces(tmp_path):
    argocd = ArgoCD(LocalCluster("control", tmp_path / "control"), tmp_path / "argocd",
                    broker_url="https://127.0.0.1:1", broker_ca_file=tmp_path / "ca.crt")
    argocd.sandboxed = False
    controller_pod = argocd.pods[0]
    argv = argocd._pod_argv(controller_pod, ["keyless", "agent", "--dir=/var/run/keyless/credentials",
                                             "--token-file=/var/run/secrets/keyless.dev/broker/token", "--keep=/tmp/x"],
                            argocd.sidecar.agent_mounts)
    assert argv[2] == f"--dir={argocd.credential_dir}"
    assert argv[3] == f"--token-file={argocd.broker_token_file}"
    assert argocd.broker_token_file == controller_pod.volumes_dir / "keyless-broker-token" / "token"
    assert argv[4] == "--keep=/tmp/x"  # the Pod's /tmp volume is not a prefix to rewrite
    assert argocd.exec_credential_dir == str(argocd.credential_dir)
    assert argocd.operator_args() == [f"--credential-dir={argocd.credential_dir}"]


def test_private_mounts_refuse_a_host_folder_that_the_private_run_would_hide():
    with pytest.raises(ValueError, match="hidden"):
        in_private_mounts(["true"], [Mount(Path("/run/somewhere"), "/var/run/keyless/credentials")])


@pytest.mark.skipif(not private_mounts_available(), reason="mount namespaces need root here")
def test_private_mounts_show_the_folder_at_its_pod_path_read_only_and_leave_the_host_alone(tmp_path):
    (tmp_path / "credential.json").write_text("{}\n")
    argv = in_private_mounts(["sh", "-c", "cat /var/run/keyless/credentials/credential.json; "
                              "touch /var/run/keyless/credentials/new 2>/dev/null && echo writable || echo read-only"],
                             [Mount(tmp_path, "/var/run/keyless/credentials", read_only=True)])
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["{}", "read-only"]
    assert not Path("/var/run/keyless").exists()
