"""Per-token log-probabilities of a batch's label tokens through a memory-bounded output head (the RL recipes).

RL's losses need each completion token's log-probability with its gradient, not a summed cross-entropy. Here, as
in `nomoat.train.loss`, the output head runs only on the positions that have a label, in chunks: at most `chunk`
rows of full-vocabulary logits exist at any time. With a frozen bias-free linear head (LoRA training), each chunk's
gradient with respect to the hidden states is formed in the forward pass from the same logits (`d log p / d h =
(onehot - softmax) W / t`: one (D,) row per token), so the head costs two matmuls per label token and the backward
pass only scales those rows by the incoming gradient.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from nomoat.data import IGNORE_INDEX
from nomoat.models import fused_ops
from nomoat.train.loss import _logits_buffer

__all__ = ["label_logps"]


class _HeadLogps(torch.autograd.Function):
    """Log-probabilities (n,) of `targets` under `softmax(h W^T / t)`, with `d/dh` formed in the forward pass."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk, inv_t):  # noqa: ANN001, ANN205
        n = h.shape[0]
        need_grad = ctx.needs_input_grad[0]
        logps = torch.empty(n, dtype=torch.float32, device=h.device)  # (n,)
        basis = torch.empty_like(h) if need_grad else None  # (n, D): d log p / d h per row
        for start in range(0, n, chunk):
            hc, yc = h[start : start + chunk], targets[start : start + chunk]
            if weight.dtype == torch.float32:
                logits = torch.mm(hc, weight.t(), out=_logits_buffer(len(yc), chunk, weight))  # (c, V)
            else:
                logits = (hc @ weight.t()).float()
            if inv_t != 1.0:
                logits.mul_(inv_t)
            if fused_ops.applicable(logits):
                xent = fused_ops.softmax_xent_(logits, yc)  # (c,); logits become softmax - onehot
            else:
                lse = torch.logsumexp(logits, dim=-1)  # (c,)
                xent = lse - logits.gather(1, yc[:, None]).squeeze(1)
                logits.sub_(lse[:, None]).exp_()[torch.arange(len(yc), device=h.device), yc] -= 1.0
            logps[start : start + len(yc)] = -xent
            if basis is not None:
                torch.mm(logits.to(h.dtype), weight, out=basis[start : start + len(yc)]).mul_(-inv_t)
        ctx.save_for_backward(basis if basis is not None else torch.empty(0))
        return logps

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        (basis,) = ctx.saved_tensors
        return basis * grad[:, None].to(basis.dtype), None, None, None, None


def _frozen_head(model: torch.nn.Module, h: torch.Tensor) -> torch.Tensor | None:
    """The output head's weight where `_HeadLogps` computes it: a frozen bias-free linear head, no soft-capping."""
    head = getattr(model, "lm_head", None)
    if type(head) is not torch.nn.Linear or head.bias is not None or head.weight.requires_grad:
        return None
    if getattr(getattr(model, "config", None), "final_logit_softcap", None) is not None:
        return None
    if torch.is_autocast_enabled(h.device.type) and head.weight.dtype != torch.get_autocast_dtype(h.device.type):
        return None
    return head.weight


def _chunk_logps(model: torch.nn.Module, h: torch.Tensor, y: torch.Tensor, inv_t: float) -> torch.Tensor:
    logits = (model.logits(h) if hasattr(model, "logits") else model.lm_head(h)).float() * inv_t  # (c, V)
    return torch.log_softmax(logits, dim=-1).gather(1, y[:, None]).squeeze(1)  # (c,)


def label_logps(
    model: torch.nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    chunk: int = 256,
    index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of the label tokens under the logits divided by `temperature`, and their mask.

    Equal to `token_logps(model.logits(hidden) / temperature, labels)` (`nomoat.train.rl`) without ever forming
    the logits of more than `chunk` positions, nor those of unlabelled positions (prompts, padding).

    Args:
        model: The `Transformer` whose head (`logits`, `lm_head`) maps hidden states to logits.
        hidden: Final normed hidden states (N, T, D), or (B, S, D) with `index`.
        labels: (N, T) token ids, `IGNORE_INDEX` where no log-probability is wanted.
        temperature: The sampling temperature (0 or 1: the logits as they are).
        chunk: Label positions per chunk of the head.
        index: (N, T): where token t of row n lies in `hidden` flattened to (B x S, D) (rows laid out otherwise,
            e.g. `nomoat.models.segments.share_prefixes`); None: `hidden` is (N, T, D) as the labels.

    Returns:
        `(logps, mask)`, both (N, T-1): log p(token t+1) (0 where masked) and whether position t has a label.
    """
    targets = labels[:, 1:]  # (N, T-1)
    mask = targets != IGNORE_INDEX
    inv_t = 1.0 / temperature if temperature > 0 else 1.0
    if index is None:
        h = hidden[:, :-1][mask]  # (n, D): only the positions that have a label
    else:
        h = hidden.flatten(0, 1)[index[:, :-1][mask]]  # (n, D)
    y = targets[mask]  # (n,)
    weight = _frozen_head(model, h)
    if weight is not None:
        values = _HeadLogps.apply(h.to(weight.dtype), weight, y, chunk, inv_t)
    else:
        parts = []
        for start in range(0, len(y), chunk):
            hc, yc = h[start : start + chunk], y[start : start + chunk]
            if torch.is_grad_enabled() and hc.requires_grad:  # recomputed in the backward pass, not kept
                parts.append(checkpoint(_chunk_logps, model, hc, yc, inv_t, use_reentrant=False))
            else:
                parts.append(_chunk_logps(model, hc, yc, inv_t))
        values = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    logps = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device).masked_scatter(mask, values.float())
    return logps, mask
