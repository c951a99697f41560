"""Inference-only linear layers whose weight is stored once, in the layout of the fastest CPU kernel available.

Where nomoat's compiled kernels build (`nomoat.kernels`), a `PackedLinear` holds the weight as fp32 panels and every
call, decode rows or a prefill's hundreds, is one `torch.ops.nomoat.linear_f32` call (rows run in blocks of 8 over
each panel; memory sees each weight once per call). Elsewhere it holds oneDNN's blocked layout, torch's fastest
fp32 CPU matmul path (on the 2-core x86 machines nomoat targets it reads weights at 17-19 GB/s where `F.linear` reads
10-14). Either way the original (N, K) matrix is not kept: `weight()` rebuilds it.

`pack_model` replaces a model's fp32 CPU `nn.Linear` layers by `PackedLinear`s, in place, under the same module
paths: for a model loaded only to generate (the CLI's inference commands), so that its weights exist once.
`nomoat.inference.prepare` then decodes with the same panels. Packed layers have no autograd: do not train or save
a packed model. `pack_model` leaves a model unchanged where neither layout applies (off the CPU, not fp32).
"""

from __future__ import annotations

import torch
from torch import nn

from nomoat import kernels
from nomoat.kernels import hugepages


def packing_available(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> bool:
    """Whether `pack_model` would pack layers for this device and dtype."""
    ops = torch.ops.mkldnn
    onednn = torch.backends.mkldnn.is_available() and all(
        hasattr(ops, op) for op in ("_reorder_linear_weight", "_linear_pointwise")
    )
    return torch.device(device).type == "cpu" and dtype == torch.float32 and (onednn or kernels.available())


class PackedLinear(nn.Module):
    """`y = x W^T + b` with `W` stored once: as the compiled kernels' panels, or for oneDNN (inference only).

    Args:
        linear: The `nn.Linear` to pack (its weight is copied into the packed layout; the original is not kept).
        lazy_onednn: Without the kernels, build the oneDNN layout at the first call instead of now.
    """

    def __init__(self, linear: nn.Linear, lazy_onednn: bool = False) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach().contiguous()
        panels = kernels.pack_fp32(weight) if kernels.available() else None
        self._pending = weight if panels is None and lazy_onednn else None  # (N, K), until the first call
        packed = None
        if panels is None and not lazy_onednn:
            with torch.no_grad():
                packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        self.register_buffer("panels", panels, persistent=False)
        self.register_buffer("packed_weight", packed, persistent=False)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)

    def weight(self) -> torch.Tensor:
        """The (out, in) weight matrix, rebuilt from the stored layout (a new tensor)."""
        if self.panels is not None:
            return kernels.unpack(self.panels, self.out_features)
        if self._pending is not None:
            return self._pending.clone()
        eye = torch.eye(self.in_features)
        return torch.ops.mkldnn._linear_pointwise(eye, self.packed_weight, None, "none", [], "").t().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer to fp32 (..., in_features)."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.panels is not None:
            y = kernels.linear_fp32(x2, self.panels, self.out_features, self.bias)
        else:
            if self.packed_weight is None:
                with torch.no_grad():
                    self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(self._pending, None)
                self._pending = None
            y = torch.ops.mkldnn._linear_pointwise(x2, self.packed_weight, self.bias, "none", [], "")
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        """Shape summary shown by `print(model)`."""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_model(model: nn.Module) -> int:
    """Replace every fp32 CPU `nn.Linear` of `model` by a `PackedLinear`, in place, under the same module path.

    A tied output head gets its own packed copy (the embedding keeps its matrix for lookups). Returns how many
    layers were packed (0 where packing is not available).
    """
    # Names, not modules: no list may keep a replaced layer (and its weight) alive until the end.
    names = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    n = 0
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        child = getattr(parent, child_name)
        if packing_available(child.weight.device, child.weight.dtype):
            setattr(parent, child_name, PackedLinear(child, lazy_onednn=child_name == "lm_head"))
            del child
            hugepages.release_freed_memory()  # the replaced weight's memory goes back now: the peak is one layer more
            n += 1
    return n
