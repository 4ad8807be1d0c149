"""Local control planes for tests and the demo: etcd + kube-apiserver (+ controller-manager) on loopback.

Like controller-runtime's envtest, but with real TLS, a ServiceAccount issuer and an admin client
certificate, so TokenRequest/TokenReview, RBAC and webhooks behave as in a real cluster. By default
no kubelet runs (Pods are stored, never started); with `node_network` the cluster gets a real node
(kubelet + containerd + kube-proxy, see node.py), a scheduler and the controllers that Deployments,
ServiceAccount tokens and Services need.
"""
from __future__ import annotations

import atexit
import base64
import ctypes
import errno
import os
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .. import pki
from . import binaries

_live_processes: set[subprocess.Popen] = set()
_live_lock = threading.Lock()


class ClusterStartError(RuntimeError):
    """A component failed to start; the message names the component and its log file."""


def _die_with_parent() -> None:
    # Children must never outlive a test run, even when pytest itself is killed.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _kill_all() -> None:
    with _live_lock:
        processes = list(_live_processes)
    for process in processes:
        stop_process(process)


atexit.register(_kill_all)


def start_process(args: list[str], log_path: Path, env: dict | None = None, **kwargs) -> subprocess.Popen:
    """Starts a child in its own process group, output to log_path, tracked for cleanup."""
    log = open(log_path, "ab")
    try:
        process = subprocess.Popen(
            [str(a) for a in args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
            **kwargs,
        )
    finally:
        log.close()
    with _live_lock:
        _live_processes.add(process)
    return process


def stop_process(process: subprocess.Popen, grace: float = 10.0) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(5)
    with _live_lock:
        _live_processes.discard(process)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ensure_port_free(port: int, what: str, host: str = "127.0.0.1") -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ClusterStartError(
                    f"{what}: port {port} on {host} is already in use; stop whatever listens there "
                    f"or let the launcher pick free ports"
                ) from None
            raise


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(text[-lines:])


@dataclass
class LocalCluster:
    """One Kubernetes control plane on loopback. `start()` returns once /readyz answers ok."""

    name: str
    base_dir: Path | None = None
    controller_manager: bool = True
    apiserver_port: int | None = None
    etcd_port: int | None = None
    extra_apiserver_args: list[str] = field(default_factory=list)
    # Files to write into the cluster dir before start.
    files: dict[str, str] = field(default_factory=dict)
    # A structured AuthenticationConfiguration (YAML) for --authentication-config: how a tenant API
    # server trusts the broker directly (Direct mode), and the real token verifier of our tests.
    authentication_config: str | None = None
    # With a NodeNetwork the cluster gets a real node; its API server then listens on the network's
    # host address (Pods cannot reach the host's loopback).
    node_network: "NodeNetwork | None" = None
    node_images: tuple = ()  # extra OCI archives the node imports at start
    cluster_dns: bool = False  # with a node: CoreDNS, so Pods reach Services by name

    def __post_init__(self) -> None:
        if self.base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix=f"keyless-{self.name}-"))
        self.dir = Path(self.base_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._processes: dict[str, subprocess.Popen] = {}
        self.kubeconfig = self.dir / "kubeconfig"
        self.node = None
        self.host = "127.0.0.1"
        if self.node_network is not None:
            from .node import LocalNode

            addresses = self.node_network.allocate(self.name)
            self.host = self.node_network.host_address
            self.node = LocalNode(self, self.node_network, addresses, tuple(self.node_images), self.cluster_dns)

    # ---- paths and identity -------------------------------------------------------------------
    def log_path(self, component: str) -> Path:
        return self.dir / f"{component}.log"

    @property
    def server(self) -> str:
        return f"https://{self.host}:{self.apiserver_port}"

    @property
    def ca_pem(self) -> bytes:
        return (self.dir / "pki" / "ca.crt").read_bytes()

    @property
    def authentication_config_path(self) -> Path:
        return self.dir / "authn" / "authentication-config.yaml"

    @property
    def service_account_issuer(self) -> str:
        return f"https://kubernetes.default.svc/{self.name}"

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self, timeout: float = 90.0) -> "LocalCluster":
        return start_clusters([self], timeout)[0]

    def _prepare(self) -> None:
        binaries.find("etcd"), binaries.find("kube-apiserver")
        self._write_pki()
        files = dict(self.files)
        if self.authentication_config is not None:
            files[str(self.authentication_config_path.relative_to(self.dir))] = self.authentication_config
        for relative, content in files.items():
            target = self.dir / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
        if self.etcd_port is None:
            self.etcd_port = free_port()
        ensure_port_free(self.etcd_port, f"{self.name} etcd")
        if self.apiserver_port is None:
            self.apiserver_port = free_port(self.host)
        ensure_port_free(self.apiserver_port, f"{self.name} kube-apiserver", self.host)

    def stop(self) -> None:
        if self.node is not None and self.node.process is not None:
            self.node.stop()
        for name in ("kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            process = self._processes.pop(name, None)
            if process is not None:
                stop_process(process)

    def restart_apiserver(self, timeout: float = 90.0) -> None:
        """Stops and starts only the API server (etcd keeps the data), e.g. to load new flags."""
        process = self._processes.pop("kube-apiserver", None)
        if process is not None:
            stop_process(process)
        self._launch_apiserver()
        _wait_all([(self, "kube-apiserver", self._apiserver_ready)], time.monotonic() + timeout)

    def restart_etcd(self, down_seconds: float = 0.0, timeout: float = 60.0) -> None:
        """Stops etcd, keeps it down for `down_seconds`, starts it again on the same port and data."""
        process = self._processes.pop("etcd", None)
        if process is not None:
            stop_process(process)
        time.sleep(down_seconds)
        self._launch_etcd()
        _wait_all([(self, "etcd", self._etcd_healthy)], time.monotonic() + timeout)

    def stop_apiserver(self) -> None:
        process = self._processes.pop("kube-apiserver", None)
        if process is not None:
            stop_process(process)

    def running(self, component: str = "kube-apiserver") -> bool:
        process = self._processes.get(component)
        return process is not None and process.poll() is None

    def logs(self, lines: int = 40) -> str:
        """Log tails of the components that are down or were never healthy, else the API server's."""
        parts = []
        for component in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"):
            path = self.log_path(component)
            process = self._processes.get(component)
            alive = process is not None and process.poll() is None
            if component != "kube-apiserver" and alive:
                continue
            if path.exists():
                parts.append(f"----- {self.name} {component} ({path}) -----\n{tail(path, lines)}")
        if self.node is not None and self.node.process is not None:
            if not self.node.ready():
                parts.append(self.node.logs(lines))
            parts.append(self._workload_report(lines))
        return "\n".join(parts)

    def _workload_report(self, lines: int) -> str:
        """The node's Pods and the latest Warning Events, as kubectl shows them (for a failed test)."""
        out = [f"----- {self.name} pods and warning events -----"]
        for args in (("get", "pods", "-A", "-o", "wide"),
                     ("get", "events", "-A", "--field-selector", "type=Warning", "--sort-by=.lastTimestamp")):
            try:
                result = subprocess.run([str(binaries.find("kubectl")), f"--kubeconfig={self.kubeconfig}", *args],
                                        capture_output=True, text=True, timeout=20)
                out.append("\n".join((result.stdout or result.stderr).splitlines()[-lines:]))
            except (OSError, subprocess.SubprocessError) as e:
                out.append(f"kubectl {' '.join(args)}: {e}")
        return "\n".join(out)

    # ---- internals ----------------------------------------------------------------------------
    def _write_pki(self) -> None:
        d = self.dir / "pki"
        if (d / "ca.crt").exists():
            return
        d.mkdir(parents=True, exist_ok=True)
        ca, _ = pki.new_ca(f"keyless-envtest-{self.name}-ca")
        addresses = ["127.0.0.1", "10.0.0.1"]
        if self.node is not None:
            addresses += [self.host, self.node.addresses.kubernetes_service_ip]
        serving = pki.issue_certificate(
            ca, "kube-apiserver", server=True,
            dns_names=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                       "kubernetes.default.svc.cluster.local"),
            ip_addresses=tuple(dict.fromkeys(addresses)),
        )
        admin = pki.issue_certificate(ca, "keyless-admin", organizations=("system:masters",), client=True)
        kubelet_client = pki.issue_certificate(ca, "kube-apiserver-kubelet-client",
                                               organizations=("system:masters",), client=True)
        sa_private, sa_public = pki.new_rsa_key_pem()
        for filename, content in {
            "ca.crt": ca.cert_pem, "ca.key": ca.key_pem,
            "apiserver.crt": serving.cert_pem, "apiserver.key": serving.key_pem,
            "admin.crt": admin.cert_pem, "admin.key": admin.key_pem,
            "kubelet-client.crt": kubelet_client.cert_pem, "kubelet-client.key": kubelet_client.key_pem,
            "sa.key": sa_private, "sa.pub": sa_public,
        }.items():
            path = d / filename
            path.write_bytes(content)
            path.chmod(0o600)

    def _launch_etcd(self) -> None:
        peer_port = free_port()
        client_url = f"http://127.0.0.1:{self.etcd_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        self._processes["etcd"] = start_process(
            [
                binaries.find("etcd"), "--name", "default", "--data-dir", self.dir / "etcd-data",
                "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
                "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
                "--initial-cluster", f"default={peer_url}",
                "--unsafe-no-fsync", "--log-level", "warn",
            ],
            self.log_path("etcd"),
        )

    def _etcd_healthy(self) -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.etcd_port}/health", timeout=1) as r:
            return b'"true"' in r.read()

    def metrics(self) -> str:
        """The API server's own Prometheus metrics (e.g. apiserver_request_total), as admin."""
        with urllib.request.urlopen(f"{self.server}/metrics", context=self._ssl_context(), timeout=10) as r:
            return r.read().decode()

    def _ssl_context(self) -> ssl.SSLContext:
        p = self.dir / "pki"
        context = ssl.create_default_context(cafile=str(p / "ca.crt"))
        context.load_cert_chain(str(p / "admin.crt"), str(p / "admin.key"))
        return context

    def _install_dns(self) -> None:
        from .node import DNS_SERVICE_HOST, coredns_objects

        manifest = yaml.safe_dump_all(coredns_objects(self.node.addresses.service_ip(DNS_SERVICE_HOST)))
        result = subprocess.run([str(binaries.find("kubectl")), f"--kubeconfig={self.kubeconfig}", "apply", "-f", "-"],
                                input=manifest, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise ClusterStartError(f"{self.name}: installing CoreDNS failed: {result.stderr.strip()}")

    def _node_apiserver_args(self) -> list[str]:
        p = self.dir / "pki"
        if self.node is None:
            return [
                "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--authorization-mode=RBAC",
                # No kubelet mounts tokens here, so the ServiceAccount admission plugin would only get in the way.
                "--disable-admission-plugins=ServiceAccount",
                "--endpoint-reconciler-type=none",
            ]
        return [
            f"--bind-address={self.host}", f"--advertise-address={self.host}",
            f"--service-cluster-ip-range={self.node.addresses.service_cidr}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            f"--kubelet-client-certificate={p / 'kubelet-client.crt'}",
            f"--kubelet-client-key={p / 'kubelet-client.key'}",
            "--kubelet-preferred-address-types=InternalIP,Hostname",
        ]

    def _launch_apiserver(self) -> None:
        p = self.dir / "pki"
        self._processes["kube-apiserver"] = start_process(
            [
                binaries.find("kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
                f"--etcd-prefix=/{self.name}",
                f"--secure-port={self.apiserver_port}",
                f"--cert-dir={self.dir / 'apiserver-certs'}",
                f"--tls-cert-file={p / 'apiserver.crt'}", f"--tls-private-key-file={p / 'apiserver.key'}",
                f"--client-ca-file={p / 'ca.crt'}",
                f"--service-account-issuer={self.service_account_issuer}",
                f"--service-account-key-file={p / 'sa.pub'}",
                f"--service-account-signing-key-file={p / 'sa.key'}",
                *self._node_apiserver_args(),
                "--allow-privileged=true",
                "--profiling=false",
                *([f"--authentication-config={self.authentication_config_path}"]
                  if self.authentication_config is not None else []),
                *self.extra_apiserver_args,
            ],
            self.log_path("kube-apiserver"),
        )

    def _apiserver_ready(self) -> bool:
        with urllib.request.urlopen(f"{self.server}/readyz", context=self._ssl_context(), timeout=2) as r:
            return r.status == 200

    def _write_kubeconfig(self) -> None:
        p = self.dir / "pki"
        b64 = lambda name: base64.b64encode((p / name).read_bytes()).decode()  # noqa: E731
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": self.name, "cluster": {
                "server": self.server, "certificate-authority-data": b64("ca.crt")}}],
            "users": [{"name": "admin", "user": {
                "client-certificate-data": b64("admin.crt"), "client-key-data": b64("admin.key")}}],
            "contexts": [{"name": self.name, "context": {"cluster": self.name, "user": "admin"}}],
            "current-context": self.name,
        }
        self.kubeconfig.write_text(yaml.safe_dump(config))
        self.kubeconfig.chmod(0o600)

    def _start_controller_manager(self) -> None:
        # Without a node: only garbage collection and namespace deletion, what owner references and
        # test namespaces need. With a node: what Deployments, Services and Pod tokens need too.
        # Its readiness is not awaited; nothing depends on it at start.
        controllers = ["garbage-collector-controller", "namespace-controller"]
        extra = []
        if self.node is not None:
            controllers += NODE_CONTROLLERS
            p = self.dir / "pki"
            extra = [f"--root-ca-file={p / 'ca.crt'}", f"--service-account-private-key-file={p / 'sa.key'}",
                     "--node-monitor-grace-period=20s"]
        self._processes["kube-controller-manager"] = start_process(
            [
                binaries.find("kube-controller-manager"),
                f"--kubeconfig={self.kubeconfig}",
                f"--controllers={','.join(controllers)}",
                "--leader-elect=false",
                "--secure-port=0",
                "--concurrent-gc-syncs=5",
                *extra,
            ],
            self.log_path("kube-controller-manager"),
        )
        if self.node is not None:
            self._processes["kube-scheduler"] = start_process(
                [binaries.find("kube-scheduler"), f"--kubeconfig={self.kubeconfig}",
                 f"--authentication-kubeconfig={self.kubeconfig}", f"--authorization-kubeconfig={self.kubeconfig}",
                 "--leader-elect=false", "--bind-address=127.0.0.1", f"--secure-port={free_port()}"],
                self.log_path("kube-scheduler"),
            )


