"""The network of local test nodes: a host bridge per run, one network namespace per node.

Layout of one run (a "slot" s in 1..MAX_SLOTS, locked with flock so concurrent runs never share):

    host                                   node i (network namespace keyless-s-i)
    bridge keyless<s>  10.250.s.1/24  <--veth-->  eth0 10.250.s.(10+i)/24, default via 10.250.s.1
      API servers, broker, webhooks              cni0 10.(200+s).i.1/24  (Pods)
      listen on 10.250.s.1                       kube-proxy's iptables, ip_forward=1 (this netns only)
    routes: 10.(200+s).i.0/24 and 10.(230+s).i.0/24 (Services) via 10.250.s.(10+i)

Pods reach the host's services at 10.250.s.1 (never the host's 127.0.0.1); the host reaches Pod IPs
and Service ClusterIPs through the routes, translated by the node's own kube-proxy. Everything a
node changes (iptables, bridges, sysctls, mounts) lives in its namespaces and dies with them; what is
left on the host (the bridge, netns files, cgroups) is removed by `release()`, and a run refuses to
start while an earlier run's leftovers exist (`python -m keyless.envtest.network --cleanup`).
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

STATE_DIR = Path(os.environ.get("KEYLESS_NODE_STATE_DIR", "/run/keyless-envtest"))
MAX_SLOTS = 8
MAX_NODES = 16
NETNS_PREFIX = "keyless-"
CGROUP_ROOT = Path("/sys/fs/cgroup")


class NodeUnavailable(RuntimeError):
    """This machine cannot run test nodes (not root, a missing package); the message says what."""


class Leftovers(RuntimeError):
    """An earlier run left node state behind; the message lists it and how to remove it."""


def _run(*args: str, check: bool = True, netns: str | None = None) -> subprocess.CompletedProcess:
    command = (["ip", "netns", "exec", netns] if netns else []) + list(args)
    result = subprocess.run(command, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def require_node_support() -> None:
    """Raises NodeUnavailable with the reason when test nodes cannot run here."""
    if os.geteuid() != 0:
        raise NodeUnavailable("test nodes need root (network namespaces, bridges, mounts, cgroups)")
    missing = [tool for tool in ("ip", "unshare", "nsenter", "containerd", "runc", "ctr", "iptables", "mount")
               if shutil.which(tool) is None]
    missing += [f"/usr/lib/cni/{p}" for p in ("bridge", "host-local", "loopback") if not Path(f"/usr/lib/cni/{p}").exists()]
    if missing:
        raise NodeUnavailable(f"missing for test nodes: {', '.join(missing)} "
                              f"(tools/install-node-packages.sh installs them)")


def bridge_name(slot: int) -> str:
    return f"keyless{slot}"


def cgroup_hierarchies() -> list[Path]:
    """The cgroup v1 hierarchies (kubelet uses the same relative path in each)."""
    found = []
    for entry in sorted(CGROUP_ROOT.iterdir()) if CGROUP_ROOT.exists() else []:
        if entry.is_dir() and not entry.is_symlink() and entry.name != "unified" and (entry / "cgroup.procs").exists():
            found.append(entry)
    return found


@dataclass(frozen=True)
class NodeAddresses:
    """Everything about one node that must not collide with any other node on this machine."""

    slot: int
    index: int
    name: str  # the node's (and its cluster's) name, for messages

    @property
    def netns(self) -> str:
        return f"{NETNS_PREFIX}{self.slot}-{self.index}"

    @property
    def host_veth(self) -> str:
        return f"kl{self.slot}n{self.index}"

    @property
    def host_address(self) -> str:
        return f"10.250.{self.slot}.1"

    @property
    def node_ip(self) -> str:
        return f"10.250.{self.slot}.{10 + self.index}"

    @property
    def pod_cidr(self) -> str:
        return f"10.{200 + self.slot}.{self.index}.0/24"

    @property
    def service_cidr(self) -> str:
        return f"10.{230 + self.slot}.{self.index}.0/24"

    @property
    def kubernetes_service_ip(self) -> str:
        return f"10.{230 + self.slot}.{self.index}.1"

    def service_ip(self, host: int) -> str:
        """A fixed ClusterIP in this node's Service range (host part 2..254)."""
        if not 2 <= host <= 254:
            raise ValueError("host part must be 2..254 (.1 is the kubernetes Service)")
        return f"10.{230 + self.slot}.{self.index}.{host}"

    @property
    def cgroup_name(self) -> str:
        return self.netns  # /keyless-s-i in every hierarchy


