"""Training's memory-lean steps: the compiled elementwise kernels, and lean RMSNorm and SwiGLU autograd functions.

The autograd functions keep only what their backward pass needs.

The kernels live in `nomoat.kernels` (C++ in `nomoat/kernels/csrc/fused_ops.cpp`, `torch.ops.nomoat.*`); this module
keeps the names training imports and says whether they take given tensors (`applicable`): where they do not,
callers keep their own torch code.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from nomoat.kernels import ops
from nomoat.kernels.ops import rope, softmax_xent_, swiglu_backward, swiglu_forward

__all__ = ["RMSNormFn", "SwiGLUFn", "applicable", "get", "rope", "softmax_xent_", "swiglu_backward", "swiglu_forward"]


def get() -> Any:
    """The compiled ops (`torch.ops.nomoat`), building them on first call; None where unavailable (logged once)."""
    return torch.ops.nomoat if ops.available() else None


def applicable(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can take these tensors: fp32, CPU, contiguous, and the kernels built."""
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors) and (
        ops.available()
    )


class RMSNormFn(torch.autograd.Function):
    """RMSNorm for training that keeps only its input and the per-token `1/rms` for the backward pass.

    Autograd over the plain expression would also keep the fp32 normalised copy; with LoRA every saved activation
    counts, since the base weights need no gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: bool) -> torch.Tensor:  # noqa: ANN001, D102
        h = x.float()
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        ctx.offset = offset
        if offset:
            return (h * rstd * (1.0 + weight.float())).type_as(x)
        return weight * (h * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205, D102
        x, weight, rstd = ctx.saved_tensors
        hn = x.float() * rstd
        scale = (1.0 + weight.float()) if ctx.offset else weight.float()
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad.float() * hn).reshape(-1, hn.shape[-1]).sum(0).to(weight.dtype)
        gy = grad.float() * scale  # gradient with respect to the normalised input
        mean = (gy * hn).mean(-1, keepdim=True)
        grad_x = gy.sub_(hn.mul_(mean)).mul_(rstd)  # rstd * (gy - hn * mean), in place
        return grad_x.to(x.dtype), grad_w, None, None


class SwiGLUFn(torch.autograd.Function):
    """`silu(gate) * up` for training, keeping only `gate` and `up` (the activation is recomputed in backward)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # noqa: ANN001, D102
        ctx.save_for_backward(gate, up)
        if applicable(gate, up):
            return swiglu_forward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205, D102
        gate, up = ctx.saved_tensors
        if applicable(gate, up, grad):
            return swiglu_backward(gate, up, grad.clone())  # one pass (the clone becomes grad_gate)
        sig = torch.sigmoid(gate)
        act = gate * sig
        grad_gate = grad * up * sig * (1.0 + gate * (1.0 - sig))
        return grad_gate, grad * act
