"""Inference-only linear layers with weights prepacked for oneDNN, the fastest CPU matmul path in torch.

On the 2-core x86 machines nomoat targets, `F.linear` (MKL) reads weights at 10-14 GB/s for one row of activations,
a third of the memory bandwidth; oneDNN with weights reordered once into its blocked layout reads them at 17-19 GB/s.
Measured on a SmolLM2-135M-shaped model (fp32, 2 threads): decode at batch 1 17.5 -> 25.0 tok/s, batch 8
96 -> 164 tok/s, prefill 333 -> 555 tok/s, logits equal to fp32 rounding (about 1e-5).

Decode rows (at most `KERNEL_MAX_ROWS` per call) go through nomoat's compiled kernels (`kernels.py`) when they build:
they stream the weights at 20-24 GB/s on one core where oneDNN reads 12-13 (the 211 matrices of SmolLM2-135M at one
row: 45 -> 27 ms on 2 threads under load, 40 -> 23 ms on 1). oneDNN stays for longer inputs (prefill), where it is
compute-bound and 1.4x faster than the kernels' layout through `bmm` at 512 rows; so such a layer holds both layouts
(twice its fp32 weight bytes). A layer named `lm_head` builds its oneDNN copy only when first called with more rows:
generation computes logits for one position per row, so the output head (21% of SmolLM2's weights) is stored once.
`pack_model` also fuses each layer's q/k/v and gate/up projections for decode (`kernels.FusedDecodeLinear`: one
kernel call over one shared panel tensor, the layers' own panels being views of it, so no extra memory), and gives a
`Transformer` its one-call decode stack (`decode_stack.py`: every layer of a decode step in one compiled call).

Packed layers have no autograd and no `weight` tensor in Hugging Face layout, so they are for generation only: pack a
model you will not train or save (the CLI's inference commands do). `pack_model` leaves a model unchanged where
oneDNN is not available, off the CPU, or for dtypes other than fp32.
"""

from __future__ import annotations

import torch
from torch import nn

from nomoat.kernels import hugepages
from nomoat.models import decode_stack, kernels

# Rows per call up to which the compiled kernels beat oneDNN (measured, 28 of SmolLM2's matrices, 2 threads):
# 6 rows 2.2 vs 3.6 ms, 16 rows 7.5 vs 6.2 ms; all 211 matrices at 8 rows, 1 thread: 32 vs 40-43 ms.
KERNEL_MAX_ROWS = 8


def packing_available(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> bool:
    """Whether `pack_model` would pack layers for this device and dtype."""
    ops = torch.ops.mkldnn
    return (
        torch.device(device).type == "cpu"
        and dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


class PackedLinear(nn.Module):
    """`y = x W^T + b` with `W` prepacked for nomoat's decode kernels and for oneDNN (inference only).

    Args:
        linear: The `nn.Linear` to pack (its weight is copied into the packed layouts; the original is not kept).
        lazy_onednn: Build the oneDNN copy only when a call first has more than `KERNEL_MAX_ROWS` rows (for layers
            that rarely see more, like the output head in generation). Ignored when the kernels are unavailable.
    """

    def __init__(self, linear: nn.Linear, lazy_onednn: bool = False) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach().contiguous()
        panels = kernels.pack_fp32(weight) if kernels.available() else None
        packed = None
        if panels is None or not lazy_onednn:
            with torch.no_grad():
                packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        self.register_buffer("panels", panels, persistent=False)
        self.register_buffer("packed_weight", packed, persistent=False)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)

    def _onednn_weight(self) -> torch.Tensor:
        if self.packed_weight is None:  # lazy: rebuilt from the panels (P, K, 64) -> (N, K)
            w = self.panels.permute(0, 2, 1).reshape(-1, self.in_features)[: self.out_features].contiguous()
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(w, None)
        return self.packed_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer to (..., in_features)."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.panels is not None and x2.shape[0] <= KERNEL_MAX_ROWS and x2.dtype == torch.float32:
            y = kernels.linear_fp32(x2, self.panels, self.out_features, self.bias)
        else:
            y = torch.ops.mkldnn._linear_pointwise(x2, self._onednn_weight(), self.bias, "none", [], "")
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        """Shape summary shown by `print(model)`."""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_model(model: nn.Module) -> int:
    """Replace every fp32 CPU `nn.Linear` of `model` by a `PackedLinear`, in place, under the same module path.

    A tied output head gets its own packed copy (the embedding keeps its matrix for lookups). Returns how many
    layers were packed (0 where packing is not available).
    """
    n = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and packing_available(child.weight.device, child.weight.dtype):
                setattr(module, name, PackedLinear(child, lazy_onednn=name == "lm_head"))
                n += 1
    if n and kernels.available():
        _fuse(model)
        decode_stack.attach(model)  # a Transformer's decode steps then run all layers in one call
    return n


def _fuse(model: nn.Module) -> None:
    """Let q/k/v and gate/up run as one kernel call each at decode, over views of one shared panel tensor."""
    for owner, attr, layers in kernels.fusable_groups(model):
        if not all(type(m) is PackedLinear and m.panels is not None for m in layers):
            continue
        parts = [m.panels for m in layers]
        shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
        fused = torch.cat(parts, out=hugepages.empty(shape, torch.float32))  # streamed every token: huge pages
        at = 0
        for m in layers:  # the layers' own panels become views: no extra memory
            size = m.panels.shape[0]
            m.panels = fused[at : at + size]
            at += size
        setattr(owner, attr, kernels.FusedDecodeLinear(layers, fused, None, KERNEL_MAX_ROWS))
