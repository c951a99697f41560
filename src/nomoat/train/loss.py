"""Memory-bounded causal-LM cross-entropy.

The full-vocabulary logits of a batch are the largest tensor of LoRA training (Qwen2.5: 151,936 floats per
token, 1.2 GB for 2 x 1024 tokens in fp32, and autograd keeps the softmax too). Here the output head runs only on
positions that have a label, in chunks, and each chunk is recomputed in the backward pass instead of stored: at
most `chunk` rows of logits exist at any time, in the forward and in the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head.logits(hidden) if hasattr(head, "logits") else head(hidden)  # (n, V)
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def causal_lm_loss_sum(
    model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk: int = 1024
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the labelled positions of a batch, computed in chunks.

    Position `t` of `hidden` predicts `labels[:, t + 1]` (labels are the input ids with `-100` where no loss is
    taken, unshifted, as in `transformers`).

    Args:
        model: Anything with `logits(hidden)` (a `Transformer`; soft-capping included) or a plain head module.
        hidden: Final normed hidden states (B, T, D).
        labels: Targets (B, T), `-100` where masked.
        chunk: Labelled positions per chunk.

    Returns:
        `(loss_sum, n_tokens)`: the summed loss (a 0-dim fp32 tensor with grad) and how many positions it covers.
    """
    targets = labels[:, 1:]  # (B, T-1)
    keep = targets != IGNORE_INDEX
    n = int(keep.sum())
    if n == 0:
        return hidden.sum() * 0.0, 0
    h = hidden[:, :-1][keep]  # (n, D): only the positions that have a label
    y = targets[keep]  # (n,)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk):
        hc, yc = h[start : start + chunk], y[start : start + chunk]
        if torch.is_grad_enabled() and hc.requires_grad:
            total = total + checkpoint(_chunk_loss, model, hc, yc, use_reentrant=False)
        else:
            total = total + _chunk_loss(model, hc, yc)
    return total, n
