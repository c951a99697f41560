"""The LoRA update, written once: on activations (`lora_delta`, every forward pass) and as a weight (`delta_weight`).

`lora_delta` is what the training layer (`LoRALinear`) and the serving bank (`AdapterBank`'s layers) add to their
base output; `lora_up` is its second half, for training's fused functions that keep `x A^T` for their backward pass.
`delta_weight` is what merging adds to a base weight. All keep PEFT's order of operations (`x A^T`, then `B`, then
the scaling), so outputs agree with `peft` to rounding.
"""

from __future__ import annotations

import torch

__all__ = ["delta_weight", "lora_delta", "lora_up"]


def lora_delta(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """`scaling * (x A^T) B^T`, or `out + scaling * (x A^T) B^T` when `out` is given.

    Args:
        x: Input (..., in), in the adapter's dtype.
        a: `A` (r, in).
        b: `B` (out, r) (a transposed view of a stored `B^T` (r, out) works as well).
        scaling: The factor (`alpha / r`, times a selection weight where one applies).
        out: A 2-D base output (N, out) to add the update to: in place (one `addmm_`, no (N, out) temporary)
            unless it is a view, which autograd does not let an in-place update change.

    Returns:
        The update (..., out) in `x`'s dtype, or `out` with the update added.
    """
    return lora_up(x @ a.t(), b, scaling, out)  # x A^T: (..., r)


def lora_up(xa: torch.Tensor, b: torch.Tensor, scaling: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """The second half of `lora_delta`, for callers that keep the rank-r product `xa = x A^T` (..., r) themselves.

    Training's fused autograd functions (`lora.group`, the SwiGLU down projection in `lora.layers`) need `xa` for
    their backward pass, so they compute it once and pass it here. Arguments as in `lora_delta`.
    """
    if out is None:
        return (xa @ b.t()) * scaling  # (..., out)
    if out._base is not None:
        return torch.addmm(out, xa, b.t(), alpha=scaling)
    return out.addmm_(xa, b.t(), alpha=scaling)


def delta_weight(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The update as a weight: `scaling * B A` (out, in), in the factors' dtype."""
    return (b @ a) * scaling
