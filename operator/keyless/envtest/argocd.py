"""The real Argo CD on loopback, as the Argo CD Keyless serves: Redis, repo-server, application controller and
ApplicationSet controller as host processes against a LocalCluster control plane, with the Keyless agent
beside each controller exactly as charts/keyless/argocd-values.yaml configures the sidecar.

What makes it production-shaped rather than a stand-in:
- Argo CD's own CRDs and its own RBAC for the controllers (read from the argo-cd module the binary was
  built from), and each controller authenticates as its ServiceAccount with a token bound to a Pod object
  (what the kubelet would mount): `system:serviceaccount:argocd:argocd-application-controller`.
- Each agent runs with the sidecar's exact arguments and volume mounts from argocd-values.yaml, with a
  token for the audience that file names, bound to the same Pod as its controller's.
- Pod volumes are real paths: each controller and each agent run in a private mount namespace where the
  run's directories are bind-mounted at the Pod's mount paths (the credential directory read-only for the
  controllers, as in the values), so the operator renders its default `cat /var/run/keyless/credentials/...`
  and the controller runs exactly that. Where mount namespaces are unavailable (not root), the pod paths
  are rewritten to the host directories and `operator_args()` says which `--credential-dir` to render.
"""
from __future__ import annotations

import functools
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import binaries
from .cluster import LocalCluster, free_port, start_process, stop_process, tail

ROOT = Path(__file__).resolve().parents[3]
VALUES_FILE = ROOT / "charts" / "keyless" / "argocd-values.yaml"
SHARED_ARGOCD_CRDS = ROOT.parent / "shared" / "testdata" / "argocd-crds"
KEYLESS = str(Path(sys.executable).parent / "keyless")

NAMESPACE = "argocd"
CONTROLLER = "argocd-application-controller"
APPSET_CONTROLLER = "argocd-applicationset-controller"
ARGOCD_MODULE = "github.com/argoproj/argo-cd/v3"
AGENT_CONTAINER = "keyless-agent"
RBAC_KINDS = ("ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")


class ArgoCDStartError(RuntimeError):
    """An Argo CD component failed to start; the message names it and shows its log."""


# ---- where Argo CD's own manifests come from ------------------------------------------------------
@functools.cache
def argocd_module_dir() -> Path | None:
    """The argo-cd module the binary was built from (Go's module cache; offline once downloaded)."""
    if not shutil.which("go"):
        return None
    result = subprocess.run(["go", "mod", "download", "-json", f"{ARGOCD_MODULE}@{binaries.VERSIONS['argocd']}"],
                            capture_output=True, text=True, timeout=300, cwd=tempfile.gettempdir(),
                            env={**os.environ, "GOFLAGS": "-mod=mod"})
    if result.returncode != 0:
        return None
    directory = json.loads(result.stdout).get("Dir")
    return Path(directory) if directory and Path(directory).is_dir() else None


def argocd_crd_paths() -> list[Path]:
    """Argo CD's CRDs of the built version, else the copy beside the project (../shared/testdata)."""
    module = argocd_module_dir()
    crds = module / "manifests" / "crds" if module else None
    if crds and crds.is_dir():
        return sorted(p for p in crds.glob("*-crd.yaml"))
    if SHARED_ARGOCD_CRDS.is_dir():
        return sorted(SHARED_ARGOCD_CRDS.glob("*.yaml"))
    raise ArgoCDStartError(f"Argo CD's CRDs not found: neither the argo-cd module ({ARGOCD_MODULE}) in Go's module "
                           f"cache nor {SHARED_ARGOCD_CRDS}")


def _require_module() -> Path:
    module = argocd_module_dir()
    if module is None:
        raise ArgoCDStartError(f"the {ARGOCD_MODULE}@{binaries.VERSIONS['argocd']} module is not in Go's module "
                               "cache; `tools/build-binaries.sh argocd` downloads it")
    return module


def argocd_controller_rbac() -> list[dict]:
    """The ServiceAccounts, Roles and ClusterRoles (and bindings) of the application and ApplicationSet
    controllers, from Argo CD's own install.yaml: the controllers run with their production rights."""
    documents = yaml.safe_load_all((_require_module() / "manifests" / "install.yaml").read_text())
    wanted = []
    for document in documents:
        if not document or document.get("kind") not in RBAC_KINDS:
            continue
        if document["metadata"]["name"] not in (CONTROLLER, APPSET_CONTROLLER):
            continue
        if document["kind"] in ("ServiceAccount", "Role", "RoleBinding"):
            document["metadata"]["namespace"] = NAMESPACE
        wanted.append(document)
    return wanted