# Controllers a cluster with a node needs (names as kube-controller-manager --controllers spells them).
NODE_CONTROLLERS = [
    "serviceaccount-controller", "serviceaccount-token-controller", "root-ca-certificate-publisher-controller",
    "deployment-controller", "replicaset-controller", "node-lifecycle-controller", "endpointslice-controller",
    "endpoints-controller", "taint-eviction-controller", "pod-garbage-collector-controller",
    "clusterrole-aggregation-controller", "disruption-controller", "statefulset-controller", "daemonset-controller",
    "job-controller",
]


def _wait_all(checks, deadline: float) -> None:
    """Polls (cluster, component, check) triples until all pass; fails fast if a process exits."""
    pending = list(checks)
    last_error = ""
    while pending:
        for item in list(pending):
            cluster, component, check = item
            process = cluster._processes[component]
            log = cluster.log_path(component)
            if process.poll() is not None:
                raise ClusterStartError(
                    f"{cluster.name}: {component} exited with code {process.returncode} during start-up; "
                    f"log: {log}\n{tail(log)}"
                )
            try:
                if check():
                    pending.remove(item)
            except Exception as e:  # not up yet
                last_error = str(e)
        if not pending:
            return
        if time.monotonic() > deadline:
            cluster, component, _ = pending[0]
            log = cluster.log_path(component)
            raise ClusterStartError(
                f"{cluster.name}: {component} not ready in time ({last_error}); log: {log}\n{tail(log)}"
            )
        time.sleep(0.1)


def start_clusters(clusters: list[LocalCluster], timeout: float = 90.0) -> list[LocalCluster]:
    """Starts several independent clusters side by side (start-up is mostly waiting).

    Every process is started from the calling thread: the kernel's parent-death signal is tied to
    the thread that forked, so starting them from worker threads would kill them early.
    """
    deadline = time.monotonic() + timeout
    try:
        for c in clusters:
            c._prepare()
        for c in clusters:
            c._launch_etcd()
        _wait_all([(c, "etcd", c._etcd_healthy) for c in clusters], deadline)
        for c in clusters:
            c._launch_apiserver()
        _wait_all([(c, "kube-apiserver", c._apiserver_ready) for c in clusters], deadline)
        for c in clusters:
            c._write_kubeconfig()
            if c.controller_manager or c.node is not None:
                c._start_controller_manager()
        nodes = [c.node for c in clusters if c.node is not None]
        for node in nodes:
            node.launch()
        for node in nodes:
            node.wait_ready(max(deadline - time.monotonic(), 60.0))
        for c in clusters:
            if c.node is not None and c.cluster_dns:
                c._install_dns()
    except BaseException:
        for c in clusters:
            c.stop()
        raise
    return clusters