class NodeNetwork:
    """One slot of the machine for one run: its bridge, its nodes' namespaces, routes and cgroups."""

    def __init__(self, slot: int, lock_file):
        self.slot = slot
        self._lock_file = lock_file
        self.nodes: dict[int, NodeAddresses] = {}
        self.attached: dict[int, NodeAddresses] = {}
        self._released = False

    @property
    def host_address(self) -> str:
        """Where host processes (API servers, broker) listen to be reachable from every Pod."""
        return f"10.250.{self.slot}.1"

    # ---- acquisition ---------------------------------------------------------------------------
    @classmethod
    def acquire(cls) -> "NodeNetwork":
        require_node_support()
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        leftovers = find_leftovers()
        if leftovers:
            raise Leftovers(
                "an earlier test run left node state on this machine:\n  " + "\n  ".join(leftovers)
                + f"\nRemove it with: {sys.executable} -m keyless.envtest.network --cleanup")
        for slot in range(1, MAX_SLOTS + 1):
            lock = open(STATE_DIR / f"slot-{slot}.lock", "a+")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                continue
            network = cls(slot, lock)
            try:
                network._create_bridge()
            except BaseException:
                network.release()
                raise
            return network
        raise NodeUnavailable(f"all {MAX_SLOTS} node network slots are in use by other runs")

    def _create_bridge(self) -> None:
        bridge = bridge_name(self.slot)
        self._write_state()
        _run("ip", "link", "add", bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.host_address}/24", "dev", bridge)
        _run("ip", "link", "set", bridge, "up")

    def _write_state(self) -> None:
        state = {"pid": os.getpid(), "slot": self.slot, "nodes": [a.netns for a in self.nodes.values()]}
        (STATE_DIR / f"slot-{self.slot}.json").write_text(json.dumps(state))

    # ---- nodes -----------------------------------------------------------------------------------
    def allocate(self, name: str) -> NodeAddresses:
        index = len(self.nodes) + 1
        if index > MAX_NODES:
            raise NodeUnavailable(f"at most {MAX_NODES} nodes per run")
        addresses = NodeAddresses(self.slot, index, name)
        self.nodes[index] = addresses
        self._write_state()
        return addresses

    def attach(self, a: NodeAddresses) -> None:
        """Creates the node's network namespace, its link to the bridge, routes and cgroups."""
        bridge = bridge_name(self.slot)
        _run("ip", "netns", "add", a.netns)
        peer = f"kl{a.slot}p{a.index}"
        _run("ip", "link", "add", a.host_veth, "type", "veth", "peer", "name", peer)
        _run("ip", "link", "set", a.host_veth, "master", bridge)
        _run("ip", "link", "set", a.host_veth, "up")
        _run("ip", "link", "set", peer, "netns", a.netns)
        _run("ip", "link", "set", peer, "name", "eth0", netns=a.netns)
        _run("ip", "addr", "add", f"{a.node_ip}/24", "dev", "eth0", netns=a.netns)
        _run("ip", "link", "set", "eth0", "up", netns=a.netns)
        _run("ip", "link", "set", "lo", "up", netns=a.netns)
        _run("ip", "route", "add", "default", "via", a.host_address, netns=a.netns)
        # Forwarding between the Pods' bridge and eth0 is a setting of this namespace only.
        _run("sysctl", "-q", "-w", "net.ipv4.ip_forward=1", netns=a.netns)
        _run("sysctl", "-q", "-w", "net.ipv4.conf.all.route_localnet=1", netns=a.netns)
        for cidr in (a.pod_cidr, a.service_cidr):
            _run("ip", "route", "add", cidr, "via", a.node_ip, "dev", bridge)
        # Nodes reach each other's Pods and Services directly over the bridge (a flat routed network,
        # as a CNI gives a real cluster), without the host forwarding anything.
        for other in self.attached.values():
            for here, there in ((a, other), (other, a)):
                for cidr in (there.pod_cidr, there.service_cidr):
                    _run("ip", "route", "add", cidr, "via", there.node_ip, netns=here.netns)
        self.attached[a.index] = a
        for hierarchy in cgroup_hierarchies():
            path = hierarchy / a.cgroup_name
            path.mkdir(exist_ok=True)
            if hierarchy.name == "cpuset":  # a new cpuset is empty until given CPUs and memory nodes
                for knob in ("cpuset.cpus", "cpuset.mems"):
                    (path / knob).write_text((hierarchy / knob).read_text())

    def detach(self, a: NodeAddresses) -> list[str]:
        """Removes what attach() made; returns what could not be removed."""
        problems = []
        bridge = bridge_name(self.slot)
        self.attached.pop(a.index, None)
        for other in self.attached.values():
            for cidr in (a.pod_cidr, a.service_cidr):
                _run("ip", "route", "del", cidr, netns=other.netns, check=False)
        for cidr in (a.pod_cidr, a.service_cidr):
            _run("ip", "route", "del", cidr, "via", a.node_ip, "dev", bridge, check=False)
        problems += remove_cgroup(a.cgroup_name)
        _run("ip", "link", "del", a.host_veth, check=False)
        result = _run("ip", "netns", "del", a.netns, check=False)
        if result.returncode != 0 and "No such file" not in result.stderr:
            problems.append(f"netns {a.netns}: {result.stderr.strip()}")
        return problems

    def release(self) -> list[str]:
        """Tears the slot down (nodes first); safe to call twice."""
        if self._released:
            return []
        self._released = True
        problems = []
        for addresses in list(self.nodes.values()):
            problems += self.detach(addresses)
        _run("ip", "link", "del", bridge_name(self.slot), check=False)
        (STATE_DIR / f"slot-{self.slot}.json").unlink(missing_ok=True)
        fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()
        return problems


