"""Memory-bounded causal-LM cross-entropy.

The full-vocabulary logits of a batch are the largest tensor of LoRA training (Qwen2.5: 151,936 floats per
token, 1.2 GB for 2 x 1024 tokens in fp32, and autograd keeps the softmax too). Here the output head runs only on
positions that have a label, in chunks, and each chunk is recomputed in the backward pass instead of stored: at
most `chunk` rows of logits exist at any time, in the forward and in the backward, and fewer where `chunk` rows
would pass `LOGITS_ELEMENTS` logits (a 128k vocabulary: 32 rows, 16 MB in fp32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nomoat.models import fused_ops

IGNORE_INDEX = -100
# Logits one chunk may hold (rows x vocabulary): bounds the chunk's memory whatever the vocabulary.
LOGITS_ELEMENTS = 1 << 22


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head.logits(hidden) if hasattr(head, "logits") else head(hidden)  # (n, V)
    return F.cross_entropy(logits.float(), targets, reduction="sum")


_BUFFERS: dict[tuple, torch.Tensor] = {}


def _logits_buffer(rows: int, chunk: int, weight: torch.Tensor) -> torch.Tensor:
    """A reused (rows, V) fp32 buffer for one chunk's logits.

    A fresh 50-150 MB tensor per chunk would be mapped and page-faulted anew each time (large allocations bypass
    the heap); reusing one keeps the head's matmul at full speed.
    """
    key = (chunk, weight.shape[0], weight.device)
    buf = _BUFFERS.get(key)
    if buf is None:
        _BUFFERS.clear()  # one size at a time: a new run or chunk size replaces the old buffer
        buf = _BUFFERS[key] = torch.empty(chunk, weight.shape[0], dtype=torch.float32, device=weight.device)
    return buf[:rows]


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `h W^T` whose gradients are computed in the forward pass, a chunk at a time.

    Each chunk's logits are formed once: the loss and `dloss/dlogits = softmax - onehot` come from the same
    logits, and `dloss/dh` (and `dloss/dW` when the head trains) are accumulated at once. The backward pass only
    scales them, so the output head costs two matmuls per labelled token instead of three (forward, recompute,
    backward), and at most one chunk of logits exists at any time.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk, softcap):  # noqa: ANN001, ANN205
        grad_h = torch.empty_like(h)  # (n, D)
        grad_w = torch.zeros_like(weight) if weight.requires_grad else None
        total = h.new_zeros((), dtype=torch.float32)
        for start in range(0, h.shape[0], chunk):
            hc, yc = h[start : start + chunk], targets[start : start + chunk]
            logits = _logits_buffer(len(yc), chunk, weight)  # (c, V) fp32
            if weight.dtype == torch.float32:
                torch.mm(hc, weight.t(), out=logits)
            else:
                logits.copy_(hc @ weight.t())  # a half-precision (c, V) temporary
            if softcap is None and fused_ops.applicable(logits):
                # One pass per row (L2-resident): the loss, and softmax - onehot in place of the logits.
                total += fused_ops.softmax_xent_(logits, yc).sum()
                g = logits.to(h.dtype)
                grad_h[start : start + chunk] = g @ weight
                if grad_w is not None:
                    grad_w.addmm_(g.t(), hc)
                continue
            dcap = None
            if softcap is not None:
                logits = torch.tanh(logits / softcap) * softcap
                dcap = 1.0 - (logits / softcap).pow_(2)  # d(cap * tanh(l / cap))/dl = 1 - tanh^2
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            total += (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
            g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            g[torch.arange(len(yc), device=g.device), yc] -= 1.0
            if dcap is not None:
                g.mul_(dcap)
            g = g.to(h.dtype)
            grad_h[start : start + chunk] = g @ weight
            if grad_w is not None:
                grad_w.addmm_(g.t(), hc)
        ctx.save_for_backward(grad_h, grad_w if grad_w is not None else torch.empty(0))
        ctx.has_w = grad_w is not None
        return total

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad, (grad_w * grad if ctx.has_w else None), None, None, None


def _fused_head(model: torch.nn.Module, device: torch.device) -> torch.Tensor | None:
    """The output head's weight when the fused loss applies.

    A plain bias-free linear head, without autocast or with a head already in the autocast dtype (a bf16 base
    under bf16 autocast: the products are the ones autocast would run).
    """
    head = getattr(model, "lm_head", None)
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    if torch.is_autocast_enabled(device.type) and head.weight.dtype != torch.get_autocast_dtype(device.type):
        return None
    return head.weight


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
        chunk: Labelled positions per chunk, at most (fewer where their logits would pass `LOGITS_ELEMENTS`).

    Returns:
        `(loss_sum, n_tokens)`: the summed loss (a 0-dim fp32 tensor with grad) and how many positions it covers.
    """
    targets = labels[:, 1:]  # (B, T-1)
    keep = targets != IGNORE_INDEX
    n = int(keep.sum())
    if n == 0:
        return hidden.sum() * 0.0, 0
    h = hidden[:, :-1][keep]  # (n, D): only the positions that have a label
    return token_loss_sum(model, h, targets[keep], chunk), n


def token_loss_sum(model: torch.nn.Module, h: torch.Tensor, y: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Summed cross-entropy of predicting tokens `y` (n,) from hidden states `h` (n, D), computed in chunks.

    The head runs on at most `chunk` rows at a time (fewer where the vocabulary is large: at most `LOGITS_ELEMENTS`
    logits a chunk); with grad, each chunk is recomputed in the backward pass. Returns a 0-dim fp32 tensor (with grad
    where `h` or the head has it).
    """
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab:
        chunk = max(1, min(chunk, LOGITS_ELEMENTS // vocab))
    weight = _fused_head(model, h.device)
    if weight is not None and torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        softcap = getattr(getattr(model, "config", None), "final_logit_softcap", None)
        return _LinearCrossEntropy.apply(h.to(weight.dtype), weight, y, chunk, softcap)
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, len(y), chunk):
        hc, yc = h[start : start + chunk], y[start : start + chunk]
        if torch.is_grad_enabled() and hc.requires_grad:
            total = total + checkpoint(_chunk_loss, model, hc, yc, use_reentrant=False)
        else:
            total = total + _chunk_loss(model, hc, yc)
    return total