# ---- the agent sidecar, read from the chart's values file ----------------------------------------
@dataclass(frozen=True)
class VolumeMount:
    volume: str
    pod_path: str
    read_only: bool = False


@dataclass(frozen=True)
class AgentSidecar:
    """What argocd-values.yaml says about one component's agent: its args, its mounts, the component's own
    mounts of the shared volumes, and the volumes."""

    args: tuple[str, ...]
    env: dict
    agent_mounts: tuple[VolumeMount, ...]
    component_mounts: tuple[VolumeMount, ...]
    volumes: dict

    @classmethod
    def from_values(cls, component: str = "controller", path: Path = VALUES_FILE) -> "AgentSidecar":
        """`component` is the argo-cd chart's key (controller, server, applicationSet); the chart calls the
        ApplicationSet controller's lists extraVolumeMounts/extraVolumes."""
        values = yaml.safe_load(path.read_text())[component]
        agent = next(c for c in values["extraContainers"] if c["name"] == AGENT_CONTAINER)
        mounts_key = "volumeMounts" if "volumeMounts" in values else "extraVolumeMounts"
        volumes_key = "volumes" if "volumes" in values else "extraVolumes"

        def mounts(items) -> tuple[VolumeMount, ...]:
            return tuple(VolumeMount(m["name"], m["mountPath"], bool(m.get("readOnly"))) for m in items)

        return cls(args=tuple(agent["args"]), env={e["name"]: e["value"] for e in agent.get("env", [])},
                   agent_mounts=mounts(agent["volumeMounts"]), component_mounts=mounts(values[mounts_key]),
                   volumes={v["name"]: v for v in values[volumes_key]})

    def flag(self, name: str) -> str:
        prefix = f"--{name}="
        return next(a[len(prefix):] for a in self.args if a.startswith(prefix))

    def broker_token_projection(self) -> dict:
        """The projected serviceAccountToken source (audience, expirationSeconds, path)."""
        for mount in self.agent_mounts:
            projected = self.volumes[mount.volume].get("projected")
            if projected:
                return next(s["serviceAccountToken"] for s in projected["sources"] if "serviceAccountToken" in s)
        raise ValueError("argocd-values.yaml gives the agent no projected ServiceAccount token")


# ---- Pod volumes as private mounts ---------------------------------------------------------------
@dataclass(frozen=True)
class Mount:
    host_path: Path
    pod_path: str
    read_only: bool = False


@functools.cache
def private_mounts_available() -> bool:
    """True where this process may create mount namespaces (root, or a user namespace allowing it)."""
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    return probe.returncode == 0


def _under_run(path: str) -> bool:
    return path.startswith(("/run/", "/var/run/"))


def in_private_mounts(argv: list[str], mounts: list[Mount]) -> list[str]:
    """argv run in a new mount namespace where each host directory appears at its pod path.

    Pod paths under /run get their mount points in a fresh tmpfs over /run (the host's /run is untouched
    and invisible inside), so nothing is created on the host; other pod paths (e.g. /tmp) must exist and
    are mounted last, after every source has been bound. unshare and sh exec: the PID stays the one started.
    """
    lines = ["set -e", "mount -t tmpfs -o mode=0755 keyless-pod /run"]
    for m in sorted(mounts, key=lambda m: not _under_run(m.pod_path)):
        if _under_run(str(m.host_path)):
            raise ValueError(f"host path {m.host_path} would be hidden by the private /run")
        pod = shlex.quote(m.pod_path)
        if _under_run(m.pod_path):
            lines.append(f"mkdir -p {pod}")
        lines.append(f"mount --bind {shlex.quote(str(m.host_path))} {pod}")
        if m.read_only:
            lines.append(f"mount -o remount,bind,ro {pod}")
    lines.append('exec "$@"')
    return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", "\n".join(lines),
            "keyless-pod", *map(str, argv)]


