"""tools/build-binaries.sh fails clearly instead of hanging or half-building."""
from __future__ import annotations

import os
import shutil
import subprocess

from .conftest import ROOT

SCRIPT = ROOT / "tools" / "build-binaries.sh"


def _path_without_go() -> str:
    keep = [d for d in os.environ.get("PATH", "").split(":") if d and not (os.path.exists(os.path.join(d, "go")))]
    return ":".join(keep or ["/usr/bin", "/bin"])


def test_missing_go_is_reported_with_what_to_install(tmp_path):
    env = {**os.environ, "PATH": _path_without_go(), "KEYLESS_BIN_CACHE": str(tmp_path / "bin")}
    assert shutil.which("go", path=env["PATH"]) is None
    result = subprocess.run(["bash", str(SCRIPT), "etcd"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "'go' is not on PATH" in result.stderr and "Go >= 1.26" in result.stderr


def test_a_failed_build_names_the_component_and_its_log(tmp_path):
    # An etcd version that does not exist: the module download fails fast and the log is shown.
    env = {**os.environ, "KEYLESS_BIN_CACHE": str(tmp_path / "bin"), "KEYLESS_BUILD_DIR": str(tmp_path / "build"),
           "KEYLESS_ETCD_VERSION": "v3.6.999"}
    result = subprocess.run(["bash", str(SCRIPT), "etcd"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "building etcd-tidy FAILED" in result.stderr
    assert str(tmp_path / "build" / "logs" / "etcd-tidy.log") in result.stderr
    assert not (tmp_path / "bin" / "etcd-v3.6.999").exists()


def test_unknown_component_is_refused():
    result = subprocess.run(["bash", str(SCRIPT), "kube-scheduler"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "unknown component 'kube-scheduler'" in result.stderr
