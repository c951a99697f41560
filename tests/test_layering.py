"""The import layers of DESIGN.md: data flows one way, so lower layers never import higher ones, and no circles.

Layers, bottom to top: util, config < tokenizer, kernels < models < lora, inference < data < train, generate <
eval, export, serve, demo < cli. Imports inside functions count too: a lazy import is still an import.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "nomoat"

_LOW = {"util", "config", "tokenizer", "kernels", "models"}
# Each top-level part of the package and the parts it may import. Stages hand over through files on disk.
ALLOWED: dict[str, set[str] | None] = {
    "util": set(),
    "config": {"util"},
    "tokenizer": {"util"},
    "kernels": {"util", "config"},
    "models": {"util", "config", "kernels"},
    "lora": {"util", "config", "kernels", "models"},
    "inference": {"util", "config", "kernels", "models", "lora"},
    "data": {"util", "config", "tokenizer"},
    "train": _LOW | {"lora", "inference", "data"},
    "generate": _LOW | {"lora", "inference"},
    "eval": _LOW | {"lora", "inference", "data", "generate"},
    "serve": _LOW | {"lora", "inference", "generate"},
    "export": _LOW | {"lora", "inference"},
    "demo": _LOW | {"lora", "inference", "data", "generate", "train", "eval"},
    "synth": _LOW | {"lora", "inference", "data", "generate", "train"},
    "__init__": {"util", "config", "models", "tokenizer", "train"},
    "cli": None,  # the top: may import anything
    "__main__": {"cli"},  # python -m nomoat
}

def _part(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py")


def _import_nodes(path: Path) -> Iterator[ast.Import | ast.ImportFrom]:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path}: use absolute imports (from nomoat.x import y)")
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node


def _imports(path: Path) -> set[str]:
    """The top-level parts of nomoat that a file imports (anywhere in it, functions included)."""
    found: set[str] = set()
    for node in _import_nodes(path):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        for name in names:
            parts = name.split(".")
            if parts[0] == "nomoat" and len(parts) > 1:
                found.add(parts[1])
    return found


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = SRC) -> dict[str, set[str]]:
    """Module -> the modules of the package it imports (`from a import b` names module a.b where b is one)."""
    modules = {_module_name(p, root): p for p in root.rglob("*.py")}
    package = root.name

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets: set[str | None] = set()
        for node in _import_nodes(path):
            if isinstance(node, ast.Import):
                targets |= {resolve(a.name) for a in node.names if a.name.split(".")[0] == package}
            elif node.module and node.module.split(".")[0] == package:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.add(full if full in modules else resolve(node.module))
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The import circles: each strongly connected group of two or more modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def cycle_through(group: set[str], graph: dict[str, set[str]]) -> list[str]:
    """One concrete cycle inside a strongly connected group, for the error message: a -> b -> ... -> a."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth first, back to the start
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError("not a strongly connected group")  # pragma: no cover


def test_every_part_is_known():
    parts = {_part(p) for p in SRC.rglob("*.py")}
    assert parts <= set(ALLOWED), f"add {parts - set(ALLOWED)} to the layer map"


def test_import_layers():
    errors = []
    for path in sorted(SRC.rglob("*.py")):
        part = _part(path)
        allowed = ALLOWED[part]
        if allowed is None:
            continue
        for imported in _imports(path) - allowed - {part, "__init__"}:
            errors.append(f"{path.relative_to(SRC)} imports nomoat.{imported}")
    assert not errors, "layering violations:\n" + "\n".join(errors)


def test_no_import_circles():
    graph = import_graph()
    found = circles(graph)
    shown = [" -> ".join(cycle_through(c, graph)) for c in found]
    assert not shown, "import circles:\n" + "\n".join(shown)


def test_layer_map_rejects_upward_imports(tmp_path):
    """The checker itself can fail: a models file importing serve is caught."""
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from nomoat.serve.app import create_app\n")
    assert _imports(bad) == {"serve"} and "serve" not in ALLOWED["models"]


def test_circle_checker_catches_a_circle(tmp_path):
    """A package where a imports b at the top and b imports a inside a function: the circle is found and named."""
    pkg = tmp_path / "nomoat"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from nomoat.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    import nomoat.c\n")
    (pkg / "c.py").write_text("from nomoat import a\n")
    (pkg / "d.py").write_text("from nomoat.sub.b import f\n")  # imports into the circle, is not part of it
    graph = import_graph(pkg)
    assert graph["nomoat.a"] == {"nomoat.sub.b"} and graph["nomoat.c"] == {"nomoat.a"}
    assert circles(graph) == [{"nomoat.a", "nomoat.sub.b", "nomoat.c"}]
    assert cycle_through(circles(graph)[0], graph) == ["nomoat.a", "nomoat.sub.b", "nomoat.c", "nomoat.a"]
    (pkg / "c.py").write_text("X = 1\n")
    assert circles(import_graph(pkg)) == []