def write_parent_pid_logging_wrapper(directory: Path, command: str, log_path: Path) -> Path:
    """A `command` that appends "<parent pid> <epoch seconds> <args>" to log_path, then execs the real one.

    First on a process's PATH, it proves which process ran an exec credential command.
    """
    real = shutil.which(command)
    if real is None:
        raise FileNotFoundError(command)
    directory.mkdir(parents=True, exist_ok=True)
    wrapper = directory / command
    wrapper.write_text(f'#!/bin/sh\necho "$PPID $(date +%s.%N) $*" >> {shlex.quote(str(log_path))}\n'
                       f'exec {shlex.quote(real)} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


# ---- the harness ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArgoPod:
    """One Argo CD Pod that argocd-values.yaml gives the agent: its ServiceAccount, and where its volumes live."""

    component: str       # the argo-cd chart's values key
    account: str         # ServiceAccount (and Pod name prefix)
    process: str         # the harness's name for the Argo CD process in it
    volumes_dir: Path

    @property
    def name(self) -> str:
        return f"{self.account}-0"

    @property
    def agent(self) -> str:
        return "agent" if self.account == CONTROLLER else f"{self.process}-agent"


@dataclass
class ArgoCD:
    """Argo CD v3 (controller + repo-server + ApplicationSet controller + Redis) and the Keyless agent.

    `start()` installs what Argo CD needs on `control`, starts every process and returns once each
    answers; `stop()` ends them. Logs are in `dir`, `logs()` shows the tails that matter on failure.
    """

    control: LocalCluster
    base_dir: Path
    broker_url: str
    broker_ca_file: Path
    # Directories put first on the application controller's PATH (e.g. wrappers that record exec calls).
    controller_path_prefix: list[Path] = field(default_factory=list)
    # Seconds between the controller's refreshes of each Application (git polling included).
    app_resync_seconds: int = 10
    agent_extra_args: list[str] = field(default_factory=list)
    # Argo CD settings added to argocd-cm.
    settings: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.dir = Path(self.base_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sandboxed = private_mounts_available()
        self._processes: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}
        volumes = self.dir / "pod-volumes"
        self.pods = [ArgoPod("controller", CONTROLLER, "application-controller", volumes / CONTROLLER),
                     ArgoPod("applicationSet", APPSET_CONTROLLER, "applicationset-controller", volumes / APPSET_CONTROLLER)]
        self.sidecars = {pod.component: AgentSidecar.from_values(pod.component) for pod in self.pods}
        self.sidecar = self.sidecars["controller"]
        # The application controller Pod's credential volume, as a host directory.
        self.credential_dir = self.pods[0].volumes_dir / "keyless-credentials"

    # ---- what other parts need to know --------------------------------------------------------
    @property
    def exec_credential_dir(self) -> str:
        """The directory the cluster Secrets' `cat` must read, as the controller sees it."""
        pod_path = next(m.pod_path for m in self.sidecar.component_mounts if m.volume == "keyless-credentials")
        return pod_path if self.sandboxed else str(self.credential_dir)

    def operator_args(self) -> list[str]:
        """Operator flags this run needs: none in a mount namespace (the default path is real)."""
        return [] if self.sandboxed else [f"--credential-dir={self.credential_dir}"]

    @property
    def controller_pid(self) -> int:
        return self.process_pid("application-controller")

    def process_pid(self, component: str) -> int:
        return self._processes[component].pid

    @property
    def agent_health_url(self) -> str:
        """The application controller's agent."""
        return f"http://127.0.0.1:{self.ports['agent-health']}"

    @property
    def broker_token_file(self) -> Path:
        """The controller Pod's projected broker token, as a host file."""
        return self._token_file(self.pods[0])

    def log_path(self, component: str) -> Path:
        return self.dir / f"{component}.log"

    def controller_metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['controller-metrics']}/metrics", timeout=10) as r:
            return r.read().decode()

    def running(self, component: str) -> bool:
        process = self._processes.get(component)
        return process is not None and process.poll() is None

    def logs(self, lines: int = 30) -> str:
        """Tails of components that exited, then the application controller's and the agent's."""
        parts = []
        for component, process in self._processes.items():
            if process.poll() is not None or component in ("application-controller", "agent"):
                parts.append(f"----- argocd {component} ({self.log_path(component)}) -----\n"
                             f"{tail(self.log_path(component), lines)}")
        return "\n".join(parts)

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> "ArgoCD":
        binary = binaries.find("argocd")
        redis = binaries.find("redis")
        try:
            self._install()
            self._start_redis(redis)
            self._start_repo_server(binary)
            self._wait([("redis", self._redis_ready), ("repo-server", self._http_ok("repo-server-metrics", "/metrics"))],
                       timeout)
            self._start_application_controller(binary)
            self._start_applicationset_controller(binary)
            for pod in self.pods:
                self._start_agent(pod)
            self._wait([("application-controller", self._http_ok("controller-metrics", "/metrics")),
                        ("applicationset-controller", self._http_ok("appset-metrics", "/metrics")),
                        *[(pod.agent, self._http_ok(f"{pod.agent}-health", "/healthz")) for pod in self.pods]],
                       timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for component in ("agent", "applicationset-controller-agent", "applicationset-controller",
                          "application-controller", "repo-server", "redis"):
            process = self._processes.pop(component, None)
            if process is not None:
                stop_process(process)

    def restart_agent(self, pod_index: int = 0, down_seconds: float = 0.0, timeout: float = 60.0) -> None:
        """Kills a Pod's agent (SIGKILL, as an OOM kill would) and starts it again on the same volumes."""
        pod = self.pods[pod_index]
        process = self._processes.pop(pod.agent, None)
        if process is not None:
            process.kill()
            process.wait(10)
        time.sleep(down_seconds)
        self._start_agent(pod)
        self._wait([(pod.agent, self._http_ok(f"{pod.agent}-health", "/healthz"))], timeout)

    def stop_component(self, component: str) -> None:
        process = self._processes.pop(component, None)
        if process is not None:
            stop_process(process)

    # ---- installation on the control plane ----------------------------------------------------
    def _kubectl(self, *args: str, input: str | None = None) -> str:
        result = subprocess.run([str(binaries.find("kubectl")), f"--kubeconfig={self.control.kubeconfig}", *args],
                                input=input, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise ArgoCDStartError(f"kubectl {' '.join(args[:3])} ... failed: {result.stderr.strip()}")
        return result.stdout

    def _install(self) -> None:
        crds = argocd_crd_paths()
        self._kubectl("apply", "--server-side", "--force-conflicts", *[f"-f={p}" for p in crds])
        deadline = time.monotonic() + 60
        while True:
            try:
                self._kubectl("wait", "--for=condition=Established", "--timeout=30s",
                              "crd/applications.argoproj.io", "crd/applicationsets.argoproj.io", "crd/appprojects.argoproj.io")
                break
            except ArgoCDStartError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        settings = {"timeout.reconciliation": f"{self.app_resync_seconds}s",
                    # Skip what the tenant identity may not list instead of failing the whole cluster cache:
                    # a least-privilege role (no Secrets, say) is the point of one identity per cluster.
                    "resource.respectRBAC": "normal", **self.settings}
        part_of = {"app.kubernetes.io/part-of": "argocd"}
        objects = [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
            *argocd_controller_rbac(),
            {"apiVersion": "v1", "kind": "ConfigMap",
             "metadata": {"name": "argocd-cm", "namespace": NAMESPACE, "labels": part_of}, "data": settings},
            {"apiVersion": "v1", "kind": "Secret",
             "metadata": {"name": "argocd-secret", "namespace": NAMESPACE, "labels": part_of},
             "stringData": {"server.secretkey": os.urandom(24).hex()}},
            *[self._pod(account) for account in (CONTROLLER, APPSET_CONTROLLER)],
        ]
        self._kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
                      input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))
        self._write_pod_volumes()
        for account, kubeconfig in ((CONTROLLER, "controller.kubeconfig"), (APPSET_CONTROLLER, "appset.kubeconfig")):
            self._write_kubeconfig(self.dir / kubeconfig, self._bound_token(account, audience=None, seconds=3 * 3600))

    def _pod(self, account: str) -> dict:
        # Stored only (no kubelet here): what the controllers' tokens are bound to.
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{account}-0", "namespace": NAMESPACE},
                "spec": {"serviceAccountName": account,
                         "containers": [{"name": "main", "image": f"quay.io/argoproj/argocd:{binaries.VERSIONS['argocd']}"}]}}

    def _bound_token(self, account: str, audience: str | None, seconds: int) -> str:
        args = ["-n", NAMESPACE, "create", "token", account, f"--duration={seconds}s",
                "--bound-object-kind=Pod", f"--bound-object-name={account}-0"]
        if audience:
            args.append(f"--audience={audience}")
        return self._kubectl(*args).strip()

    def _write_kubeconfig(self, path: Path, token: str) -> None:
        import base64

        config = {"apiVersion": "v1", "kind": "Config", "current-context": "control",
                  "clusters": [{"name": "control", "cluster": {
                      "server": self.control.server,
                      "certificate-authority-data": base64.b64encode(self.control.ca_pem).decode()}}],
                  "users": [{"name": "sa", "user": {"token": token}}],
                  "contexts": [{"name": "control", "context": {"cluster": "control", "user": "sa",
                                                               "namespace": NAMESPACE}}]}
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)

    def _write_pod_volumes(self) -> None:
        """Each Pod's volumes: the shared credential dir, the projected broker token, the broker CA, tmp."""
        for pod in self.pods:
            sidecar = self.sidecars[pod.component]
            for name, volume in sidecar.volumes.items():
                directory = pod.volumes_dir / name
                directory.mkdir(parents=True, exist_ok=True)
                directory.chmod(0o700)
                if "configMap" in volume:
                    for item in volume["configMap"]["items"]:
                        (directory / item["path"]).write_bytes(Path(self.broker_ca_file).read_bytes())
            projection = sidecar.broker_token_projection()
            token_file = self._token_file(pod)
            token_file.write_text(self._bound_token(pod.account, projection["audience"], projection["expirationSeconds"]))
            token_file.chmod(0o600)

    def _token_file(self, pod: ArgoPod) -> Path:
        sidecar = self.sidecars[pod.component]
        volume = next(m.volume for m in sidecar.agent_mounts if "projected" in sidecar.volumes[m.volume])
        return pod.volumes_dir / volume / sidecar.broker_token_projection()["path"]

    def _mounts(self, pod: ArgoPod, mounts: tuple[VolumeMount, ...]) -> list[Mount]:
        return [Mount(pod.volumes_dir / m.volume, m.pod_path, m.read_only) for m in mounts]

    def _pod_argv(self, pod: ArgoPod, argv: list[str], mounts: tuple[VolumeMount, ...]) -> list[str]:
        """argv with the Pod's mounts: private mounts when possible, else pod paths rewritten to host dirs."""
        if self.sandboxed:
            return in_private_mounts(argv, self._mounts(pod, mounts))
        # Only the Pod's own paths (under /run) move; others, like the Pod's /tmp, stay the host's. Each
        # argument is rewritten once, by the longest matching pod path.
        remapped = sorted((m for m in self._mounts(pod, mounts) if _under_run(m.pod_path)),
                          key=lambda m: len(m.pod_path), reverse=True)
        rewritten = []
        for arg in map(str, argv):
            name, equals, value = arg.partition("=") if arg.startswith("--") and "=" in arg else ("", "", arg)
            for m in remapped:
                if value == m.pod_path or value.startswith(m.pod_path + "/"):
                    value = str(m.host_path) + value[len(m.pod_path):]
                    break
            rewritten.append(f"{name}{equals}{value}")
        return rewritten

    # ---- processes ----------------------------------------------------------------------------
    def _start(self, component: str, argv: list[str], env: dict | None = None) -> None:
        self._processes[component] = start_process(argv, self.log_path(component), env={**os.environ, **(env or {})})

    def _start_redis(self, redis: Path) -> None:
        self.ports["redis"] = free_port()
        self._start("redis", [redis, "-addr", f"127.0.0.1:{self.ports['redis']}"])

    def _redis_ready(self) -> bool:
        import socket

        with socket.create_connection(("127.0.0.1", self.ports["redis"]), timeout=1) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")  # RESP: miniredis ignores inline commands
            return s.recv(16).startswith(b"+PONG")

    def _argocd_env(self, role: str, kubeconfig: Path | None = None) -> dict:
        tmp = self.dir / f"tmp-{role}"
        tmp.mkdir(exist_ok=True)
        # controller-runtime (ApplicationSet controller) reads KUBECONFIG, not --kubeconfig.
        return {"ARGOCD_BINARY_NAME": role, "TMPDIR": str(tmp), "HOME": str(tmp),
                "KUBECONFIG": str(kubeconfig) if kubeconfig else ""}

    def _start_repo_server(self, binary: Path) -> None:
        # v3.5 calls hack/git-verify-wrapper.sh on every manifest generation, even with GPG off.
        tools = self.dir / "repo-server-tools"
        tools.mkdir(exist_ok=True)
        for script in ("git-verify-wrapper.sh", "gpg-wrapper.sh"):
            shutil.copyfile(_require_module() / "hack" / script, tools / script)
            (tools / script).chmod(0o755)
        self.ports["repo-server"], self.ports["repo-server-metrics"] = free_port(), free_port()
        env = {**self._argocd_env("argocd-repo-server"), "ARGOCD_GPG_ENABLED": "false",
               "PATH": f"{tools}:{os.environ.get('PATH', '')}"}
        self._start("repo-server", [
            binary, "--address", "127.0.0.1", "--port", self.ports["repo-server"],
            "--metrics-address", "127.0.0.1", "--metrics-port", self.ports["repo-server-metrics"],
            "--disable-tls", "--client-ca-path=", "--redis", f"127.0.0.1:{self.ports['redis']}",
            # A pushed commit is seen at the next refresh, not minutes later.
            "--revision-cache-expiration", f"{max(1, self.app_resync_seconds // 2)}s",
            "--logformat", "text"], env)

    def _start_application_controller(self, binary: Path) -> None:
        self.ports["controller-metrics"] = free_port()
        path = ":".join([*(str(p) for p in self.controller_path_prefix), os.environ.get("PATH", "")])
        argv = [binary, "--kubeconfig", self.dir / "controller.kubeconfig", "--namespace", NAMESPACE,
                "--repo-server", f"127.0.0.1:{self.ports['repo-server']}", "--repo-server-plaintext",
                "--redis", f"127.0.0.1:{self.ports['redis']}", "--status-processors", "2",
                "--operation-processors", "2", "--app-resync", str(self.app_resync_seconds), "--app-resync-jitter", "0",
                "--metrics-port", self.ports["controller-metrics"], "--logformat", "text"]
        self._start("application-controller", self._pod_argv(self.pods[0], argv, self.sidecar.component_mounts),
                    {**self._argocd_env("argocd-application-controller"), "PATH": path})

    def _start_applicationset_controller(self, binary: Path) -> None:
        for port in ("appset-metrics", "appset-probe", "appset-webhook"):
            self.ports[port] = free_port()
        argv = [binary, "--kubeconfig", self.dir / "appset.kubeconfig", "--namespace", NAMESPACE,
                "--argocd-repo-server", f"127.0.0.1:{self.ports['repo-server']}", "--repo-server-plaintext",
                "--metrics-addr", f"127.0.0.1:{self.ports['appset-metrics']}",
                "--probe-addr", f"127.0.0.1:{self.ports['appset-probe']}",
                "--webhook-addr", f"127.0.0.1:{self.ports['appset-webhook']}", "--logformat", "text"]
        self._start("applicationset-controller",
                    self._pod_argv(self.pods[1], argv, self.sidecars["applicationSet"].component_mounts),
                    self._argocd_env("argocd-applicationset-controller", self.dir / "appset.kubeconfig"))

    def _start_agent(self, pod: ArgoPod) -> None:
        """The Pod's agent with the values' exact arguments, but the broker's and its health's addresses."""
        sidecar = self.sidecars[pod.component]
        self.ports[f"{pod.agent}-health"] = free_port()
        overrides = {"--broker-url": self.broker_url, "--health-listen": f"127.0.0.1:{self.ports[f'{pod.agent}-health']}"}
        args = []
        for arg in sidecar.args:
            name = arg.split("=", 1)[0]
            args.append(f"{name}={overrides[name]}" if name in overrides else arg)
        argv = [KEYLESS, *args, *self.agent_extra_args]
        self._start(pod.agent, self._pod_argv(pod, argv, sidecar.agent_mounts), sidecar.env)

    # ---- readiness ----------------------------------------------------------------------------
    def _http_ok(self, port_name: str, path: str):
        def check() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[port_name]}{path}", timeout=2) as r:
                return r.status == 200
        return check

    def _wait(self, checks, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = list(checks)
        last = ""
        while pending:
            for component, check in list(pending):
                process = self._processes[component]
                if process.poll() is not None:
                    raise ArgoCDStartError(f"argocd {component} exited with code {process.returncode} during start-up; "
                                           f"log: {self.log_path(component)}\n{tail(self.log_path(component))}")
                try:
                    if check():
                        pending.remove((component, check))
                except OSError as e:
                    last = str(e)
            if pending and time.monotonic() > deadline:
                component = pending[0][0]
                raise ArgoCDStartError(f"argocd {component} not ready in {timeout:.0f}s ({last}); "
                                       f"log: {self.log_path(component)}\n{tail(self.log_path(component))}")
            time.sleep(0.2)
