"""Placing LoRA layers in a model by target-module name (PEFT's matching rules), and taking them out again.

`inject_lora(model, cfg)` replaces each targeted `nn.Linear` (or quantized layer, for QLoRA) by a `LoRALinear` under
the same module path, freezes every other parameter, makes `modules_to_save` trainable (keeping their base tensors
for `base_modules_to_save`, the adapter-off view) and records the config as `model.lora_config`; it changes the model
in place. `unload_lora` takes the layers out; `lora_layers`, `lora_parameters`, `trainable_parameters` and
`count_parameters` inspect them.

Phi-3 fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj`, which nomoat keeps split: a LoRA on a fused layer
is exactly a LoRA on each part with one shared `A` and `B` split by rows, so there the parts share their `lora_A`
module, targets may use the fused names, and `peft_format` saves and loads the fused layout.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from nomoat.config.lora import ALL_LINEAR, LoRAConfig
from nomoat.lora.group import attach_groups, detach_groups
from nomoat.lora.layers import LoRALinear
from nomoat.lora.nf4 import NF4Linear
from nomoat.models.quantize import QuantizedLinear

logger = logging.getLogger(__name__)

LINEAR_TYPES = (nn.Linear, QuantizedLinear, NF4Linear)
OUTPUT_HEAD = "lm_head"
# Phi-3's fused checkpoint layers and the split layers nomoat has for them.
FUSED_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
ADAPTER_MARKERS = ("lora_A", "lora_B", "lora_magnitude_vector")


def has_fused_projections(model: nn.Module) -> bool:
    """Whether the model's checkpoint layout fuses projections (Phi-3), per its `config.fused_qkv`."""
    return bool(getattr(getattr(model, "config", None), "fused_qkv", False))


def _name_matches(name: str, target: str) -> bool:
    """PEFT's rule: a target names a module when the full name equals it or ends with `.target`."""
    return name == target or name.endswith("." + target)


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES + (LoRALinear,))]


