"""Ollama's local model store: `ollama:NAME[:TAG]` resolved to its GGUF blob, chat template, system prompt, params.

`resolve(spec)` reads the manifest under `manifests/` of the store (`$OLLAMA_MODELS`, else `~/.ollama/models`) and
returns an `OllamaModel` naming the blobs. It sits at the bottom layer because both the model loader and the
tokenizer resolve `ollama:` names. Nothing is ever downloaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nomoat.util.errors import ModelError

PREFIX = "ollama:"
MEDIA = "application/vnd.ollama.image."
DEFAULT_HOST = "registry.ollama.ai"


class OllamaError(ModelError):
    """An `ollama:` model that is not in the local store, or a store entry that cannot be read."""


@dataclass
class OllamaModel:
    """One model of Ollama's store: its GGUF blob and the text layers that came with it."""

    name: str
    gguf: Path
    template: str | None = None
    system: str | None = None
    params: dict[str, Any] = field(default_factory=dict)


def is_ollama(spec: Any) -> bool:
    """Whether a model argument names an Ollama model (`ollama:NAME[:TAG]`)."""
    return isinstance(spec, str) and spec.startswith(PREFIX)


def store_root() -> Path:
    """The store folder: `$OLLAMA_MODELS`, else `~/.ollama/models`."""
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


def _manifest_path(root: Path, name: str) -> tuple[Path, str]:
    base, _, tag = name.partition(":")
    tag = tag or "latest"
    parts = base.split("/")
    if len(parts) == 1:
        parts = [DEFAULT_HOST, "library", parts[0]]
    elif len(parts) == 2:
        parts = [DEFAULT_HOST, *parts]
    return root / "manifests" / Path(*parts) / tag, f"{base}:{tag}"


def available(root: Path) -> list[str]:
    """Every model the store holds, as `NAME:TAG` (the default host and `library/` left out)."""
    manifests = root / "manifests"
    if not manifests.is_dir():
        return []
    names = []
    for f in sorted(p for p in manifests.rglob("*") if p.is_file()):
        parts = f.relative_to(manifests).parts
        if parts[:2] == (DEFAULT_HOST, "library"):
            parts = parts[2:]
        elif parts[0] == DEFAULT_HOST:
            parts = parts[1:]
        names.append("/".join(parts[:-1]) + ":" + parts[-1])
    return names


def resolve(spec: str) -> OllamaModel:
    """Find `ollama:NAME[:TAG]` in the local store.

    Raises:
        OllamaError: the store or the model is missing (the message lists what the store has), or a blob is gone.
    """
    root = store_root()
    manifest, name = _manifest_path(root, spec.removeprefix(PREFIX))
    if not manifest.is_file():
        have = available(root)
        listed = ", ".join(have) if have else "nothing"
        raise OllamaError(
            f"Ollama model {name!r} is not in the local store {root} (it has: {listed})",
            hint="nomoat never downloads: run `ollama pull` first, or set OLLAMA_MODELS to the store's folder",
        )
    try:
        layers = json.loads(manifest.read_text(encoding="utf-8")).get("layers", [])
    except (OSError, json.JSONDecodeError) as e:
        raise OllamaError(f"{manifest}: unreadable Ollama manifest ({e})") from e
    found: dict[str, Path] = {}
    for layer in layers:
        kind = str(layer.get("mediaType", "")).removeprefix(MEDIA)
        blob = root / "blobs" / str(layer.get("digest", "")).replace(":", "-")
        if not blob.is_file():
            raise OllamaError(f"{manifest}: blob {blob.name} ({kind}) is missing from {root / 'blobs'}")
        found.setdefault(kind, blob)
    if "model" not in found:
        raise OllamaError(f"{manifest}: no model layer ({MEDIA}model)")
    text = {k: found[k].read_text(encoding="utf-8") for k in ("template", "system", "params") if k in found}
    params = json.loads(text["params"]) if "params" in text else {}
    return OllamaModel(name, found["model"], text.get("template"), text.get("system"), params)
