"""LoRA layers that read the same input (q/k/v, gate/up) trained as one group: one `A` product, one input gradient.

A `LoRAGroup` concatenates its layers' `A` matrices (rank 3r for q/k/v) so that `x A^T`, `g B` and the `A` gradient
run once per group instead of once per layer as skinny matmuls, and accumulates the input gradient of the base and
adapter products in place into one tensor; the base products stay one per layer (concatenating frozen weights would
copy them every step or keep a second copy). The arithmetic is the layers' own, so a model trains the same with or
without groups, to fp32 rounding. `inject_lora` calls `attach_groups`, which sets the group on every attention and MLP
block (`Attention._train_qkv`, `MLP._train_gate_up`); a group returns None, and the layers run one by one, wherever
it does not apply: no gradient recorded, DoRA, dropout, a quantized, merged, disabled or trainable base, mixed
dtypes, or autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nomoat.lora.delta import lora_up
from nomoat.lora.layers import LoRALinear


class _LoRAGroupFn(torch.autograd.Function):
    """Outputs `x W_i^T + b_i + s_i (x A_i^T) B_i^T` of n layers over one 2-D input `x` (N, in)."""

    @staticmethod
    def forward(ctx, x, scalings, *tensors):  # noqa: ANN001, ANN205
        n = len(scalings)
        ws, bs, As, Bs = tensors[:n], tensors[n : 2 * n], tensors[2 * n : 3 * n], tensors[3 * n :]
        a_cat = torch.cat(As) if n > 1 else As[0]  # (R, in)
        a = x @ a_cat.t()  # (N, R): every layer's rank-r projection in one product
        outs, at = [], 0
        for w, b, lora_a, lora_b, s in zip(ws, bs, As, Bs, scalings):
            r = lora_a.shape[0]
            outs.append(lora_up(a[:, at : at + r], lora_b, s, out=F.linear(x, w, b)))
            at += r
        ctx.save_for_backward(x, a, a_cat, *ws, *Bs)
        ctx.scalings = scalings
        ctx.ranks = [t.shape[0] for t in As]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):  # noqa: ANN001, ANN205
        x, a, a_cat, *rest = ctx.saved_tensors
        n = len(ctx.scalings)
        ws, Bs = rest[:n], rest[n:]
        need = ctx.needs_input_grad  # (x, scalings, W..., b..., A..., B...)
        ga = torch.empty_like(a)  # (N, R): s_i g_i B_i, the gradient of every layer's x A_i^T
        grad_x = None
        grad_b = [None] * n
        at = 0
        for i, (g, w, lora_b, s, r) in enumerate(zip(grads, ws, Bs, ctx.scalings, ctx.ranks)):
            if g is None:  # an output that did not reach the loss
                ga[:, at : at + r].zero_()
                at += r
                continue
            g = g.contiguous()
            ga[:, at : at + r] = (g @ lora_b).mul_(s)
            if need[2 + 3 * n + i]:
                grad_b[i] = (g.t() @ a[:, at : at + r]).mul_(s)  # (out, r)
            if need[0]:
                grad_x = g @ w if grad_x is None else grad_x.addmm_(g, w)
            at += r
        if need[0]:
            grad_x = ga @ a_cat if grad_x is None else grad_x.addmm_(ga, a_cat)
        grad_a = [None] * n
        if any(need[2 + 2 * n : 2 + 3 * n]):
            full = ga.t() @ x  # (R, in)
            grad_a = list(full.split(ctx.ranks)) if n > 1 else [full]
        return (grad_x, None, *([None] * (2 * n)), *grad_a, *grad_b)


class LoRAGroup:
    """Callable set on a block by `inject_lora`: `group(x, layers)` -> the layers' outputs, or None (not applicable).

    Stateless: the block passes its current layers on each call, so replacing, merging or disabling a layer is
    seen at once.
    """

    def __call__(self, x: torch.Tensor, layers: tuple[nn.Module, ...]) -> tuple[torch.Tensor, ...] | None:
        """Outputs (each (..., out_features)) of `layers` on the shared input `x` (..., in_features), or None."""
        if not torch.is_grad_enabled() or torch.is_autocast_enabled() or not _groupable(layers, x.dtype):
            return None
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        tensors = (
            [m.weight for m in layers]
            + [m.bias for m in layers]
            + [m.lora_A.weight for m in layers]
            + [m.lora_B.weight for m in layers]
        )
        outs = _LoRAGroupFn.apply(x2, [m.scaling for m in layers], *tensors)
        return tuple(y.view(*lead, y.shape[-1]) for y in outs)


def _groupable(layers: tuple[nn.Module, ...], dtype: torch.dtype) -> bool:
    """Plain LoRA layers over frozen full-precision weights of the input's dtype, adapters in that dtype too."""
    for m in layers:
        if type(m) is not LoRALinear or m.merged or m.disabled or m.qbase is not None:
            return False
        if m.lora_magnitude_vector is not None or not isinstance(m.lora_dropout, nn.Identity):
            return False
        if m.weight is None or m.weight.requires_grad or (m.bias is not None and m.bias.requires_grad):
            return False
        if not (m.weight.dtype == m.lora_A.weight.dtype == m.lora_B.weight.dtype == dtype):
            return False
    return True


# Attribute of the owning block -> the layers grouped there (Hugging Face names, as in models/transformer.py).
GROUPS = {"_train_qkv": ("q_proj", "k_proj", "v_proj"), "_train_gate_up": ("gate_proj", "up_proj")}


def attach_groups(model: nn.Module) -> int:
    """Set a `LoRAGroup` on every block of `model` that has all the layers of a group; returns how many."""
    n = 0
    group = LoRAGroup()
    for owner in model.modules():
        for attr, names in GROUPS.items():
            if hasattr(type(owner), attr) and all(isinstance(getattr(owner, k, None), LoRALinear) for k in names):
                setattr(owner, attr, group)
                n += 1
    return n


def detach_groups(model: nn.Module) -> None:
    """Remove the groups `attach_groups` set (the blocks fall back to their class default, None)."""
    for owner in model.modules():
        for attr in GROUPS:
            if attr in vars(owner):
                delattr(owner, attr)
