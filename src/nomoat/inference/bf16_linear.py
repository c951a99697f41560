"""`Bf16Linear`: a bf16 linear layer of the decode model that reads the user's weight in place (never a second copy).

A bf16 model's weights stay in their own (out, in) row-major layout, shared with the user's `nn.Linear` (or with the
embedding, for a tied output head), so a bf16 model's decode model adds no weight memory. Decode calls (a few rows)
run `kernels.linear_bf16_rows` (fp32 sums; where the CPU has AVX-512-BF16 the activations are rounded to bf16 in
registers for its dot products, as the model's own bf16 layers round them, else exact fp32 activations); prefill
calls (many rows) run torch's bf16 matmul (oneDNN: AVX-512-BF16 / AMX where the CPU has them), as the model itself
would. The one-call decode stack (`stack.py`) reads the same weights. Decode streams every weight once per token, so
the weight's memory is moved into huge pages where it lies (`hugepages.advise`: fewer TLB misses, the same bytes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nomoat import kernels
from nomoat.kernels import hugepages

DECODE_ROWS = 16  # up to this many rows a call runs the decode kernel; above, torch's bf16 matmul


class Bf16Linear(nn.Module):
    """`y = x W^T + b` over a bf16 weight `W` (out, in) shared with the user's layer (inference only).

    Args:
        weight: bf16 (out, in), contiguous, on the CPU: the user's tensor itself (its storage is shared).
        bias: The user's bias or None (an fp32 copy is kept for the decode kernel: `out` floats).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("bf16_weight", weight.detach(), persistent=False)
        hugepages.advise(self.bf16_weight)  # in place: decode reads it every token
        self.register_buffer("bias", None if bias is None else bias.detach().float(), persistent=False)

    @classmethod
    def from_module(cls, module: nn.Module) -> Bf16Linear | None:
        """The decode form of a bf16 CPU `nn.Linear` (its weight shared), or None where it has none."""
        if type(module) is not nn.Linear:
            return None
        w, b = module.weight, module.bias
        if w.dtype != torch.bfloat16 or w.device.type != "cpu" or not w.is_contiguous():
            return None
        if b is not None and (not b.dtype.is_floating_point or b.device.type != "cpu"):
            return None
        return cls(w, b)

    def weight(self) -> torch.Tensor:
        """The (out, in) fp32 weight (a new tensor)."""
        return self.bf16_weight.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer to `x` (..., in): fp32 sums, the result in `x`'s dtype."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (M, in)
        if x2.shape[0] <= DECODE_ROWS:
            y = kernels.linear_bf16_rows(x2.float(), self.bf16_weight, self.bias)
        else:
            bias = None if self.bias is None else self.bias.to(torch.bfloat16)
            y = F.linear(x2.to(torch.bfloat16), self.bf16_weight, bias)
        return y.view(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        """Shape summary shown by `print(model)`."""
        shape = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{shape}, bf16 (shared), bias={self.bias is not None}"
