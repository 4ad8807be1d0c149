"""A real node for a local test cluster: containerd + runc + CNI bridge, kubelet and kube-proxy.

Facts behind the configuration are in ../shared/recipes/node/README.md. Each node runs in its own
network namespace (see network.py), PID namespace and mount namespace (node_init.py); the harness
owns its lifecycle like the API servers': `start()` returns once the Node is Ready, `stop()` kills
every process of the node and removes what it left on the host.
"""
from __future__ import annotations

import base64
import json
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from .. import pki
from . import binaries, images
from .network import NodeAddresses, NodeNetwork

PAUSE_IMAGE = "localhost/keyless/pause:v1"
PROXY_IMAGE_REPOSITORY = "localhost/keyless/kube-oidc-proxy"

# Global paths the kubelet, containerd and the CNI plugins always use: each node gets its own copy.
_PRIVATE_PATHS = {
    "/var/lib/kubelet": "kubelet",
    "/var/log/pods": "pod-logs",
    "/var/log/containers": "container-logs",
    "/run/containerd": "run-containerd",
    "/var/lib/cni": "cni-state",
}


class NodeStartError(RuntimeError):
    """The node did not become Ready; the message carries its components' log tails."""


def image_cache() -> Path:
    path = binaries.cache_dir().parent / "images"
    path.mkdir(parents=True, exist_ok=True)
    return path


def proxy_image() -> str:
    """The kube-oidc-proxy image name the nodes hold (tagged with the source revision)."""
    return f"{PROXY_IMAGE_REPOSITORY}:{binaries.VERSIONS['kube-oidc-proxy']}"


def coredns_image() -> str:
    return f"localhost/keyless/coredns:{binaries.VERSIONS['coredns']}"


def redis_image() -> str:
    return f"localhost/keyless/redis:{binaries.VERSIONS['redis']}"


def image_archive(name: str, component: str, path: str, user: str) -> Path:
    """An OCI archive holding one cached binary at `path` (rebuilt when the binary is newer)."""
    binary = binaries.find(component)
    archive = image_cache() / f"{name.replace('/', '_').replace(':', '_')}.tar"
    if not archive.exists() or archive.stat().st_mtime < binary.stat().st_mtime:
        images.write_oci_archive(images.static_binary_image(name, binary, path=path, user=user), archive)
    return archive


def ensure_images(*, dns: bool = False) -> list[Path]:
    """The images every node imports: pause, kube-oidc-proxy, and CoreDNS with cluster DNS."""
    archives = [image_archive(PAUSE_IMAGE, "pause", "/pause", "65535:65535"),
                image_archive(proxy_image(), "kube-oidc-proxy", "/usr/local/bin/kube-oidc-proxy", "65532:65532")]
    if dns:
        archives.append(image_archive(coredns_image(), "coredns", "/coredns", "65532:65532"))
    return archives


def redis_archive() -> Path:
    """Our Redis (miniredis) as an image for Argo CD's own manifests; it takes redis-server's options."""
    return image_archive(redis_image(), "redis", "/usr/local/bin/redis-server", "999:999")


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"(no log at {path})"


