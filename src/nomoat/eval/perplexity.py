"""Log-likelihood scoring and perplexity on text or chat data.

Perplexity is `exp(total NLL / label tokens)`: the token-weighted mean negative log-likelihood over every label
token of the dataset (not a mean of per-example perplexities). The data module decides which tokens are labels:
a text is `bos + text + eos`, every token after the first scored, cut into non-overlapping windows of `max_length`
tokens (each window's first token is context only); a conversation is rendered with the chat template and scored
on its assistant turns and their end-of-turn markers, exactly the tokens that training puts a loss on.

Batches are grouped by length under a token budget, and logits are computed only at labelled positions, a chunk
at a time, so the full-vocabulary logits of a batch never exist at once.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nomoat.data import (
    IGNORE_INDEX,
    Conversation,
    DataError,
    Example,
    Preference,
    Text,
    Tokenized,
    tokenize_example,
)
from nomoat.eval.columns import AdapterSpec, Columns
from nomoat.tokenizer import Tokenizer

__all__ = [
    "PerplexityResult",
    "default_max_length",
    "evaluate_perplexity",
    "perplexity",
    "score_sequences",
    "tokenize_for_perplexity",
]

_LOGIT_ELEMENTS = 1 << 24  # logits computed at once: positions x vocabulary (64 MiB in fp32)


@dataclass
class PerplexityResult:
    """Perplexity over a dataset.

    Attributes:
        nll: Mean negative log-likelihood per label token (nats).
        tokens: Label tokens scored.
        sequences: Sequences scored (a long text counts once per window).
        truncated: Conversations cut at `max_length` (their later assistant tokens are not scored).
        per_sequence: `(sum of NLL, label tokens)` of each sequence, in input order.
    """

    nll: float
    tokens: int
    sequences: int
    truncated: int = 0
    per_sequence: list[tuple[float, int]] | None = None

    @property
    def perplexity(self) -> float:
        """`exp(nll)`."""
        return math.exp(self.nll) if self.nll < 700 else math.inf

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (without the per-sequence values)."""
        return {"perplexity": self.perplexity, "nll": self.nll, "tokens": self.tokens, "sequences": self.sequences,
                "truncated": self.truncated}  # fmt: skip


def default_max_length(model: nn.Module, cap: int = 2048) -> int:
    """The longest sequence to score: the model's context, at most `cap`."""
    return min(int(model.config.max_position_embeddings), cap)


