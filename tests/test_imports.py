"""The package's modules import each other without circles, and only the engines package names an engine.

Every import counts, at module level, inside functions and under ``TYPE_CHECKING`` alike: a circle hidden
in a function still ties two modules together.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Import root -> folder (pyproject.toml maps the top-level folders into the package).
ROOTS = {"hyperloop_dist": REPO / "hyperloop_dist", "hyperloop_dist.data": REPO / "data_pipeline",
         "hyperloop_dist.evaluation": REPO / "eval", "hyperloop_dist.cluster": REPO / "cluster"}


def _modules() -> dict[str, Path]:
    found = {}
    for root, folder in ROOTS.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            found[".".join([root, *parts])] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports (a name imported from a package counts as its submodule)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):  # a parent package is not a circle
                out.add(target)
    return out


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def test_no_import_circles() -> None:
    modules = _modules()
    assert len(modules) > 60 and "hyperloop_dist.train.engines.megatron" in modules
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert graph["hyperloop_dist.train.trainer"] >= {"hyperloop_dist.train.engines", "hyperloop_dist.config"}
    circles = _circles(graph)
    detail = "; ".join(" <-> ".join(c) + " (" + ", ".join(f"{a} -> {sorted(graph[a] & set(c))}" for a in c) + ")"
                       for c in circles)
    assert not circles, f"import circles: {detail}"


def test_only_the_engines_name_an_engine() -> None:
    """The trainer and the checkpoint store hold no engine-specific code (comments and docstrings aside)."""
    engine_name = re.compile(r"deepspeed|fsdp|zero_stage|dist_checkpointing", re.IGNORECASE)
    paths = [REPO / "hyperloop_dist/train/trainer.py", REPO / "hyperloop_dist/train/checkpointing.py",
             *sorted((REPO / "hyperloop_dist/checkpoint").glob("*.py"))]
    offending = []
    for path in paths:
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                      and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                text = node.value
            elif isinstance(node, ast.Name):
                text = node.id
            elif isinstance(node, ast.Attribute):
                text = node.attr
            elif isinstance(node, ast.alias):
                text = node.name
            else:
                continue
            if engine_name.search(text):
                offending.append(f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}: {text!r}")
    assert not offending, "engine-specific code outside hyperloop_dist/train/engines/: " + "; ".join(offending)