@dataclass
class LocalNode:
    """One node of `cluster`, in the network namespace `addresses` names."""

    cluster: "object"  # LocalCluster (import cycle)
    network: NodeNetwork
    addresses: NodeAddresses
    # OCI archives imported at start besides pause and kube-oidc-proxy (e.g. the Keyless image)
    extra_images: tuple[Path, ...] = ()
    # Cluster DNS (CoreDNS as a Deployment, Service kube-system/kube-dns at .10 of the Service range)
    dns: bool = False

    def __post_init__(self) -> None:
        self.dir = Path(self.cluster.dir) / "node"
        self.name = f"{self.cluster.name}-node"
        self.process = None

    def log_path(self, component: str) -> Path:
        return self.dir / f"{component}.log"

    # ---- configuration (pure file writing) -------------------------------------------------------
    def _kubeconfig(self, user: str, cert: pki.KeyPair) -> Path:
        b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
        config = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "local", "cluster": {"server": self.cluster.server,
                                                       "certificate-authority-data": b64(self.cluster.ca_pem)}}],
            "users": [{"name": user, "user": {"client-certificate-data": b64(cert.cert_pem),
                                              "client-key-data": b64(cert.key_pem)}}],
            "contexts": [{"name": "local", "context": {"cluster": "local", "user": user}}],
            "current-context": "local",
        }
        path = self.dir / f"{user}.kubeconfig"
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    def _write_configuration(self, archives: list[Path]) -> Path:
        a, d = self.addresses, self.dir
        for sub in ("containerd/root", "containerd/state", "cni/net.d", "pki", *_PRIVATE_PATHS.values()):
            (d / sub).mkdir(parents=True, exist_ok=True)
        ca = pki.KeyPair(self.cluster.ca_pem, (self.cluster.dir / "pki" / "ca.key").read_bytes())
        kubelet_client = pki.issue_certificate(ca, f"system:node:{self.name}", organizations=("system:nodes",),
                                               client=True)
        proxy_client = pki.issue_certificate(ca, "system:kube-proxy", client=True)
        serving = pki.issue_certificate(ca, self.name, server=True, dns_names=(self.name,), ip_addresses=(a.node_ip,))
        (d / "pki" / "kubelet.crt").write_bytes(serving.cert_pem)
        (d / "pki" / "kubelet.key").write_bytes(serving.key_pem)
        (d / "pki" / "ca.crt").write_bytes(self.cluster.ca_pem)
        socket = d / "containerd" / "containerd.sock"
        (d / "containerd" / "config.toml").write_text(_containerd_config(d, socket))
        (d / "cni" / "net.d" / "10-keyless.conflist").write_text(json.dumps({
            "cniVersion": "0.4.0", "name": "keyless",
            "plugins": [{"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False,
                         "hairpinMode": True,
                         "ipam": {"type": "host-local", "ranges": [[{"subnet": a.pod_cidr}]],
                                  "routes": [{"dst": "0.0.0.0/0"}]}}],
        }, indent=2))
        kubelet_config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "cgroupDriver": "cgroupfs", "cgroupRoot": f"/{a.cgroup_name}",
            "failCgroupV1": False, "failSwapOn": False,
            "containerRuntimeEndpoint": f"unix://{socket}",
            "address": a.node_ip, "port": 10250, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": 10248,
            "tlsCertFile": str(d / "pki" / "kubelet.crt"), "tlsPrivateKeyFile": str(d / "pki" / "kubelet.key"),
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(d / "pki" / "ca.crt")}},
            "authorization": {"mode": "Webhook"},
            "clusterDomain": "cluster.local", "resolvConf": "/etc/resolv.conf",
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "2%", "imagefs.available": "2%",
                             "nodefs.inodesFree": "2%"},
            "imageGCHighThresholdPercent": 99, "imageGCLowThresholdPercent": 98,
            "serializeImagePulls": False, "registerNode": True, "maxPods": 40,
            "syncFrequency": "10s", "nodeStatusUpdateFrequency": "5s",
        }
        if self.dns:
            kubelet_config["clusterDNS"] = [a.service_ip(DNS_SERVICE_HOST)]
        (d / "kubelet.yaml").write_text(yaml.safe_dump(kubelet_config))
        init = {
            "binds": [[str(d / sub), path] for path, sub in _PRIVATE_PATHS.items()],
            "containerd_socket": str(socket),
            "containerd": {"args": ["containerd", "--config", str(d / "containerd" / "config.toml")],
                           "log": str(self.log_path("containerd"))},
            "ctr": ["ctr", "--address", str(socket), "--namespace", "k8s.io"],
            "images": [str(p) for p in archives],
            "kubelet": {"args": [str(binaries.find("kubelet")), f"--config={d / 'kubelet.yaml'}",
                                 f"--kubeconfig={self._kubeconfig('kubelet', kubelet_client)}",
                                 f"--hostname-override={self.name}", f"--node-ip={a.node_ip}", "--v=1"],
                        "log": str(self.log_path("kubelet"))},
            "kube-proxy": {"args": [str(binaries.find("kube-proxy")),
                                    f"--kubeconfig={self._kubeconfig('kube-proxy', proxy_client)}",
                                    f"--hostname-override={self.name}", f"--cluster-cidr={a.pod_cidr}",
                                    "--proxy-mode=iptables",
                                    # 0 = leave the host-wide conntrack settings alone
                                    "--conntrack-max-per-core=0", "--conntrack-tcp-timeout-established=0",
                                    "--conntrack-tcp-timeout-close-wait=0",
                                    "--metrics-bind-address=127.0.0.1:10249",
                                    "--healthz-bind-address=127.0.0.1:10256", "--v=1"],
                           "log": str(self.log_path("kube-proxy"))},
        }
        path = d / "init.json"
        path.write_text(json.dumps(init, indent=2))
        return path

    # ---- lifecycle -------------------------------------------------------------------------------
    def launch(self) -> None:
        """Creates the node's namespaces and starts its PID 1 (returns at once; see wait_ready)."""
        from .cluster import start_process

        archives = ensure_images(dns=self.dns) + [Path(p) for p in self.extra_images]
        for path in _PRIVATE_PATHS:  # mount points must exist on the host; they stay empty there
            Path(path).mkdir(parents=True, exist_ok=True)
        config = self._write_configuration(archives)
        self.network.attach(self.addresses)
        self.process = start_process(
            # nsenter, not `ip netns exec`: the latter remounts /sys, hiding the cgroup mounts the kubelet needs.
            ["nsenter", f"--net=/run/netns/{self.addresses.netns}",
             "unshare", "--pid", "--fork", "--kill-child", "--mount", "--propagation", "private", "--mount-proc",
             sys.executable, "-m", "keyless.envtest.node_init", config],
            self.log_path("init"),
        )

    def _get_node(self) -> dict:
        context = ssl.create_default_context(cafile=str(self.cluster.dir / "pki" / "ca.crt"))
        p = self.cluster.dir / "pki"
        context.load_cert_chain(str(p / "admin.crt"), str(p / "admin.key"))
        with urllib.request.urlopen(f"{self.cluster.server}/api/v1/nodes/{self.name}", context=context,
                                    timeout=5) as response:
            return json.loads(response.read())

    def ready(self) -> bool:
        try:
            node = self._get_node()
        except Exception:
            return False
        return any(c.get("type") == "Ready" and c.get("status") == "True"
                   for c in (node.get("status") or {}).get("conditions") or ())

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.process is None or self.process.poll() is not None:
                raise NodeStartError(f"node {self.name} stopped during start-up\n{self.logs()}")
            if time.monotonic() > deadline:
                raise NodeStartError(f"node {self.name} not Ready in {timeout:.0f}s\n{self.logs()}")
            time.sleep(0.2)

    def logs(self, lines: int = 25) -> str:
        return "\n".join(f"----- {self.name} {c} ({self.log_path(c)}) -----\n{_tail(self.log_path(c), lines)}"
                         for c in ("init", "containerd", "kubelet", "kube-proxy"))

    def stop(self) -> list[str]:
        """Kills every process of the node and removes its namespaces and cgroups."""
        from .cluster import stop_process

        if self.process is not None:
            stop_process(self.process, grace=15.0)
            self.process = None
        return self.network.detach(self.addresses)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _init_pid(self) -> int:
        """PID (on the host) of the node's PID 1: the child unshare forked."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        return int(children[0])

    def run_in_node(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Runs a command inside the node's network and mount namespaces (e.g. ctr, crictl)."""
        return subprocess.run(["nsenter", "-t", str(self._init_pid()), "--net", "--mount", *args],
                              capture_output=True, text=True, timeout=timeout)

    def import_image(self, archive: Path) -> None:
        result = self.run_in_node("ctr", "--address", str(self.dir / "containerd" / "containerd.sock"),
                                  "--namespace", "k8s.io", "images", "import", str(archive))
        if result.returncode != 0:
            raise NodeStartError(f"importing {archive} into {self.name} failed: {result.stderr.strip()}")


