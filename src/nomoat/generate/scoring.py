"""Scoring whole prompts with the engine's decode model: prompt token logprobs and pooled hidden states.

Each prompt token's log-probability is what evaluation harnesses' loglikelihood asks for through `echo` with
`logprobs`; the pooled hidden states are embeddings.

Both run one forward over the prompt without the KV cache, under the engine's lock (between two decode steps), with
the request's adapter selection applied through the engine's adapter bank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from nomoat.generate.engine import AdapterSelection, Engine, TokenLogprob
from nomoat.lora.bank import group_rows


def _hidden(engine: Engine, ids: Sequence[int], adapter: AdapterSelection) -> torch.Tensor:
    """The final normed hidden states (T, D) of a prompt."""
    device = engine.model.device
    plan: Any = contextlib.nullcontext()
    if adapter and engine.bank is not None:
        plan = engine.bank.plan(group_rows([tuple(adapter)], device))
    tokens = torch.tensor([list(ids)], device=device)  # (1, T)
    positions = torch.arange(len(ids), device=device)[None]  # (1, T)
    with engine.lock, plan, torch.inference_mode():
        engine.refresh()
        return engine.decode(tokens, position_ids=positions, return_hidden=True)[0]  # (T, D)


def prompt_logprobs(engine: Engine, ids: Sequence[int], adapter: AdapterSelection = (),
                    top: int = 0) -> list[TokenLogprob | None]:  # fmt: skip
    """Log-probability of each prompt token given the tokens before it (None for the first), with `top` alternatives.

    Raises:
        ValueError: The prompt is longer than the engine's rows.
    """
    if len(ids) > engine.max_seq_len:
        raise ValueError(f"the prompt has {len(ids)} tokens; this engine holds at most {engine.max_seq_len}")
    hidden = _hidden(engine, ids, adapter)
    with torch.inference_mode():
        logp = engine.decode.logits(hidden[:-1]).float().log_softmax(-1)  # (T-1, V)
        targets = torch.tensor(list(ids[1:]), device=logp.device)
        chosen = logp.gather(1, targets[:, None])[:, 0].tolist()
        tops = logp.topk(top, dim=-1) if top else None
    out: list[TokenLogprob | None] = [None]
    for t, value in enumerate(chosen):
        alts = list(zip(tops.indices[t].tolist(), tops.values[t].tolist())) if tops is not None else []
        out.append(TokenLogprob(int(ids[t + 1]), value, alts))
    return out


def embedding(engine: Engine, ids: Sequence[int], adapter: AdapterSelection = ()) -> torch.Tensor:
    """The prompt's embedding (D,): the mean over positions of the final normed hidden state, L2-normalised."""
    hidden = _hidden(engine, ids, adapter).float()
    return torch.nn.functional.normalize(hidden.mean(0), dim=0)
