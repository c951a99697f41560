"""Attention over packed rows: several examples laid end to end in one row, each attending only within itself.

`Segments` says where the examples of each row lie; an example may also continue another one of the same row (its
shared prefix: a preference pair's prompt, computed once for both answers), in which case its queries see all of
that prefix and causally their own tokens. `segment_attention` computes it per example with no (T, T) mask: through
torch's CPU flash-attention kernels as one autograd node where they apply, else through a per-example fallback.
`share_prefixes` lays rows that begin alike (G completions of one prompt) out that way: each prefix once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

Span = tuple[int, int]

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CPU_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


class Segments:
    """Where the examples of packed (or right-padded) rows lie: `spans[b]` lists `(start, end)` per example of row b.

    `prefixes[b][i]` is the span that example `i` of row `b` continues (None for most): its queries also see every
    token of that span, whose positions come first. Positions outside every span (padding) get zero outputs.

    Args:
        segment_ids: (B, T): 1, 2, ... for the examples of each row in order, 0 for padding.
        prefix_ids: (B, T) or None: for each token, the segment id of the example its own continues (0: none).
    """

    def __init__(self, segment_ids: torch.Tensor, prefix_ids: torch.Tensor | None = None) -> None:
        ids = segment_ids.tolist()
        parents = prefix_ids.tolist() if prefix_ids is not None else None
        self.spans: list[list[Span]] = []
        self.prefixes: list[list[Span | None]] = []
        for b, row in enumerate(ids):
            spans, starts, start = [], {}, 0
            for t in range(1, len(row) + 1):
                if t == len(row) or row[t] != row[start]:
                    if row[start] != 0:
                        spans.append((start, t))
                        starts[row[start]] = (start, t)
                    start = t
            self.spans.append(spans)
            self.prefixes.append([_prefix_of(parents[b][s] if parents else 0, starts, row[s]) for s, _ in spans])
        self.T = segment_ids.shape[1]

    @property
    def trivial(self) -> bool:
        """Every row is one example covering the whole row: plain causal attention does it in one call."""
        return all(len(s) == 1 and s[0] == (0, self.T) for s in self.spans)

    @property
    def longest(self) -> int:
        """The most keys any query sees (its prefix included)."""
        return max((e - s + _length(p) for spans, pre in zip(self.spans, self.prefixes)
                    for (s, e), p in zip(spans, pre)), default=0)  # fmt: skip


def _prefix_of(parent: int, starts: dict[int, Span], own: int) -> Span | None:
    if not parent:
        return None
    if parent not in starts or parent == own:
        raise ValueError(f"segment {own} continues segment {parent}, which is not another example of its row")
    return starts[parent]


def _length(span: Span | None) -> int:
    return 0 if span is None else span[1] - span[0]


def _keys(x: torch.Tensor, b: int, span: Span, prefix: Span | None) -> torch.Tensor:
    """Row `b`'s keys (or values) an example sees, (1, n_kv, P + L, hd): its prefix's, then its own."""
    own = x[b : b + 1, :, span[0] : span[1]]
    return own if prefix is None else torch.cat([x[b : b + 1, :, prefix[0] : prefix[1]], own], dim=2)


def _prefix_mask(length: int, prefix: int, window: int | None, device: torch.device) -> torch.Tensor:
    """(L, P + L) boolean: a query sees every prefix key and its own earlier tokens (within `window`, if any)."""
    q = torch.arange(length, device=device)[:, None] + prefix  # the query's position within prefix + own
    k = torch.arange(prefix + length, device=device)[None, :]
    allowed = k <= q
    return allowed & (k > q - window) if window is not None else allowed


def segment_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seg: Segments,
    scale: float,
    window: int | None,
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
    flash: bool = True,
) -> torch.Tensor:
    """Causal attention within each example of each row: (B, T, H, hd), zeros at padding.

    Args:
        q: Queries (B, H, T, hd).
        k: Keys (B, n_kv, T, hd), rotated at their positions.
        v: Values (B, n_kv, T, hd).
        seg: Where the examples lie.
        scale: The query scale.
        window: The layer's sliding window, or None.
        attend: The layer's attention under a boolean mask (None: causal), for the fallback path.
        flash: Whether torch's CPU flash kernels may run it (False where the layer soft-caps its scores).
    """
    if (
        flash
        and _FLASH_CPU_BACKWARD is not None
        and q.device.type == "cpu"
        and q.dtype in (torch.float32, torch.bfloat16)
        and (window is None or seg.longest <= window)
    ):
        padded = any(sum(e - s for s, e in spans) < seg.T for spans in seg.spans)
        return _SegmentAttentionFn.apply(q, k, v, seg, scale, padded)
    rows = []
    for b, (spans, prefixes) in enumerate(zip(seg.spans, seg.prefixes)):
        pieces, at = [], 0
        for (start, end), prefix in zip(spans, prefixes):
            if start > at:
                pieces.append(q.new_zeros(1, start - at, q.shape[1], q.shape[3]))
            mask = None
            if prefix is not None or (window is not None and end - start > window):
                mask = _prefix_mask(end - start, _length(prefix), window, q.device)
            sl = slice(start, end)
            out = attend(q[b : b + 1, :, sl], _keys(k, b, (start, end), prefix), _keys(v, b, (start, end), prefix),
                         mask)  # fmt: skip
            pieces.append(out.transpose(1, 2))  # (1, L, H, hd)
            at = end
        if at < seg.T:
            pieces.append(q.new_zeros(1, seg.T - at, q.shape[1], q.shape[3]))
        rows.append(torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0])
    return torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]


class _SegmentAttentionFn(torch.autograd.Function):
    """Causal attention within each packed example, as one autograd node over torch's CPU flash-attention kernels.

    Run through autograd, each example's attention is a slice of q/k/v, an SDPA call and a concatenation, and the
    backward pass of every slice allocates a zero-filled gradient of the whole (B, H, T, hd) tensor to add into: three
    per example and layer. Here the forward writes each example's output into one (B, T, H, hd) tensor and the
    backward writes each example's q/k/v gradients into one tensor each; the kernels and their arithmetic are the
    same as `F.scaled_dot_product_attention(is_causal=True)` on CPU, so the results are bit-identical. An example
    with a prefix runs under an additive mask over its prefix's keys and its own; its key and value gradients at the
    prefix are added to the prefix's own.
    """

    @staticmethod
    def forward(ctx, q, k, v, seg, scale, padded):  # noqa: ANN001, ANN205
        B, H, T, hd = q.shape
        out = q.new_zeros(B, T, H, hd) if padded else q.new_empty(B, T, H, hd)
        lses, masks = [], []
        for b, (spans, prefixes) in enumerate(zip(seg.spans, seg.prefixes)):
            for (start, end), prefix in zip(spans, prefixes):
                sl = slice(start, end)
                mask = _additive(end - start, prefix, q) if prefix is not None else None
                o, lse = _FLASH_CPU(q[b : b + 1, :, sl], _keys(k, b, (start, end), prefix),
                                    _keys(v, b, (start, end), prefix), 0.0, mask is None, attn_mask=mask,
                                    scale=scale)  # fmt: skip
                out[b : b + 1, sl] = o.transpose(1, 2)
                lses.append(lse)
                masks.append(mask)
        ctx.save_for_backward(q, k, v, out, *lses)
        ctx.seg, ctx.scale, ctx.padded, ctx.masks = seg, scale, padded, masks
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        q, k, v, out, *lses = ctx.saved_tensors
        seg = ctx.seg
        shared = any(p is not None for pre in seg.prefixes for p in pre)
        new = torch.zeros_like if ctx.padded or shared else torch.empty_like
        gq, gk, gv = new(q), new(k), new(v)
        i = 0
        for b, (spans, prefixes) in enumerate(zip(seg.spans, seg.prefixes)):
            for (start, end), prefix in zip(spans, prefixes):
                sl, mask = slice(start, end), ctx.masks[i]
                g = _FLASH_CPU_BACKWARD(grad[b : b + 1, sl].transpose(1, 2), q[b : b + 1, :, sl],
                                        _keys(k, b, (start, end), prefix), _keys(v, b, (start, end), prefix),
                                        out[b : b + 1, sl].transpose(1, 2), lses[i], 0.0, mask is None,
                                        attn_mask=mask, scale=ctx.scale)  # fmt: skip
                gq[b : b + 1, :, sl] = g[0]
                p = _length(prefix)
                if prefix is not None:
                    gk[b : b + 1, :, prefix[0] : prefix[1]] += g[1][:, :, :p]
                    gv[b : b + 1, :, prefix[0] : prefix[1]] += g[2][:, :, :p]
                if shared:
                    gk[b : b + 1, :, sl] += g[1][:, :, p:]
                    gv[b : b + 1, :, sl] += g[2][:, :, p:]
                else:
                    gk[b : b + 1, :, sl], gv[b : b + 1, :, sl] = g[1], g[2]
                i += 1
        return gq, gk, gv, None, None, None


def _additive(length: int, prefix: Span, like: torch.Tensor) -> torch.Tensor:
    """(1, 1, L, P + L) additive mask of `_prefix_mask` (no window) in `like`'s dtype."""
    allowed = _prefix_mask(length, _length(prefix), None, like.device)
    return torch.zeros(allowed.shape, dtype=like.dtype, device=like.device).masked_fill_(~allowed, float("-inf"))[
        None, None
    ]


