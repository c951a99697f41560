"""`PanelLinear`: a linear layer of the decode model, its weight held once, in the decode kernels' panel layout.

fp32 panels (`W`, from an fp32 `nn.Linear` or a `PackedLinear`'s own panels), bf16 panels (from a bf16 `nn.Linear`:
a bf16 model decodes with fp32 sums, its activations cast at each layer) or int8 panels with fp16 scales per block
of 32 input channels (GGUF Q8_0's `w = d * q`, quantized here or an int8 `QuantizedLinear`'s own panels, shared).
Every call, whatever its number of rows, is one `torch.ops.nomoat.linear_*` call (the op runs rows in blocks of 8
over each panel, so memory sees each weight once per call). `weight()` rebuilds the (out, in) matrix from the panels
for whoever needs it.
`Q4PanelLinear` is the same over 4-bit panels (GGUF Q4_0 / Q4_1 blocks, `kernels.linear_q4`): an int4
`QuantizedLinear`'s own panels (shared), or fp32 / bf16 weights quantized to Q4_0 here.
"""

from __future__ import annotations

import torch
from torch import nn

from nomoat import kernels
from nomoat.models.packed import PackedLinear
from nomoat.models.quantize import QuantizedLinear, int8_panels, quantize_int4, quantize_int8


class PanelLinear(nn.Module):
    """`y = x W^T + b` over fp32, bf16 or int8 panels (inference only; fp32 sums, fp32 or bf16 activations).

    Args:
        panels: (P, in, 64) fp32 or int8 panels (`nomoat.kernels.pack_fp32` / `pack_int8`).
        out_features: Output width (`P * 64` or fewer: the rest is padding).
        scale: (P, ceil(in / 32), 64) fp16 block scales of int8 panels (`pack_int8`); None for fp32 and bf16.
        bias: fp32 (out,) or None.
        in_features: Input width (needed for bf16 panels, which hold input channels in pairs).
    """

    def __init__(
        self,
        panels: torch.Tensor,
        out_features: int,
        scale: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        in_features: int | None = None,
    ) -> None:
        super().__init__()
        self.in_features = panels.shape[1] if in_features is None else in_features
        self.out_features = out_features
        self.register_buffer("panels", panels, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    @property
    def int8(self) -> bool:
        """Whether the panels hold int8 codes."""
        return self.panels.dtype == torch.int8

    @property
    def bf16(self) -> bool:
        """Whether the panels hold bf16 weights (input channels in pairs)."""
        return self.panels.dtype == torch.bfloat16

    @classmethod
    def from_module(cls, module: nn.Module, quantize: str | None = None) -> PanelLinear | None:
        """The panel form of an fp32/bf16 CPU `nn.Linear`, or of a `PackedLinear` or int8 `QuantizedLinear` (shared).

        `quantize="int8"` quantizes fp32 or bf16 weights (GGUF Q8_0 blocks, as `QuantizedLinear`). None
        where the module has no panel form (another type, dtype or device; int4): the decode model keeps the module.
        """
        bias = getattr(module, "bias", None)
        if bias is not None and (not bias.dtype.is_floating_point or bias.device.type != "cpu"):
            return None
        bias = None if bias is None else bias.detach().float()  # fp32 (a copy for a bf16 layer: out floats)
        if type(module) is nn.Linear and module.weight.device.type == "cpu":
            w = module.weight
            if quantize == "int8" and w.dtype in (torch.float32, torch.bfloat16):
                panels, scale = int8_panels(*quantize_int8(w))
                return cls(panels, module.out_features, scale, bias)
            if w.dtype == torch.float32:
                return cls(kernels.pack_fp32(w), module.out_features, None, bias)
            if w.dtype == torch.bfloat16 and quantize is None:
                return cls(kernels.pack_bf16(w), module.out_features, None, bias, module.in_features)
            return None
        if type(module) is PackedLinear and module.panels is not None:
            return cls(module.panels, module.out_features, None, bias)
        if isinstance(module, QuantizedLinear) and module.mode == "int8" and module.qweight.device.type == "cpu":
            return cls(module.qweight, module.out_features, module.scale, bias)  # shared: codes held once
        return None

    def weight(self) -> torch.Tensor:
        """The (out, in) fp32 weight these panels stand for (rebuilt: a new tensor)."""
        if self.bf16:
            return kernels.unpack_bf16(self.panels, self.out_features, self.in_features).float()
        if self.int8:
            return kernels.dequantize_int8(self.panels, self.scale, self.out_features)
        return kernels.unpack(self.panels, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer to `x` (..., in_features): fp32 sums, the result in `x`'s dtype (fp32 or bf16)."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float()  # (M, in)
        if self.int8:
            y = kernels.linear_int8(x2, self.panels, self.scale, self.out_features, self.bias)
        elif self.bf16:
            y = kernels.linear_bf16(x2, self.panels, self.out_features, self.bias)
        else:
            y = kernels.linear_fp32(x2, self.panels, self.out_features, self.bias)
        return y.view(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        """Shape summary shown by `print(model)`."""
        kind = "int8" if self.int8 else "bf16" if self.bf16 else "fp32"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}, bias={self.bias is not None}"


class Q4PanelLinear(PanelLinear):
    """`y = x W^T + b` over 4-bit panels (P, in / 32, 1152 | 1280) uint8 (`kernels.pack_q4`); inference only.

    Args:
        panels: The 4-bit panels.
        out_features: Output width.
        bias: fp32 (out,) or None.
        in_features: Input width (`32 * panels.shape[1]`).
    """

    def __init__(self, panels: torch.Tensor, out_features: int, bias: torch.Tensor | None = None,
                 in_features: int | None = None) -> None:  # fmt: skip
        super().__init__(panels, out_features, None, bias, in_features or panels.shape[1] * kernels.Q4_BLOCK)

    @classmethod
    def from_module(cls, module: nn.Module, quantize: str | None = None) -> Q4PanelLinear | None:
        """The 4-bit form of an int4 CPU `QuantizedLinear` (its panels, shared), else None.

        With `quantize="int4"`, an fp32 / bf16 CPU `nn.Linear` is quantized to Q4_0 here (`in_features % 32 == 0`).
        """
        bias = getattr(module, "bias", None)
        if bias is not None and (not bias.dtype.is_floating_point or bias.device.type != "cpu"):
            return None
        bias = None if bias is None else bias.detach().float()
        if isinstance(module, QuantizedLinear) and module.mode == "int4" and module.qweight.device.type == "cpu":
            return cls(module.qweight, module.out_features, bias, module.in_features)
        w = getattr(module, "weight", None)
        fits = type(module) is nn.Linear and module.in_features % kernels.Q4_BLOCK == 0
        if fits and quantize == "int4" and w.device.type == "cpu" and w.dtype in (torch.float32, torch.bfloat16):
            return cls(quantize_int4(w), module.out_features, bias, module.in_features)
        return None

    def weight(self) -> torch.Tensor:
        """The (out, in) fp32 weight these panels stand for (rebuilt: a new tensor)."""
        return kernels.dequantize_q4(self.panels, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer to `x` (..., in_features): int8 activations per block, fp32 sums, `x`'s dtype out."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float()  # (M, in)
        y = kernels.linear_q4(x2, self.panels, self.out_features, self.bias)
        return y.view(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        """Shape summary shown by `print(model)`."""
        fmt = "q4_1" if self.panels.shape[2] > kernels.layout.Q4_CODE_BYTES + 2 * kernels.PANEL else "q4_0"
        return f"in_features={self.in_features}, out_features={self.out_features}, {fmt}, bias={self.bias is not None}"
