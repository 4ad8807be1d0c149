"""What the distribution (and so the image, which installs it) holds: runtime code only, and exactly the
runtime dependencies that code imports."""
from __future__ import annotations

import ast
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from .conftest import ROOT


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> Path:
    """The package as setuptools builds it for the wheel (build_py: modules and package data)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("build")
    shutil.copy(ROOT / "pyproject.toml", source)
    shutil.copytree(ROOT / "operator", source / "operator", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-c", "import setuptools; setuptools.setup()", "-q", "build_py",
                    "--build-lib", str(out)], cwd=source, check=True, capture_output=True)
    return out / "keyless"


def _third_party_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("keyless", "__future__")}


def _requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_the_distribution_ships_no_test_harness_and_its_templates(shipped):
    files = {p.relative_to(shipped).as_posix() for p in shipped.rglob("*") if p.is_file()}
    assert not [f for f in files if f.startswith("envtest/")], "the test harness ships as runtime code"
    assert "demo.py" not in files and "envtest/demo.py" not in files
    assert "cli.py" in files and "reconcile/steps.py" in files
    assert any(f.startswith("render/templates/") and f.endswith(".j2") for f in files)
    # `keyless render` checks manifests with the very CRD and policy the cluster gets (symlinks in the tree)
    for shipped_name, source in (("render/schema/remotetenantclusters.keyless.dev.yaml",
                                  ROOT / "crds" / "remotetenantclusters.keyless.dev.yaml"),
                                 ("render/schema/remotetenantcluster-tenancy.yaml",
                                  ROOT / "policies" / "remotetenantcluster-tenancy.yaml")):
        assert (shipped / shipped_name).read_bytes() == source.read_bytes(), shipped_name


def test_runtime_dependencies_are_exactly_what_runtime_code_imports(shipped):
    imported = set().union(*(_third_party_imports(p) for p in shipped.rglob("*.py")))
    distributions = importlib.metadata.packages_distributions()
    needed = {distributions[name][0].lower().replace("_", "-") for name in imported}
    declared = {_requirement_name(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    assert needed == declared, (f"imported by runtime code but not declared: {sorted(needed - declared)}; "
                                f"declared but not imported: {sorted(declared - needed)}")
