"""Decode-time helpers over the compiled kernels (`nomoat.kernels`): q/k/v and gate/up fused into one call.

The kernels themselves (C++ in `nomoat/kernels/csrc/`, registered as `torch.ops.nomoat.*`) and the panel layout live
in `nomoat.kernels`; the names below are re-exported for the model code that uses them.
"""

from __future__ import annotations

from typing import Any

import torch

from nomoat.kernels import MAX_ROWS, PANEL, available, decode_attention, linear_fp32, linear_int8, pack_fp32, pack_int8

__all__ = [
    "FUSED_GROUPS",
    "MAX_ROWS",
    "PANEL",
    "FusedDecodeLinear",
    "available",
    "decode_attention",
    "fusable_groups",
    "linear_fp32",
    "linear_int8",
    "pack_fp32",
    "pack_int8",
]


class FusedDecodeLinear:
    """Linear layers that read the same input (q/k/v, gate/up), run at decode as one kernel call over shared panels.

    One call instead of three (or two) halves the parallel regions and Python dispatch of a decode step's
    projections. The layers keep their own (views of the same) panels and their own prefill paths, so fusing costs
    no memory. It applies only while the layers are the very modules it was built from (an adapter that replaces
    one, as LoRA injection does, turns it off), with gradients off, on fp32 CPU inputs of at most `max_rows` rows.

    Args:
        modules: The fused layers, in output order.
        panels: Their panels concatenated along the panel axis (every layer's width a multiple of `PANEL`).
        scale: Concatenated per-channel scales for int8 panels; None for fp32.
        max_rows: Rows per call up to which the kernels are used.
        check: Called with no argument before each use; False means the layers' weights changed (do not use).
    """

    def __init__(
        self,
        modules: list[torch.nn.Module],
        panels: torch.Tensor,
        scale: torch.Tensor | None,
        max_rows: int,
        check: Any = None,
    ) -> None:
        self.modules = modules
        self.panels = panels
        self.scale = scale
        self.max_rows = max_rows
        self.sizes = [m.out_features for m in modules]
        self.n = sum(self.sizes)
        self.check = check

    def __call__(self, x: torch.Tensor, modules: tuple[torch.nn.Module, ...]) -> tuple[torch.Tensor, ...] | None:
        """The layers' outputs (each (..., out_features)) for `x` (..., in_features), or None where not applicable."""
        if len(modules) != len(self.modules) or any(a is not b for a, b in zip(modules, self.modules)):
            return None
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] > self.max_rows or x2.dtype != torch.float32 or x2.device.type != "cpu":
            return None
        if torch.is_grad_enabled() or (self.check is not None and not self.check()):
            return None
        biases = [m.bias for m in self.modules]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b if b is not None else x2.new_zeros(n) for b, n in zip(biases, self.sizes)]).float()
        if self.scale is None:
            y = linear_fp32(x2, self.panels, self.n, bias)
        else:
            y = linear_int8(x2, self.panels, self.scale, self.n, bias)
        return tuple(t.view(*lead, t.shape[-1]) for t in y.split(self.sizes, dim=-1))


# Attribute of the owning module -> the projections fused there (Hugging Face names, as in transformer.py).
FUSED_GROUPS = {"_decode_qkv": ("q_proj", "k_proj", "v_proj"), "_decode_gate_up": ("gate_proj", "up_proj")}


def fusable_groups(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, list[torch.nn.Module]]]:
    """(owner, attribute, layers) for every q/k/v and gate/up group of `model` whose widths are whole panels."""
    out = []
    for owner in model.modules():
        for attr, names in FUSED_GROUPS.items():
            layers = [getattr(owner, n, None) for n in names]
            if hasattr(type(owner), attr) and all(m is not None for m in layers):
                if all(getattr(m, "out_features", 1) % PANEL == 0 for m in layers):
                    out.append((owner, attr, layers))
    return out