def _batches(lengths: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
    """Indices grouped longest first, each batch's padded size (rows x longest) within the budget."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@torch.inference_mode()
def score_sequences(
    model: nn.Module,
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
    max_batch_tokens: int = 4096,
    context: Callable[[int], contextlib.AbstractContextManager] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[float, int]]:
    """Log-likelihood of the labelled tokens of each sequence.

    Args:
        model: A nomoat `Transformer`.
        sequences: `(input_ids, labels)` pairs of equal length; `labels[t]` is the token to score at position `t`
            (predicted from positions `< t`) or `IGNORE_INDEX`. `labels[0]` is never scored.
        max_batch_tokens: Padded tokens per forward pass (a longer sequence runs alone).
        context: `context(batch_size)` is entered around each forward pass (e.g. an adapter plan).
        progress: Called with the number of sequences each batch finished.

    Returns:
        Per sequence, in input order: `(sum of log p(label), number of labels)`.
    """
    device = model.device
    out: list[tuple[float, int]] = [(0.0, 0)] * len(sequences)
    for batch in _batches([len(s[0]) for s in sequences], max_batch_tokens):
        T = len(sequences[batch[0]][0])
        ids = torch.zeros(len(batch), T, dtype=torch.long)
        labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros(len(batch), T, dtype=torch.long)
        for row, i in enumerate(batch):
            seq_ids, seq_labels = sequences[i]
            if len(seq_ids) != len(seq_labels):
                raise ValueError(f"sequence {i}: {len(seq_ids)} ids but {len(seq_labels)} labels")
            ids[row, : len(seq_ids)] = torch.tensor(list(seq_ids), dtype=torch.long)
            labels[row, : len(seq_ids)] = torch.tensor(list(seq_labels), dtype=torch.long)
            mask[row, : len(seq_ids)] = 1
        attention = None if bool(mask.all()) else mask.to(device)  # no padding: SDPA's fast causal path
        with context(len(batch)) if context is not None else contextlib.nullcontext():
            hidden = model(ids.to(device), attention_mask=attention, return_hidden=True)  # (B, T, D)
        targets = labels[:, 1:]  # position t predicts token t + 1
        rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
        sums = torch.zeros(len(batch), dtype=torch.float64)
        chunk = max(1, _LOGIT_ELEMENTS // int(model.config.vocab_size))
        for start in range(0, len(rows), chunk):
            r, c = rows[start : start + chunk], cols[start : start + chunk]
            logits = model.logits(hidden[r.to(device), c.to(device)]).float()  # (n, V)
            lp = torch.log_softmax(logits, dim=-1).gather(-1, targets[r, c].to(device)[:, None])[:, 0]
            sums.index_add_(0, r, lp.double().cpu())
        counts = torch.bincount(rows, minlength=len(batch))
        for row, i in enumerate(batch):
            out[i] = (float(sums[row]), int(counts[row]))
        if progress is not None:
            progress(len(batch))
    return out


def tokenize_for_perplexity(
    examples: Iterable[Example], tokenizer: Tokenizer, max_length: int, chat_template: str | None = None
) -> list[Tokenized]:
    """Token ids and labels to score: text windows (every token) and conversations (assistant tokens).

    Raises:
        DataError: A preference pair (score its chosen answers as conversations instead), or a conversation
            the chat template rejects.
    """
    out: list[Tokenized] = []
    for example in examples:
        if isinstance(example, Preference):
            raise DataError(f"{example.source or 'example'}: perplexity scores text or chat data, not preference "
                            "pairs; write the chosen answers as {\"messages\": [...]} records instead")  # fmt: skip
        out += tokenize_example(example, tokenizer, max_length, train_on="assistant", chat_template=chat_template)
    return out


def perplexity(
    model: nn.Module,
    data: Sequence[Example | Tokenized | str],
    tokenizer: Tokenizer | None = None,
    max_length: int | None = None,
    max_batch_tokens: int = 4096,
    context: Callable[[int], contextlib.AbstractContextManager] | None = None,
    progress: Callable[[int], None] | None = None,
) -> PerplexityResult:
    """Perplexity of one model (with whatever adapter `context` applies) over text or chat data.

    Args:
        model: A nomoat `Transformer`.
        data: `Text`/`Conversation` examples (e.g. `load_dataset(path).examples`), plain strings (texts), or
            already tokenized sequences.
        tokenizer: Needed unless `data` is tokenized.
        max_length: Longest sequence (default: the model's context, at most 2048).
        max_batch_tokens: Padded tokens per forward pass.
        context: `context(batch_size)` is entered around each forward pass.
        progress: Called with the number of sequences each batch finished.

    Returns:
        The result; `perplexity` is `inf`-free only when there are label tokens.

    Raises:
        DataError: No label token in the data (e.g. conversations without assistant turns), or bad examples.
    """
    tokenized = _tokenized(data, tokenizer, max_length or default_max_length(model))
    scores = score_sequences(model, [(t.input_ids, t.labels) for t in tokenized], max_batch_tokens, context, progress)
    return _result(scores, tokenized)


def _tokenized(
    data: Sequence[Example | Tokenized | str], tokenizer: Tokenizer | None, max_length: int
) -> list[Tokenized]:
    if all(isinstance(d, Tokenized) for d in data):
        return list(data)  # type: ignore[arg-type]
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to score examples that are not tokenized yet")
    examples = [Text(d) if isinstance(d, str) else d for d in data]
    if any(not isinstance(e, (Text, Conversation, Preference)) for e in examples):
        raise TypeError("perplexity data must be all examples (Text, Conversation, str) or all Tokenized")
    return tokenize_for_perplexity(examples, tokenizer, max_length)  # type: ignore[arg-type]


def _result(scores: list[tuple[float, int]], tokenized: Sequence[Tokenized]) -> PerplexityResult:
    tokens = sum(n for _, n in scores)
    if tokens == 0:
        raise DataError(
            "no token to score: every label is masked. Chat data needs assistant turns (perplexity is measured on "
            "the assistant's tokens); text data needs at least two tokens per record"
        )
    nll = -sum(s for s, _ in scores) / tokens
    truncated = sum(t.truncated for t in tokenized)
    return PerplexityResult(nll, tokens, len(tokenized), truncated, [(-s, n) for s, n in scores])


def evaluate_perplexity(
    model: nn.Module,
    tokenizer: Tokenizer,
    data: Sequence[Example | Tokenized | str],
    adapters: Mapping[str, AdapterSpec] | Columns | None = None,
    max_length: int | None = None,
    max_batch_tokens: int = 4096,
    progress: Callable[[int], None] | None = None,
) -> dict[str, PerplexityResult]:
    """Perplexity of the base model and of each adapter over the same data.

    Args:
        model: The base model.
        tokenizer: Its tokenizer.
        data: As in `perplexity`.
        adapters: `{name: folder or (folder, weight)}`, or prepared `Columns` (which may drop the base).
        max_length: Longest sequence (default: the model's context, at most 2048).
        max_batch_tokens: Padded tokens per forward pass.
        progress: Called with the number of sequences each batch finished (for every column).

    Returns:
        `{"base": result, adapter name: result, ...}`.
    """
    columns = adapters if isinstance(adapters, Columns) else Columns(model, tokenizer, adapters)
    tokenized = _tokenized(data, tokenizer, max_length or default_max_length(model))
    sequences = [(t.input_ids, t.labels) for t in tokenized]
    out: dict[str, PerplexityResult] = {}
    try:
        for name in columns.names:
            with columns.use(name) as column:
                scores = score_sequences(column.model, sequences, max_batch_tokens, column.forward, progress)
            out[name] = _result(scores, tokenized)
    finally:
        if columns is not adapters:  # made here: give the model back unwrapped
            columns.close()
    return out
