"""`export_merged`: a base model with adapters merged in, saved as a Hugging Face safetensors folder.

The merge runs in fp32 and the result is cast once to the chosen dtype; the base's tokenizer and side files
(`SIDE_FILES`, or for a GGUF base the tokenizer rebuilt from its metadata) and an adapter's trained chat template are
written alongside. `ExportError` is raised across `export`.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from nomoat.lora.apply import merge_adapters
from nomoat.lora.peft_format import AdapterError
from nomoat.models.checkpoint import CheckpointError, load_model, resolve_dtype, save_model
from nomoat.tokenizer import Tokenizer
from nomoat.util.errors import ModelError
from nomoat.util.files import ordinary_modes

# Files besides the weights that make a model folder usable: tokenizer, chat template, generation defaults.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
              "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt")  # fmt: skip


class ExportError(ModelError, ValueError):
    """The model or an adapter cannot be exported; the message says why."""


def export_merged(
    model_dir: str | Path,
    adapters: Sequence[tuple[str | Path, float]],
    out: str | Path,
    dtype: str | torch.dtype = "auto",
) -> Path:
    """Merge adapters into a base model and save the result as a Hugging Face folder.

    The merge runs in fp32 (so rounding happens once, at the end), then the weights are cast to `dtype`.

    Args:
        model_dir: The base model folder.
        adapters: `(adapter folder, weight)` pairs, merged in order.
        out: The folder to write (replaced atomically if it exists).
        dtype: `auto` (the base checkpoint's dtype), or `float32`, `bfloat16`, `float16`.

    Returns:
        The written folder.

    Raises:
        ExportError: The base or an adapter cannot be read or merged.
    """
    model_dir, out = Path(model_dir).expanduser(), Path(out).expanduser()
    try:
        model = load_model(model_dir, dtype=torch.float32, device="cpu")
        merged = merge_adapters(model, adapters)
    except (CheckpointError, AdapterError) as e:
        raise ExportError(str(e)) from e
    cfg = model.config
    if dtype == "auto":
        target = resolve_dtype("auto", torch.device("cuda"), cfg.hf_config)  # the checkpoint's own half/full dtype
        saved = str(cfg.hf_config.get("torch_dtype") or cfg.hf_config.get("dtype") or "float32")
        target = torch.float32 if saved in ("float32", "torch.float32") else target
    else:
        target = resolve_dtype(dtype, torch.device("cpu"))
    if cfg.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        # A trained head (modules_to_save) was untied from the embeddings: write both, and say so in the config.
        cfg.tie_word_embeddings = False
        cfg.hf_config = {**cfg.hf_config, "tie_word_embeddings": False}
    model.to(target)
    save_model(model, out)
    if model_dir.is_dir():
        for name in SIDE_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, out / name)
    else:  # a GGUF file or an Ollama model: its tokenizer, rebuilt from the metadata, as Hugging Face files
        Tokenizer.from_gguf(model_dir).save(out)
    template = next((a.chat_template for a in merged if a.chat_template), None)
    has_template = (out / "chat_template.jinja").exists() or "chat_template" in (
        (out / "tokenizer_config.json").read_text() if (out / "tokenizer_config.json").exists() else ""
    )
    if template and not has_template:
        (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    ordinary_modes(out)  # save_model publishes a mkdtemp folder (owner-only): readable by a server of another user
    return out
