"""The compiled training kernels (SwiGLU forward/backward, rope, softmax cross-entropy), as training code calls them.

The ops live in `nomoat.kernels` (C++ in `nomoat/kernels/csrc/fused_ops.cpp`, `torch.ops.nomoat.*`); this module
keeps the names training imports and says whether the compiled kernels take given tensors (`applicable`): where they
do not, callers keep their own torch code.
"""

from __future__ import annotations

from typing import Any

import torch

from nomoat.kernels import ops
from nomoat.kernels.ops import rope, softmax_xent_, swiglu_backward, swiglu_forward

__all__ = ["applicable", "get", "rope", "softmax_xent_", "swiglu_backward", "swiglu_forward"]


def get() -> Any:
    """The compiled ops (`torch.ops.nomoat`), building them on first call; None where unavailable (logged once)."""
    return torch.ops.nomoat if ops.available() else None


def applicable(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can take these tensors: fp32, CPU, contiguous, and the kernels built."""
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors) and (
        ops.available()
    )