def _pids_in(path: Path) -> list[int]:
    pids = []
    for procs in path.rglob("cgroup.procs"):
        try:
            pids += [int(p) for p in procs.read_text().split()]
        except OSError:
            pass
    return pids


def remove_cgroup(name: str, timeout: float = 30.0) -> list[str]:
    """Kills what is left in cgroup /<name> of every hierarchy, then removes it bottom-up.

    Processes killed by the death of a node's PID 1 take a moment to leave their cgroups, so this
    keeps killing and retrying until `timeout`."""
    import time

    problems = []
    deadline = time.monotonic() + timeout
    for hierarchy in cgroup_hierarchies():
        root = hierarchy / name
        while root.exists():
            for pid in _pids_in(root):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            directories = sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
            try:
                for directory in [*directories, root]:
                    if directory.exists():
                        directory.rmdir()
            except OSError as e:
                if time.monotonic() > deadline:
                    problems.append(f"cgroup {root}: {e}")
                    break
                time.sleep(0.2)
    return problems


def _held_slots() -> set[int]:
    held = set()
    for slot in range(1, MAX_SLOTS + 1):
        path = STATE_DIR / f"slot-{slot}.lock"
        if not path.exists():
            continue
        with open(path, "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(lock, fcntl.LOCK_UN)
            except BlockingIOError:
                held.add(slot)
    return held


def _slot_of(name: str) -> int | None:
    digits = "".join(ch if ch.isdigit() else " " for ch in name).split()
    return int(digits[0]) if digits else None


def find_leftovers() -> list[str]:
    """Node state on this machine that no live run holds, each as '<kind> <name>: <how to remove>'."""
    held = _held_slots()
    found = []
    netns = _run("ip", "netns", "list", check=False).stdout.split("\n")
    for line in netns:
        name = line.split(" ")[0]
        if name.startswith(NETNS_PREFIX) and _slot_of(name) not in held:
            found.append(f"network namespace {name}: ip netns del {name}")
    links = _run("ip", "-o", "link", "show", check=False).stdout.splitlines()
    for line in links:
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if (name.startswith("keyless") or (name.startswith("kl") and "n" in name[2:] and name[2:3].isdigit())) \
                and _slot_of(name) not in held:
            found.append(f"network link {name}: ip link del {name}")
    for hierarchy in cgroup_hierarchies():
        for path in hierarchy.glob(f"{NETNS_PREFIX}*"):
            if path.is_dir() and _slot_of(path.name) not in held:
                found.append(f"cgroup {path}: kill its processes, then rmdir it bottom-up")
    for state in STATE_DIR.glob("slot-*.json") if STATE_DIR.exists() else []:
        if _slot_of(state.name) not in held:
            found.append(f"state file {state}: rm {state}")
    return found


def cleanup() -> list[str]:
    """Removes every leftover that no live run holds; returns what it removed."""
    held = _held_slots()
    removed = []
    names = {line.split(" ")[0] for line in _run("ip", "netns", "list", check=False).stdout.splitlines()}
    for name in sorted(n for n in names if n.startswith(NETNS_PREFIX) and _slot_of(n) not in held):
        remove_cgroup(name)
        _run("ip", "netns", "del", name, check=False)
        removed.append(f"network namespace {name}")
    for hierarchy in cgroup_hierarchies():
        for path in hierarchy.glob(f"{NETNS_PREFIX}*"):
            if _slot_of(path.name) not in held:
                remove_cgroup(path.name)
                removed.append(f"cgroup {path.name}")
    for line in _run("ip", "-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if (name.startswith("keyless") or (name.startswith("kl") and name[2:3].isdigit())) and _slot_of(name) not in held:
            _run("ip", "link", "del", name, check=False)
            removed.append(f"network link {name}")
    for state in STATE_DIR.glob("slot-*.json") if STATE_DIR.exists() else []:
        if _slot_of(state.name) not in held:
            state.unlink(missing_ok=True)
            removed.append(f"state file {state}")
    return removed


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m keyless.envtest.network",
                                     description="Lists or removes test-node state left by earlier runs.")
    parser.add_argument("--cleanup", action="store_true", help="remove the leftovers instead of listing them")
    args = parser.parse_args(argv)
    if args.cleanup:
        for line in cleanup():
            print(f"removed {line}")
        return 0
    leftovers = find_leftovers()
    for line in leftovers:
        print(line)
    return 1 if leftovers else 0


if __name__ == "__main__":
    sys.exit(main())
