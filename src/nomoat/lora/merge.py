"""Pure functions over a model with LoRA layers: `merge_lora`, `unmerge_lora`, `disable_lora`, `lora_state_dict`.

Merging adds each layer's update into its base weight (DoRA: rescales rows to the learned magnitude) so that
inference runs plain linear layers; merging twice is a no-op, and `unmerge_lora` takes it back out (exact up to
floating-point rounding).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from nomoat.lora.inject import ADAPTER_MARKERS, base_modules_to_save, lora_layers


def _embedding_weights(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer's update into its base weight, in place; already merged layers are left alone.

    Raises:
        RuntimeError: a layer's base is quantized, or its weight is tied to an embedding (merging would change the
            embedding too). Nothing is merged in either case.
    """
    layers = lora_layers(model)
    embeddings = _embedding_weights(model)
    for name, layer in layers.items():
        if layer.quantized:
            raise RuntimeError(
                f"{name}: cannot merge a LoRA adapter into a quantized ({layer.qbase.mode}) base; "  # type: ignore[union-attr]
                "load the base model in full precision, load the adapter into it, then merge"
            )
        if id(layer.weight) in embeddings:
            raise RuntimeError(f"{name}: its weight is tied to the input embeddings, so merging would change them too")
    for layer in layers.values():
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Take merged updates back out of the base weights, in place (unmerged layers are left alone)."""
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


@contextmanager
def disable_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block.

    Adapters are switched off (merged ones unmerged first), `modules_to_save` hold their base tensors, and both are
    restored on exit, even after an exception.

    Example:
        >>> with disable_lora(model):
        ...     ref_logits = model(ids)  # the base model's logits
    """
    layers = list(lora_layers(model).values())
    was_merged = [layer.merged for layer in layers]
    was_disabled = [layer.disabled for layer in layers]
    for layer in layers:
        layer.unmerge()
        layer.disabled = True
    try:
        with base_modules_to_save(model):
            yield model
    finally:
        for layer, merged, disabled in zip(layers, was_merged, was_disabled):
            layer.disabled = disabled
            if merged:
                layer.merge()


def is_adapter_key(name: str) -> bool:
    """Whether a state-dict key names an adapter tensor (`lora_A`, `lora_B` or a DoRA magnitude)."""
    return any(f".{m}" in name or name.startswith(m) for m in ADAPTER_MARKERS)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under nomoat's (= Hugging Face's) module names, detached.

    Holds every `lora_A.weight`, `lora_B.weight` and `lora_magnitude_vector` (shared Phi-3 `lora_A`s appear under
    each part's name), plus the parameters of `model.lora_modules_to_save` (e.g. `lm_head.weight`).
    """
    out = {k: v.detach() for k, v in model.state_dict(keep_vars=True).items() if is_adapter_key(k)}
    for name in getattr(model, "lora_modules_to_save", []):
        module = model.get_submodule(name)
        for leaf, p in module.named_parameters():
            out[f"{name}.{leaf}"] = p.detach()
    return out
