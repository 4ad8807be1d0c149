"""Shared fixtures: two real local clusters (control plane + tenant) per test session."""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from keyless.envtest import binaries
from keyless.envtest.cluster import LocalCluster, start_clusters

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
TESTDATA = SHARED / "testdata"


def pytest_configure(config):
    config.addinivalue_line("markers", "cluster: needs the local kube-apiserver + etcd")
    config.addinivalue_line("markers", "node: needs a real test node (root, containerd, runc, CNI plugins)")


@pytest.fixture(scope="session")
def run_dir():
    path = Path(tempfile.mkdtemp(prefix="keyless-test-"))
    yield path
    if os.environ.get("KEYLESS_KEEP_RUN_DIR") != "1":
        shutil.rmtree(path, ignore_errors=True)


_started: list[LocalCluster] = []


@pytest.fixture(scope="session")
def clusters(run_dir):
    """The control-plane cluster and one tenant cluster, started side by side."""
    control = LocalCluster("control", run_dir / "control")
    tenant = LocalCluster("tenant", run_dir / "tenant")
    start_clusters([control, tenant])
    _started.extend([control, tenant])
    yield control, tenant
    for c in (control, tenant):
        c.stop()


def started(cluster: LocalCluster) -> LocalCluster:
    """Registers a cluster a module started itself, so failing tests show its logs too."""
    _started.append(cluster)
    return cluster


@pytest.fixture(scope="session")
def control_plane(clusters) -> LocalCluster:
    return clusters[0]


@pytest.fixture(scope="session")
def tenant_cluster(clusters) -> LocalCluster:
    return clusters[1]


def api_client(cluster: LocalCluster):
    from kubernetes import config

    return config.new_client_from_config(config_file=str(cluster.kubeconfig))


@pytest.fixture(scope="session")
def control_api(control_plane):
    client = api_client(control_plane)
    yield client
    client.close()


@pytest.fixture(scope="session")
def tenant_api(tenant_cluster):
    client = api_client(tenant_cluster)
    yield client
    client.close()


def _new_namespace(client) -> str:
    from kubernetes import client as k

    name = f"t-{uuid.uuid4().hex[:8]}"
    k.CoreV1Api(client).create_namespace(k.V1Namespace(metadata=k.V1ObjectMeta(name=name)))
    return name


@pytest.fixture
def namespace(control_api):
    """A fresh namespace on the control plane, deleted after the test."""
    from kubernetes import client as k

    name = _new_namespace(control_api)
    yield name
    k.CoreV1Api(control_api).delete_namespace(name)


@pytest.fixture(scope="session")
def node_network():
    """One slot of test-node networking for the whole run (root only). Without node support the
    node tests are skipped with the reason; KEYLESS_REQUIRE_NODE=1 (CI) turns that into a failure."""
    from keyless.envtest.network import NodeNetwork, NodeUnavailable

    try:
        network = NodeNetwork.acquire()
    except NodeUnavailable as e:
        if os.environ.get("KEYLESS_REQUIRE_NODE") == "1":
            pytest.fail(f"test nodes are required here (KEYLESS_REQUIRE_NODE=1) but unavailable: {e}")
        pytest.skip(f"test nodes unavailable: {e}")
    yield network
    problems = network.release()
    assert not problems, f"node teardown left state behind: {problems}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call" and report.failed and _started:
        # Show what the API servers said; the logs stay in the run dir for a closer look.
        report.sections.append(("local cluster logs", "\n".join(c.logs(25) for c in _started)))
    return report


def require_binary(component: str):
    """Skip marker for tests that need an optional binary (with the reason it is missing)."""
    try:
        binaries.find(component)
        return pytest.mark.skipif(False, reason="")
    except binaries.BinaryMissing as e:
        return pytest.mark.skipif(True, reason=str(e))