DNS_SERVICE_HOST = 10


def coredns_objects(cluster_ip: str) -> list[dict]:
    """CoreDNS serving the cluster's Service and Pod names (no upstream: the test network has none)."""
    labels = {"k8s-app": "kube-dns"}
    meta = lambda name: {"name": name, "namespace": "kube-system", "labels": labels}  # noqa: E731
    corefile = (".:1053 {\n    errors\n    health :8080\n    ready :8181\n"
                "    kubernetes cluster.local in-addr.arpa ip6.arpa {\n        pods insecure\n"
                "        fallthrough in-addr.arpa ip6.arpa\n    }\n    cache 30\n    reload\n}\n")
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta("coredns")},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "system:coredns"},
         "rules": [{"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"],
                    "verbs": ["list", "watch"]},
                   {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "system:coredns"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:coredns"},
         "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": "kube-system"}]},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta("coredns"), "data": {"Corefile": corefile}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta("coredns"),
         "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                  "template": {"metadata": {"labels": labels}, "spec": {
                      "serviceAccountName": "coredns", "dnsPolicy": "Default",
                      "securityContext": {"runAsNonRoot": True, "runAsUser": 65532},
                      "containers": [{"name": "coredns", "image": coredns_image(), "imagePullPolicy": "Never",
                                      "args": ["-conf", "/etc/coredns/Corefile"],
                                      "ports": [{"containerPort": 1053, "protocol": "UDP", "name": "dns"},
                                                {"containerPort": 1053, "protocol": "TCP", "name": "dns-tcp"}],
                                      "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181}},
                                      "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns"}]}],
                      "volumes": [{"name": "config", "configMap": {"name": "coredns"}}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": meta("kube-dns"),
         "spec": {"clusterIP": cluster_ip, "selector": labels,
                  "ports": [{"name": "dns", "port": 53, "targetPort": 1053, "protocol": "UDP"},
                            {"name": "dns-tcp", "port": 53, "targetPort": 1053, "protocol": "TCP"}]}},
    ]


def _containerd_config(d: Path, socket: Path) -> str:
    return f"""version = 2
root = "{d / 'containerd' / 'root'}"
state = "{d / 'containerd' / 'state'}"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_apparmor = true
  # root here lacks CAP_SYS_RESOURCE: a negative oom_score_adj would fail every sandbox
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d / 'cni' / 'net.d'}"
"""
