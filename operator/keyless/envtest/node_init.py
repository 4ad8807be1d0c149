"""PID 1 of a test node: private mounts, then containerd, the images, kubelet and kube-proxy.

Started by `LocalNode` inside the node's network namespace and fresh PID + mount namespaces:

    nsenter --net=/run/netns/keyless-s-i unshare --pid --fork --kill-child --mount --propagation private \
        --mount-proc python -m keyless.envtest.node_init <config.json>

Being PID 1 of its own PID namespace is what makes teardown total: when this process dies, the
kernel kills every process of the node (containerd, its shims, every container). Mounts made here
(the bind mounts over the kubelet's and containerd's fixed paths, volumes, overlay snapshots) live in
this mount namespace only and vanish with it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _log(message: str) -> None:
    print(f"node-init: {message}", flush=True)


def _bind(source: str, target: str) -> None:
    Path(source).mkdir(parents=True, exist_ok=True)
    Path(target).mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", source, target], check=True)


def _start(name: str, spec: dict) -> subprocess.Popen:
    log = open(spec["log"], "ab")
    _log(f"starting {name}")
    return subprocess.Popen(spec["args"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**os.environ, **spec.get("env", {})})


def _wait_for_socket(path: str, process: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if process.poll() is not None:
            raise SystemExit(f"node-init: containerd exited with {process.returncode} before serving {path}")
        if time.monotonic() > deadline:
            raise SystemExit(f"node-init: containerd did not create {path} in {timeout:.0f}s")
        time.sleep(0.1)


def main(config_path: str) -> int:
    config = json.loads(Path(config_path).read_text())
    for source, target in config["binds"]:
        _bind(source, target)
    children: dict[str, subprocess.Popen] = {}
    exited: dict[str, int] = {}
    stopping = False

    def stop(signum, _frame) -> None:
        nonlocal stopping
        stopping = True
        for name, process in children.items():
            if name not in exited:
                process.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    children["containerd"] = _start("containerd", config["containerd"])
    _wait_for_socket(config["containerd_socket"], children["containerd"])
    for image in config["images"]:
        result = subprocess.run([*config["ctr"], "images", "import", image], capture_output=True, text=True)
        if result.returncode != 0:
            _log(f"importing {image} failed: {result.stderr.strip()}")
            return 1
        _log(f"imported {image}")
    for name in ("kubelet", "kube-proxy"):
        children[name] = _start(name, config[name])
    _log("node started")

    # PID 1 reaps every orphan (containerd's shims re-parent to us); a main component dying ends
    # the node, which the harness reports with that component's log.
    failed = False
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return 1 if failed else 0
        except InterruptedError:
            continue
        for name, process in children.items():
            if process.pid == pid:
                exited[name] = process.returncode = os.waitstatus_to_exitcode(status)
                if not stopping:
                    _log(f"{name} exited with {exited[name]}; stopping the node")
                    stop(signal.SIGTERM, None)
                    failed = True
                if len(exited) == len(children):
                    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