def match_targets(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Full names of the linear layers `cfg.target_modules` selects, in model order.

    A list matches by name suffix; `"all-linear"` selects every linear layer but the output head; any other string
    is a regular expression that must match a full name (PEFT's rule for a string). Fused Phi-3 names
    (`qkv_proj`, `gate_up_proj`) select their split parts on models that fuse them.

    Raises:
        ValueError: a listed target matches no layer, or nothing matched; the message lists the linear layers.
    """
    names = _linear_names(model)
    targets = cfg.target_modules
    if targets == ALL_LINEAR:
        chosen = [n for n in names if n.rsplit(".", 1)[-1] != OUTPUT_HEAD]
    elif isinstance(targets, str):
        chosen = [n for n in names if re.fullmatch(targets, n)]
    else:
        fused = has_fused_projections(model)
        chosen_set: set[str] = set()
        unmatched = []
        for target in targets:
            leaf = target.rsplit(".", 1)[-1]
            parts = FUSED_GROUPS.get(leaf) if fused else None
            if parts is not None:
                prefix = target[: -len(leaf)]
                hits = [n for n in names if any(_name_matches(n, prefix + p) for p in parts)]
            else:
                hits = [n for n in names if _name_matches(n, target)]
            if not hits:
                unmatched.append(target)
            chosen_set.update(hits)
        if unmatched:
            raise ValueError(
                f"LoRA target_modules {unmatched} match no linear layer of this model; "
                f"its linear layers are named: {_describe(names)}"
            )
        chosen = [n for n in names if n in chosen_set]
    if not chosen:
        raise ValueError(
            f"LoRA target_modules {targets!r} match no linear layer of this model; "
            f"its linear layers are named: {_describe(names)}"
        )
    return chosen


def _describe(names: list[str]) -> str:
    """Distinct leaf names plus an example full name, so the message stays short for deep models."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    example = f" (e.g. {names[0]})" if names else ""
    return ", ".join(leaves) + example


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's `LoRALinear` layers by full module name, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _share_fused_A(layers: dict[str, LoRALinear]) -> None:
    """On fused-layout families, the LoRA parts of one fused layer share a single `lora_A` (see module docstring)."""
    groups: dict[tuple[str, str], list[LoRALinear]] = {}
    for name, layer in layers.items():
        prefix, _, leaf = name.rpartition(".")
        for fused, parts in FUSED_GROUPS.items():
            if leaf in parts:
                groups.setdefault((prefix, fused), []).append(layer)
    for members in groups.values():
        for m in members[1:]:
            m.lora_A = members[0].lora_A


def _module_owners(model: nn.Module) -> dict[int, list[str]]:
    """For every parameter (by id), the names of all modules holding it (more than one when tied)."""
    owners: dict[int, list[str]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for p in module._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append(mname)
    return owners


BASE_PREFIX = "lora_base_"  # a modules_to_save layer's buffer holding the base tensor of its parameter


def _modules_to_save(model: nn.Module, cfg: LoRAConfig) -> tuple[list[str], dict[str, dict[str, tuple[str, str]]]]:
    """Make `cfg.modules_to_save` trainable; return their full names and where each one's base tensors live.

    A parameter tied to a module not listed gets its own copy (PEFT trains a copy of the listed module too, so the
    tied partner keeps the original, which is then the base tensor); an untied one is trained in place, so its base
    tensor is a frozen copy (as PEFT's `original_module`), a non-persistent buffer of the module (it moves with the
    model and stays out of state dicts). The second value maps name -> leaf -> (module name, attribute).
    """
    if not cfg.modules_to_save:
        return [], {}
    all_names = [n for n, _ in model.named_modules()]
    chosen: list[str] = []
    for target in cfg.modules_to_save:
        hits = [n for n in all_names if n and _name_matches(n, target)]
        if not hits:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in all_names if n and "layers." not in n})
            raise ValueError(
                f"modules_to_save entry {target!r} matches no module of this model (top-level modules: {leaves})"
            )
        chosen += [h for h in hits if h not in chosen]
    owners = _module_owners(model)
    bases: dict[str, dict[str, tuple[str, str]]] = {}
    for name in chosen:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            raise ValueError(f"{name} is both a LoRA target and in modules_to_save; choose one")
        for leaf, p in list(module._parameters.items()):
            if p is None:
                continue
            others = [o for o in owners.get(id(p), []) if o not in chosen]
            if others:
                logger.warning(
                    "%s.%s is tied to %s, which is not in modules_to_save: training an untied copy (as PEFT does)",
                    name, leaf, ", ".join(others),
                )  # fmt: skip
                owner = others[0]
                attr = next(k for k, v in model.get_submodule(owner)._parameters.items() if v is p)
                bases.setdefault(name, {})[leaf] = (owner, attr)  # stays frozen in its tied partner
                p = nn.Parameter(p.detach().clone())
                module._parameters[leaf] = p
            else:
                module.register_buffer(BASE_PREFIX + leaf, p.detach().clone(), persistent=False)
                bases.setdefault(name, {})[leaf] = (name, BASE_PREFIX + leaf)
            p.requires_grad_(True)
    return chosen, bases


@contextmanager
def base_modules_to_save(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, each of `model.lora_modules_to_save` holds its base tensors again.

    The adapter's own tensors are put back on exit, even after an exception. `disable_lora` uses it, as PEFT's
    `disable_adapter` switches `modules_to_save` back to the original module.
    """
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for name, leaves in getattr(model, "lora_modules_to_save_base", {}).items():
            module = model.get_submodule(name)
            for leaf, (owner, attr) in leaves.items():
                base = getattr(model.get_submodule(owner), attr)
                swapped.append((module, leaf, module._parameters[leaf]))
                module._parameters[leaf] = nn.Parameter(base, requires_grad=False)  # shares the base's storage
        yield model
    finally:
        for module, leaf, trained in reversed(swapped):
            module._parameters[leaf] = trained


def inject_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Add LoRA adapters to a model in place, freezing everything else.

    Args:
        model: A `Transformer` (or any module with Hugging Face-style linear layer names), possibly quantized
            (`QuantizedLinear` or `NF4Linear` layers get a QLoRA adapter over their frozen integer weights).
        cfg: Which layers, rank, scaling, dropout, DoRA, and modules trained in full.

    Returns:
        The same model, with `model.lora_config = cfg` and `model.lora_modules_to_save` (full module names).

    Raises:
        ValueError: the model already has LoRA layers, or a target / modules_to_save entry matches nothing.
    """
    if lora_layers(model):
        raise ValueError("this model already has LoRA layers; call unload_lora(model) before injecting again")
    targets = match_targets(model, cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    layers: dict[str, LoRALinear] = {}
    for name in targets:
        base = model.get_submodule(name)
        if isinstance(base, nn.Linear):
            layer = LoRALinear.from_linear(base, cfg)
        else:
            layer = LoRALinear.from_quantized(base, cfg)
        _set_module(model, name, layer)
        layers[name] = layer
    if has_fused_projections(model):
        _share_fused_A(layers)
    saved, bases = _modules_to_save(model, cfg)
    attach_groups(model)  # q/k/v and gate/up train as groups (one adapter product each); see lora/group.py
    model.lora_config = cfg
    model.lora_modules_to_save = saved
    model.lora_modules_to_save_base = bases
    return model


def unload_lora(model: nn.Module) -> nn.Module:
    """Replace every `LoRALinear` by its plain base layer (with the update in it if it was merged).

    Full-precision bases come back as `nn.Linear` sharing the same weight tensor, quantized ones as the original
    quantized module. Trainable flags of other parameters are left as they are.
    """
    detach_groups(model)
    for name, layer in lora_layers(model).items():
        _set_module(model, name, layer.to_base())
    for name in getattr(model, "lora_modules_to_save_base", {}):
        module = model.get_submodule(name)
        for key in [k for k in module._buffers if k.startswith(BASE_PREFIX)]:
            del module._buffers[key]
    for attr in ("lora_config", "lora_modules_to_save", "lora_modules_to_save_base"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter parameters (`lora_A`, `lora_B`, DoRA magnitudes) by full name; a shared one appears once."""
    return {n: p for n, p in model.named_parameters() if any(f".{m}" in n for m in ADAPTER_MARKERS)}


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter with `requires_grad`, by full name (adapters plus modules_to_save after `inject_lora`)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """`(trainable, total)` parameter counts, each tensor once; a quantized weight counts its logical elements."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, (QuantizedLinear, NF4Linear)):
            total += module.in_features * module.out_features
    return trainable, total


def adapter_dtype_of(model: nn.Module) -> torch.dtype | None:
    """Dtype of the model's adapter tensors, or None without adapters."""
    for layer in lora_layers(model).values():
        return layer.lora_A.weight.dtype
    return None
