"""The layout's rules hold: no import circles, rooms import only downwards, MLflow only in the registry."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers.paths import REPO

ROOT = REPO
#: pipeline's rooms, each allowed to import only the rooms after it in this order (job -> ... -> data)
LAYERS = ["job", "registry", "quality", "training", "agents", "sim", "data"]
#: modules directly in pipeline/ that the rooms may use; the others there are `python -m pipeline.<name>`
#: command shims, which sit above every room
SHARED = {"pipeline.dataclass_cli", "pipeline.machine"}
#: the one function allowed past FUNCTION_LINES: the training loop, which reads best in one piece
LONG_FUNCTIONS = {"pipeline/training/trainer.py:_fit"}
MODULE_LINES, FUNCTION_LINES = 420, 65


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules) -> set[str]:
    """The modules of `modules` that `path` imports, at the top or inside a function (lazy imports count).
    `from package import module` counts as importing the module, not the package's `__init__`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            subs = {f"{base}.{a.name}" for a in node.names} & set(modules)
            found.update(subs or ({base} & set(modules)))
    # a package's own __init__ (e.g. `from . import __version__`) is its namespace, not a module circle
    return {m for m in found if m != name and not name.startswith(m + ".")}


def _graph() -> dict[str, set[str]]:
    files = sorted([*ROOT.joinpath("pipeline").rglob("*.py"), *ROOT.joinpath("invdyn").rglob("*.py")])
    modules = {_module_name(f): f for f in files}
    return {m: _imports(f, modules) for m, f in modules.items()}


GRAPH = _graph()


def test_no_import_circles():
    """Depth-first search over module imports (lazy ones included): no module reaches itself again."""
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(GRAPH[m]):
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n) :] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "pipeline" and len(parts) > 2 and parts[1] in LAYERS else None


def test_rooms_import_only_downwards():
    bad = []
    for m, deps in GRAPH.items():
        if m.startswith("invdyn"):
            bad += [f"{m} -> {d} (invdyn never imports pipeline)" for d in deps if d.startswith("pipeline")]
            continue
        room = _room(m)
        if room is None:
            continue
        for d in deps:
            other = _room(d)
            if d.startswith("pipeline.") and other is None and d not in SHARED:
                bad.append(f"{m} -> {d} (a room imports a command shim)")
            elif other and other != room and LAYERS.index(other) < LAYERS.index(room):
                bad.append(f"{m} -> {d} ({room} sits below {other})")
    assert not bad, "\n".join(sorted(bad))


def test_mlflow_only_in_the_registry():
    def imports_mlflow(path: Path) -> bool:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "mlflow" for a in node.names):
                return True
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mlflow":
                return True
        return False

    users = [_module_name(p) for p in ROOT.joinpath("pipeline").rglob("*.py") if imports_mlflow(p)]
    assert users and all(_room(m) == "registry" for m in users), users


@pytest.mark.parametrize("package", ["invdyn", "pipeline"])
def test_modules_open_with_a_docstring_and_stay_small(package):
    bad = []
    for path in sorted(ROOT.joinpath(package).rglob("*.py")):
        tree = ast.parse(path.read_text())
        if not ast.get_docstring(tree):
            bad.append(f"{path.relative_to(ROOT)}: no module docstring")
        lines = len(path.read_text().splitlines())
        if lines > MODULE_LINES:
            bad.append(f"{path.relative_to(ROOT)}: {lines} lines (at most {MODULE_LINES})")
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            body = node.body[1:] if ast.get_docstring(node) else node.body
            length = node.end_lineno - body[0].lineno + 1
            where = f"{path.relative_to(ROOT)}:{node.name}"
            if length > FUNCTION_LINES and where not in LONG_FUNCTIONS:
                bad.append(f"{where}: {length} lines of code (at most {FUNCTION_LINES})")
    assert not bad, "\n".join(bad)
