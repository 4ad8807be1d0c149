"""The test-node harness itself: nodes of different clusters cannot see each other's files or
addresses, a stopped node leaves nothing on the host, and a run refuses to start on leftovers."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from keyless.envtest import network
from keyless.envtest.cluster import LocalCluster, start_clusters
from keyless.envtest.images import ImageFile, ImageSpec, write_oci_archive

from .conftest import started
from .helpers import eventually, kubectl

pytestmark = [pytest.mark.cluster, pytest.mark.node]


def test_oci_archive_is_reproducible_and_names_the_image(tmp_path):
    spec = ImageSpec(name="localhost/keyless/example:v1", files=(ImageFile("/bin/hello", b"#!x", 0o755),),
                     entrypoint=("/bin/hello",), user="65532:65532")
    first = write_oci_archive(spec, tmp_path / "a.tar").read_bytes()
    second = write_oci_archive(spec, tmp_path / "b.tar").read_bytes()
    assert first == second  # same files, same digest: images are rebuilt only when the binary changes
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        index = json.loads(tar.extractfile("index.json").read())
        manifest_digest = index["manifests"][0]["digest"].split(":")[1]
        manifest = json.loads(tar.extractfile(f"blobs/sha256/{manifest_digest}").read())
        config = json.loads(tar.extractfile(f"blobs/sha256/{manifest['config']['digest'].split(':')[1]}").read())
    assert index["manifests"][0]["annotations"]["io.containerd.image.name"] == "localhost/keyless/example:v1"
    assert config["config"]["User"] == "65532:65532"  # numeric: runAsNonRoot can verify it


def _host_state() -> str:
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    cgroups = [str(p) for h in network.cgroup_hierarchies() for p in h.glob(f"{network.NETNS_PREFIX}*")]
    return links + netns + "\n".join(cgroups)


def test_two_nodes_are_isolated_and_a_stopped_node_leaves_nothing_behind(node_network, run_dir):
    one = started(LocalCluster("iso-one", run_dir / "iso-one", controller_manager=True, node_network=node_network))
    two = started(LocalCluster("iso-two", run_dir / "iso-two", controller_manager=True, node_network=node_network))
    start_clusters([one, two], timeout=240)
    try:
        a, b = one.node.addresses, two.node.addresses
        assert a.netns != b.netns and a.pod_cidr != b.pod_cidr and a.service_cidr != b.service_cidr
        # Each node has its own copy of the kubelet's fixed paths: the other node's Pods are not there.
        for cluster in (one, two):
            kubectl(cluster, "run", "probe", "--image=localhost/keyless/pause:v1", "--restart=Never")
        for cluster in (one, two):
            eventually(lambda c=cluster: kubectl(c, "get", "pod", "probe", "-o", "jsonpath={.status.phase}").stdout
                       == "Running", timeout=90, message=f"{cluster.name} probe Pod running")
        uid_one = kubectl(one, "get", "pod", "probe", "-o", "jsonpath={.metadata.uid}").stdout
        uid_two = kubectl(two, "get", "pod", "probe", "-o", "jsonpath={.metadata.uid}").stdout
        pods_of_one = set((one.node.dir / "kubelet" / "pods").iterdir())
        assert {p.name for p in pods_of_one} >= {uid_one} and uid_two not in {p.name for p in pods_of_one}
        # On the host the fixed path stays empty: nothing a node did leaked into it.
        assert not list(Path("/var/lib/kubelet").glob("pods/*"))
        # The nodes' iptables live in their own network namespaces, not the host's.
        host_rules = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
        assert "KUBE-SERVICES" not in host_rules
        node_rules = subprocess.run(["ip", "netns", "exec", a.netns, "iptables-save"], capture_output=True, text=True).stdout
        assert "KUBE-SERVICES" in node_rules
    finally:
        one.stop()
    state = _host_state()
    assert a.netns not in state and a.host_veth not in state and a.cgroup_name not in state, state
    assert b.netns in state  # the other node is untouched
    two.stop()
    state = _host_state()
    assert b.netns not in state and b.host_veth not in state, state


def test_a_run_refuses_to_start_on_leftovers_and_says_how_to_remove_them(node_network):
    # A leftover of a slot no live run holds: a node namespace an earlier, killed run never removed.
    leftover = f"{network.NETNS_PREFIX}{network.MAX_SLOTS + 1}-1"
    subprocess.run(["ip", "netns", "add", leftover], check=True)
    try:
        with pytest.raises(network.Leftovers) as refused:
            network.NodeNetwork.acquire()
        message = str(refused.value)
        assert leftover in message and f"ip netns del {leftover}" in message
        assert "keyless.envtest.network --cleanup" in message
        # The cleanup removes only what no live run holds: this run's own slot survives it.
        removed = network.cleanup()
        assert any(leftover in line for line in removed)
        assert not any(f"keyless{node_network.slot}" == line.split()[-1] for line in removed)
        assert network.find_leftovers() == []
    finally:
        subprocess.run(["ip", "netns", "del", leftover], capture_output=True)
    assert subprocess.run(["ip", "link", "show", network.bridge_name(node_network.slot)],
                          capture_output=True).returncode == 0
