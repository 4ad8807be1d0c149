"""Which module may import which (docs/ARCHITECTURE.md): read from every import statement of the package,
at any depth (function-level imports count too), so a layer cannot reach sideways unnoticed."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "operator" / "keyless"

# layer -> the Keyless layers it may import (besides itself). The first matching prefix wins.
LAYERS: list[tuple[str, set[str]]] = [
    ("keyless.model", set()),
    ("keyless.settings", {"keyless.model"}),
    ("keyless.render", {"keyless.model", "keyless.settings"}),
    ("keyless.pki", set()),
    ("keyless.backoff", set()),
    ("keyless.brokerclient", set()),
    ("keyless.kube", {"keyless.model", "keyless.backoff"}),
    ("keyless.guarded_site", set()),
    ("keyless.reconcile", {"keyless.model", "keyless.settings", "keyless.render", "keyless.kube",
                           "keyless.brokerclient", "keyless.pki", "keyless.backoff"}),
    ("keyless.controller", {"keyless.model", "keyless.reconcile", "keyless.backoff"}),
    ("keyless.startup", {"keyless.model", "keyless.settings", "keyless.kube", "keyless.brokerclient",
                         "keyless.reconcile", "keyless.controller"}),
    ("keyless.handlers", {"keyless.model", "keyless.kube", "keyless.startup", "keyless.webhooks"}),
    ("keyless.webhooks", {"keyless.model", "keyless.settings", "keyless.kube", "keyless.guarded_site"}),
    ("keyless.broker", {"keyless.model", "keyless.kube", "keyless.guarded_site"}),
    ("keyless.agent", {"keyless.brokerclient", "keyless.backoff", "keyless.guarded_site"}),
    ("keyless.tokencmd", {"keyless.brokerclient", "keyless.agent", "keyless.model"}),
    # The commands wire components together; only the harness is beyond them.
    ("keyless.cli", {"*"}),
    ("keyless.operator_main", {"*"}),
    ("keyless.render_main", {"keyless.model", "keyless.settings", "keyless.render"}),
    ("keyless.doctor", {"*"}),
    ("keyless.envtest", {"*", "keyless.envtest"}),
]
# Third-party modules a layer must not import: pure layers do no I/O and know no framework.
PURE = {"kopf", "aiohttp", "kubernetes", "jwt", "prometheus_client", "socket", "ssl", "subprocess", "urllib.request"}
FORBIDDEN: list[tuple[str, set[str]]] = [
    ("keyless.model", PURE),
    ("keyless.settings", PURE),
    ("keyless.render", PURE),
    ("keyless.reconcile", {"kopf", "aiohttp", "kubernetes", "jwt", "socket", "subprocess"}),  # API calls: kube/
    ("keyless.brokerclient.reply", PURE),
    ("keyless", {"kubernetes", "jwt"}),  # test-only dependencies
]
HARNESS = ("keyless.envtest",)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module `source` imports, relative imports resolved, at any depth of the syntax tree."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            if node.module:
                found.add(prefix)
            # `from . import x` and `from pkg import submodule` name modules too.
            found.update(f"{prefix}.{alias.name}" for alias in node.names)
    return found


def _layer(module: str, table: list[tuple[str, set[str]]]) -> tuple[str, set[str]] | None:
    if module == "keyless":
        return module, set()  # the package's own __init__: a docstring and the version
    for prefix, value in table:
        if module == prefix or module.startswith(prefix + "."):
            return prefix, value
    return None


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(module: str, imported: set[str]) -> list[str]:
    problems = []
    layer = _layer(module, LAYERS)
    assert layer is not None, f"{module} belongs to no layer: add it to LAYERS and docs/ARCHITECTURE.md"
    own, allowed = layer
    for name in sorted(imported):
        if not _under(name, "keyless") or _under(name, own):
            continue
        if any(_under(name, h) for h in HARNESS) and not any(_under(name, a) for a in allowed - {"*"}):
            problems.append(f"{module} imports the test harness ({name})")
        elif "*" not in allowed and not any(_under(name, a) for a in allowed):
            problems.append(f"{module} imports {name}")
    for prefix, banned in FORBIDDEN:
        if _under(module, prefix):
            problems += [f"{module} imports {name}" for name in sorted(imported)
                         if any(_under(name, b) for b in banned)]
    return problems


def all_modules() -> list[tuple[str, Path]]:
    return sorted((module_name(p), p) for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("module, path", all_modules(), ids=[m for m, _ in all_modules()])
def test_each_module_imports_only_what_its_layer_may(module, path):
    imported = imports_of(path.read_text(), module, path.name == "__init__.py")
    assert violations(module, imported) == []


@pytest.mark.parametrize("module, source, complaint", [
    ("keyless.render.argocd", "from ..reconcile import broker", "imports keyless.reconcile.broker"),
    ("keyless.render.tenant", "def f():\n    from ..kube.apply import apply_if_changed", "imports keyless.kube.apply"),
    ("keyless.model.spec", "import kopf", "imports kopf"),
    ("keyless.reconcile.proxy", "import aiohttp.web\nfrom ..webhooks import policy", "imports keyless.webhooks"),
    ("keyless.broker.app", "from keyless.envtest import cluster", "imports the test harness"),
    ("keyless.agent.keeper", "from ..kube import Kube", "imports keyless.kube"),
])
def test_the_rules_catch_a_render_or_model_module_reaching_for_io(module, source, complaint):
    problems = violations(module, imports_of(source, module))
    assert any(complaint in p for p in problems), problems
