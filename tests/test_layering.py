"""The package's folders are its layers: each imports only the layers below it, and nothing forms a cycle.

Read from the source with ``ast`` (imports inside functions count; ``if TYPE_CHECKING:`` blocks do not),
so the check needs nothing installed and runs in CI with the rest of the suite.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "prefixtune"

# layer -> the layers of ours it may import (besides itself). Leaves first.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "files": {"errors"},
    "core": {"errors", "files"},
    "io": {"core", "errors", "files"},
    "tasks": {"core", "io", "errors", "files"},
    "training": {"core", "io", "tasks", "errors", "files"},
    "serving": {"core", "io", "errors", "files"},
    "server": {"serving", "core", "io", "errors", "files"},
    "__init__": {"core", "serving"},
    "__main__": {"cli"},
    "cli": {"core", "io", "tasks", "training", "serving", "server", "errors", "files"},
    "integrations": {"core", "io", "errors", "files"},
}
# Third-party packages each layer may import: the base install (torch, transformers, safetensors) carries
# core, io and serving; the extras carry the rest ([train]: tasks and training; [serve]: the server).
BASE = {"torch", "transformers", "safetensors"}
THIRD_PARTY: dict[str, set[str]] = {
    "errors": set(), "files": set(), "__init__": set(), "__main__": set(),
    "core": BASE, "io": BASE, "serving": BASE,
    "tasks": BASE | {"tqdm", "sacrebleu", "pycocoevalcap", "datasets", "tokenizers"},
    "training": BASE | {"tqdm", "matplotlib"},
    "server": BASE | {"fastapi", "starlette", "pydantic", "uvicorn"},
    "cli": BASE | {"yaml"},
    "integrations": BASE | {"trl", "lm_eval", "accelerate", "datasets"},
}
# The only modules that reach into transformers' submodules (internals); the rest use its public top level.
TRANSFORMERS_INTERNALS = {"core/inject.py", "core/cache.py", "core/shims.py"}


def _modules() -> dict[str, Path]:
    """Dotted module name (``prefixtune.core.model``) -> file."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path) -> list[tuple[str, int]]:
    """(absolute module name, line) of every runtime import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pytest.fail(f"{path}:{node.lineno}: relative import; write `from prefixtune.... import`")
            found.append((node.module or "", node.lineno))
            if node.module == "prefixtune":  # `from prefixtune import x` may name a subpackage
                found += [(f"prefixtune.{a.name}", node.lineno) for a in node.names]
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps = set()
        for imported, _ in _imports(path):
            if imported.startswith("prefixtune.") and imported in mods and imported != name:
                deps.add(imported)
        graph[name] = deps
    return graph


def test_every_module_belongs_to_a_known_layer():
    unknown = sorted({_layer(m) for m in _modules()} - set(ALLOWED))
    assert not unknown, f"modules outside the known layers {sorted(ALLOWED)}: {unknown}"


def test_each_layer_imports_only_the_layers_below_it():
    errors = []
    for name, path in _modules().items():
        layer = _layer(name)
        for imported, line in _imports(path):
            if imported == "prefixtune" and layer != "__init__":
                errors.append(f"{path.relative_to(PACKAGE)}:{line} imports the package root; import the module")
            if not imported.startswith("prefixtune."):
                continue
            target = imported.split(".")[1]
            if target != layer and target not in ALLOWED[layer]:
                errors.append(f"{path.relative_to(PACKAGE)}:{line}: {layer} may not import {imported}")
    assert not errors, "\n".join(errors)


def test_third_party_imports_match_the_install_extras():
    stdlib = set(sys.stdlib_module_names)
    errors = []
    for name, path in _modules().items():
        layer = _layer(name)
        for imported, line in _imports(path):
            top = imported.split(".")[0]
            if top in stdlib or top == "prefixtune" or not top:
                continue
            if top not in THIRD_PARTY[layer]:
                errors.append(f"{path.relative_to(PACKAGE)}:{line}: {layer} imports {top}, outside its install "
                              f"extra {sorted(THIRD_PARTY[layer])}")
    assert not errors, "\n".join(errors)


def test_only_the_injection_modules_touch_transformers_internals():
    errors = []
    for path in PACKAGE.rglob("*.py"):
        rel = str(path.relative_to(PACKAGE))
        for imported, line in _imports(path):
            if imported.startswith("transformers.") and rel not in TRANSFORMERS_INTERNALS:
                errors.append(f"{rel}:{line} imports {imported}")
    assert not errors, "\n".join(errors)


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep):], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_checker_sees_a_forbidden_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from prefixtune.server import app\n"
                   "def f():\n    from prefixtune.training import loop\n")
    assert _imports(bad) == [("typing", 1), ("prefixtune.training", 5)]