class SharedRows(NamedTuple):
    """Rows laid out in one packed row, each shared prefix once (`share_prefixes`)."""

    input_ids: torch.Tensor  # (1, S)
    position_ids: torch.Tensor  # (1, S)
    segment_ids: torch.Tensor  # (1, S)
    prefix_ids: torch.Tensor  # (1, S)
    index: torch.Tensor  # (N, T): where each token of each original row lies in the packed row (0 at padding)


def share_prefixes(input_ids: torch.Tensor, position_ids: torch.Tensor, lengths: list[int],
                   shared: list[int]) -> SharedRows:  # fmt: skip
    """One packed row holding single-example rows, the prefix that consecutive rows share computed once.

    Consecutive rows whose first `shared[n]` tokens are the same (the same count and ids: G completions of one
    prompt) form a group: the packed row holds the group's prefix as one example, then each row's remaining tokens
    as an example that continues it (keeping their positions), so every token attends to exactly what it saw in its
    own row. A row with nothing after the prefix adds no example (its tokens are the prefix's); a row with
    `shared[n] == 0` is an example of its own.

    Args:
        input_ids: (N, T) right-padded rows.
        position_ids: (N, T) their positions.
        lengths: Each row's real tokens.
        shared: Each row's leading tokens that it may share with its neighbours (at most its length).
    """
    ids, pos = input_ids.tolist(), position_ids.tolist()
    out_ids: list[int] = []
    out_pos: list[int] = []
    out_seg: list[int] = []
    out_pre: list[int] = []
    index = [[0] * input_ids.shape[1] for _ in ids]
    segment, prefix_start, prefix_seg, group_key = 0, 0, 0, None

    def emit(row: int, start: int, end: int, parent: int) -> None:
        nonlocal segment
        segment += 1
        index[row][start:end] = range(len(out_ids), len(out_ids) + end - start)
        out_ids.extend(ids[row][start:end])
        out_pos.extend(pos[row][start:end])
        out_seg.extend([segment] * (end - start))
        out_pre.extend([parent] * (end - start))

    for n, (length, p) in enumerate(zip(lengths, shared)):
        key = (p, tuple(ids[n][:p])) if p else None
        if key is None:
            emit(n, 0, length, 0)
            group_key = None
            continue
        if key != group_key:
            prefix_start, group_key = len(out_ids), key
            emit(n, 0, p, 0)
            prefix_seg = segment
        else:
            index[n][:p] = range(prefix_start, prefix_start + p)
        if length > p:
            emit(n, p, length, prefix_seg)
    as_row = lambda values: torch.tensor([values], dtype=torch.long, device=input_ids.device)  # noqa: E731
    return SharedRows(as_row(out_ids), as_row(out_pos), as_row(out_seg), as_row(out_pre),
                      torch.tensor(index, dtype=torch.long, device=input_ids.device))  # fmt: skip


__all__ = ["Segments", "SharedRows", "segment_attention", "share_prefixes"]
