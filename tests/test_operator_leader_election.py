"""Two operator replicas: exactly one reconciles; when it dies the standby takes over."""
from __future__ import annotations

import json

import pytest

from .helpers import eventually, kubectl
from .operator_fixtures import OperatorProcess, apply, prepare_control_plane, remove_all_remote_tenant_clusters, rtc_manifest

pytestmark = pytest.mark.cluster


def lease_holder(cluster) -> str | None:
    result = kubectl(cluster, "get", "lease", "keyless-operator", "-n", "keyless-system", "-o", "json", check=False)
    if result.returncode != 0:
        return None
    return json.loads(result.stdout)["spec"].get("holderIdentity")


def registered(cluster, namespace, name) -> bool:
    return kubectl(cluster, "get", "secret", "-n", "argocd", f"keyless-{namespace}-{name}", check=False).returncode == 0


def test_only_the_leader_reconciles_and_the_standby_takes_over_when_it_dies(control_plane, run_dir, namespace):
    prepare_control_plane(control_plane)
    first = OperatorProcess(control_plane, run_dir / "leader-a", extra_args=["--leader-election"]).start()
    eventually(lambda: lease_holder(control_plane), timeout=30, message="a leader")
    second = OperatorProcess(control_plane, run_dir / "leader-b", extra_args=["--leader-election"]).start()
    try:
        apply(control_plane, rtc_manifest("elected", namespace, tenant="tenant-le"))
        eventually(lambda: registered(control_plane, namespace, "elected"), timeout=30, message="leader reconciles")
        holder = lease_holder(control_plane)
        assert holder.endswith(f"-{first.process.pid}")
        assert "now leads" in first.log() and "now leads" not in second.log()
        assert "remote_tenant_cluster_event" not in second.log()  # the standby handled nothing

        first.stop()
        eventually(lambda: lease_holder(control_plane).endswith(f"-{second.process.pid}"), timeout=60,
                   interval=1, message="standby took the lease")
        apply(control_plane, rtc_manifest("after-failover", namespace, tenant="tenant-le"))
        eventually(lambda: registered(control_plane, namespace, "after-failover"), timeout=30,
                   message="the new leader reconciles")
    finally:
        remove_all_remote_tenant_clusters(control_plane)
        first.stop()
        second.stop()
