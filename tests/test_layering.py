"""The import layers of DESIGN.md: data flows one way, so lower layers never import higher ones."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "nomoat"

# Each top-level part of the package and the parts it may import. Stages hand over through files on disk.
ALLOWED: dict[str, set[str]] = {
    "util": set(),
    "config": {"util"},
    "tokenizer": {"util"},
    "kernels": {"util", "config"},
    "models": {"util", "config", "kernels"},
    "lora": {"util", "config", "models"},
    "inference": {"util", "config", "kernels", "models"},
    "data": {"util", "config", "tokenizer"},
    "train": {"util", "config", "models", "lora", "data", "tokenizer"},
    "generate": {"util", "config", "models", "lora", "inference", "tokenizer"},
    "eval": {"util", "config", "models", "lora", "data", "tokenizer", "generate"},
    "serve": {"util", "config", "models", "lora", "tokenizer", "generate"},
    "export": {"util", "config", "models", "lora", "tokenizer"},
    "demo": {"util", "config", "models", "lora", "data", "tokenizer", "generate", "train", "eval"},
    "__init__": {"util", "config", "models", "tokenizer", "train"},
    "cli": None,  # the top: may import anything
    "commands": None,  # subcommands, part of the cli
}


def _part(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path}: use absolute imports (from nomoat.x import y)")
        for name in names:
            parts = name.split(".")
            if parts[0] == "nomoat" and len(parts) > 1:
                found.add(parts[1])
    return found


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


def test_layer_map_rejects_upward_imports(tmp_path):
    """The checker itself can fail: a models file importing serve is caught."""
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from nomoat.serve.app import create_app\n")
    assert _imports(bad) == {"serve"} and "serve" not in ALLOWED["models"]
