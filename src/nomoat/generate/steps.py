"""Generation as small functions over a model and its KV cache: `prefill`, `prefill_rows`, `decode_one_token`.

The engine (`engine.py`) schedules requests and calls these; each is one forward pass. Rows of the cache are chosen
by the caller (a slice, or a tensor of row indices for rows that are not contiguous).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from nomoat.inference import DecodeModel
from nomoat.models.kv_cache import KVCache
from nomoat.models.transformer import Transformer

# A request's logits hook (a grammar mask, a logit bias): gets the row's logits (V,) fp32, returns new ones or None.
LogitsHook = Callable[[torch.Tensor], "torch.Tensor | None"]

Model = Transformer | DecodeModel


def apply_logits_hooks(logits: torch.Tensor, hooks: Sequence[LogitsHook | None]) -> torch.Tensor:
    """Pass row i of `logits` (B, V) through `hooks[i]` where it is set; returns the (possibly new) logits."""
    for i, hook in enumerate(hooks):
        if hook is not None:
            out = hook(logits[i])
            if out is not None:
                logits[i] = out
    return logits


def prefill(model: Model, cache: KVCache, row: int, prompt: Sequence[int], start: int = 0) -> torch.Tensor:
    """Run `prompt[start:]` into cache row `row` (positions `start..`), returning the last position's logits (V,)."""
    device = model.device
    ids = torch.tensor([list(prompt[start:])], device=device)
    positions = torch.arange(start, len(prompt), device=device)[None]
    hidden = model(ids, position_ids=positions, cache=cache, rows=slice(row, row + 1), return_hidden=True)
    return model.logits(hidden[:, -1])[0]


def prefill_rows(
    model: Model,
    cache: KVCache,
    rows: slice | torch.Tensor,
    prompts: Sequence[Sequence[int]],
    starts: Sequence[int] | None = None,
) -> torch.Tensor:
    """Run several prompts into cache `rows` in one forward, right-padded to the longest rest.

    Row i runs `prompts[i][starts[i]:]` at positions `starts[i]..` (default 0: the whole prompt); the positions before
    its start must already hold the prompt's keys and values (a restored prefix). Returns each prompt's last-position
    logits (B, V). Positions past a prompt's end hold padding's keys and values until its decode steps overwrite them
    (padding positions stop at the cache's last one); attention over the cache never reads a key beyond the query's
    position.
    """
    device = model.device
    starts = [0] * len(prompts) if starts is None else list(starts)
    rests = [list(p[s:]) for p, s in zip(prompts, starts)]
    lengths = torch.tensor([len(r) for r in rests], device=device)
    ids = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long, device=device)
    for i, r in enumerate(rests):
        ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    offsets = torch.tensor(starts, device=device)[:, None]  # (B, 1)
    positions = (offsets + torch.arange(ids.shape[1], device=device)).clamp(max=cache.k[0].shape[2] - 1)  # (B, T)
    hidden = model(ids, position_ids=positions, cache=cache, rows=rows, return_hidden=True)
    return model.logits(hidden[torch.arange(len(prompts), device=device), lengths - 1])


def feed_rows(model: Model, cache: KVCache, work: Sequence[tuple[int, Sequence[int], int]]) -> None:
    """For each `(row, seq, start)` of `work`, write the keys and values of `seq[start:]` into `row`, in one forward.

    Positions are `start..`; no logits are computed. Shorter rows are padded by repeating their last token at its own
    position: the copy computes the same keys and values as the token (the same input over the same cached keys), so
    writing them twice changes nothing.
    """
    if not work:
        return
    device = model.device
    width = max(len(seq) - start for _, seq, start in work)
    ids = torch.tensor([list(seq[start:]) + [seq[-1]] * (width - len(seq) + start) for _, seq, start in work],
                       device=device)  # fmt: skip  # (R, width)
    positions = torch.tensor([list(range(start, len(seq))) + [len(seq) - 1] * (width - len(seq) + start)
                              for _, seq, start in work], device=device)  # fmt: skip  # (R, width)
    rows = torch.tensor([row for row, _, _ in work], device=device)
    model(ids, position_ids=positions, cache=cache, rows=rows, return_hidden=True)


def decode_one_token(
    model: Model | Callable[..., torch.Tensor], cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """One token for each of the first B cache rows: tokens and positions (B, 1); returns logits (B, V).

    `model` is the model or its (compiled) forward.
    """
    kv_len = int(positions.max()) + 1
    logits = model(tokens, position_ids=positions, cache=cache, rows=slice(0, tokens.shape[0]), kv_len=kv_len)
    return logits[:, -1]
