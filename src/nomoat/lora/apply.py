"""Merge saved adapters into a base model's weights, in order and with weights (a stack made permanent).

`merge_adapters(model, [(folder, weight), ...])` leaves a plain model (no LoRA layers) that quantizes, packs and saves
like any base; `export` and `eval.columns` use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nomoat.config.lora import LoRAConfig
from nomoat.lora.inject import lora_layers, unload_lora
from nomoat.lora.merge import merge_lora
from nomoat.lora.peft_format import AdapterError, load_adapter


@dataclass
class MergedAdapter:
    """One adapter merged by `merge_adapters`: its folder, weight, config and trained chat template (if any)."""

    folder: Path
    weight: float
    config: LoRAConfig
    chat_template: str | None = None


def merge_adapters(model: nn.Module, adapters: Sequence[tuple[str | Path, float]]) -> list[MergedAdapter]:
    """Merge each `(folder, weight)` into the base weights: `W + sum_i weight_i * scaling_i * B_i A_i`.

    After the call the model is a plain model again (no LoRA layers) whose weights include the adapters, so it
    runs, quantizes, packs and saves like any base model. A `modules_to_save` layer replaces the base one (its
    weight cannot be scaled).

    Args:
        model: A full-precision base model (not quantized), changed in place.
        adapters: PEFT-format adapter folders with their weights, applied in order.

    Returns:
        What was merged, in order (with each folder's `chat_template.jinja`, if it has one).

    Raises:
        AdapterError: A folder is not a usable adapter, or a DoRA adapter has a weight other than 1 (DoRA's
            magnitude does not scale).
    """
    merged: list[MergedAdapter] = []
    for folder, weight in adapters:
        folder = Path(folder).expanduser()
        cfg = load_adapter(model, folder)
        if weight != 1.0:
            if cfg.use_dora:
                raise AdapterError(f"{folder}: a DoRA adapter cannot be weighted (its magnitude does not scale); "
                                   "use weight 1")  # fmt: skip
            with torch.no_grad():
                for layer in lora_layers(model).values():
                    layer.lora_B.weight.mul_(weight)
        merge_lora(model)
        unload_lora(model)
        template = folder / "chat_template.jinja"
        merged.append(MergedAdapter(folder, float(weight), cfg,
                                    template.read_text(encoding="utf-8") if template.is_file() else None))  # fmt: skip
    return merged
