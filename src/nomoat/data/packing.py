"""Batching: `pack` examples into rows, `length_grouped_batches`, `collate`, `BatchStream`, `split_validation`.

Rows carry `position_ids` (restarting at 0 for each example) and `segment_ids` (1, 2, 3, ... per example within a
row, 0 for padding); the model builds a block-diagonal causal mask from `segment_ids`, so a packed example's loss
equals its loss alone. Labels are `render`'s (unshifted, -100 on masked tokens and on each example's first token).
`BatchStream`'s order depends only on its seed and the epoch, so its `state_dict()` resumes at the exact next batch.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from nomoat.data.formats import DataError
from nomoat.data.render import IGNORE_INDEX, Tokenized

__all__ = ["BatchStream", "Row", "collate", "length_grouped_batches", "pack", "split_validation"]

T = TypeVar("T")


@dataclass
class Row:
    """One row of a batch: one or more examples laid end to end (not padded).

    Attributes:
        input_ids: Token ids.
        labels: Unshifted labels, -100 where no loss is taken.
        position_ids: Position of each token within its own example.
        segment_ids: 1, 2, 3, ... for the examples of the row in order.
        sources: Where each example comes from.
    """

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    segment_ids: list[int]
    sources: list[Any] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_label_tokens(self) -> int:
        """Tokens with a loss (after the shift: the first token never has one)."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])

    @property
    def seq_lengths(self) -> list[int]:
        """Length of each example in the row (what varlen attention kernels call cu_seqlens differences)."""
        lengths: list[int] = []
        prev = None
        for s in self.segment_ids:
            if s != prev:
                lengths.append(0)
                prev = s
            lengths[-1] += 1
        return lengths

    @classmethod
    def single(cls, t: Tokenized) -> Row:
        """A row holding one example."""
        n = len(t.input_ids)
        return cls(list(t.input_ids), _first_masked(t.labels), list(range(n)), [1] * n, [t.source])

    def append(self, t: Tokenized) -> None:
        """Add an example at the end of the row, as a new segment."""
        seg = (self.segment_ids[-1] + 1) if self.segment_ids else 1
        n = len(t.input_ids)
        self.input_ids += t.input_ids
        self.labels += _first_masked(t.labels)
        self.position_ids += range(n)
        self.segment_ids += [seg] * n
        self.sources.append(t.source)


def _first_masked(labels: Sequence[int]) -> list[int]:
    out = list(labels)
    if out:
        out[0] = IGNORE_INDEX
    return out


def _fit(t: Tokenized, seq_len: int) -> Tokenized:
    """Cut an example longer than the row (keeping its start), as `render` does for max_length."""
    if len(t.input_ids) <= seq_len:
        return t
    return Tokenized(t.input_ids[:seq_len], t.labels[:seq_len], True, t.source)


def pack(tokenized: Sequence[Tokenized], seq_len: int, seed: int = 0) -> list[Row]:
    """Pack examples into rows of at most `seq_len` tokens (best-fit decreasing).

    Examples are shuffled with `seed` (so equal lengths are ordered at random), sorted longest first, and each
    is put into the row with the least room that still fits it. This wastes little space (rows are nearly full)
    and is O(n log n). An example longer than `seq_len` is cut to it. Rows come out in packing order; shuffle
    them with `BatchStream`.

    Args:
        tokenized: The examples.
        seq_len: Largest row length.
        seed: Tie-break seed.

    Returns:
        The rows (not padded).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    order = list(range(len(tokenized)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: -len(tokenized[i].input_ids))  # stable: ties keep the shuffled order
    rows: list[Row] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for i in order:
        t = _fit(tokenized[i], seq_len)
        n = len(t.input_ids)
        if n == 0:
            continue
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
            rows[r].append(t)
        else:
            room, r = seq_len, len(rows)
            rows.append(Row([], [], [], []))
            rows[r].append(t)
        if room - n > 0:
            bisect.insort(free, (room - n, r))
    return rows


def length_grouped_batches(
    tokenized: Sequence[Tokenized], batch_size: int, seed: int = 0, mega_batch_mult: int = 50
) -> list[list[Row]]:
    """Batches of similar lengths, for training without packing (less padding than random batches).

    The examples are shuffled, cut into mega-batches of `mega_batch_mult * batch_size`, each sorted by length
    and cut into batches; the batch order is then shuffled. Each example appears in exactly one batch.

    Args:
        tokenized: The examples.
        batch_size: Examples per batch (the last batch may be smaller).
        seed: Shuffle seed.
        mega_batch_mult: Mega-batch size in batches: larger groups lengths better but is less random.

    Returns:
        Batches of single-example rows; `collate` pads each to its longest.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    rng = random.Random(seed)
    order = list(range(len(tokenized)))
    rng.shuffle(order)
    mega = batch_size * max(1, mega_batch_mult)
    batches: list[list[Row]] = []
    for m in range(0, len(order), mega):
        group = sorted(order[m:m + mega], key=lambda i: -len(tokenized[i].input_ids))
        for b in range(0, len(group), batch_size):
            batches.append([Row.single(tokenized[i]) for i in group[b:b + batch_size]])
    rng.shuffle(batches)
    return batches


def collate(rows: Sequence[Row], pad_id: int | None = 0, pad_to: int | None = None) -> dict[str, Any]:
    """Pad rows on the right into tensors.

    Args:
        rows: The rows of the batch.
        pad_id: Id written in padding (its label is -100 and its segment 0, so it never matters); None means 0.
        pad_to: Pad to this length instead of the longest row (fixed shapes for compiled models).

    Returns:
        `input_ids`, `labels`, `position_ids`, `segment_ids`: (B, T) long tensors; `num_label_tokens`: the
        number of tokens with a loss after the shift (`labels[:, 1:] != -100`).
    """
    if not rows:
        raise ValueError("cannot collate an empty batch")
    T = max(len(r) for r in rows)
    if pad_to is not None:
        if pad_to < T:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest row ({T} tokens)")
        T = pad_to
    pad = 0 if pad_id is None else pad_id

    def tensor(key: str, fill: int) -> torch.Tensor:
        return torch.tensor([getattr(r, key) + [fill] * (T - len(r)) for r in rows], dtype=torch.long)  # (B, T)

    batch: dict[str, Any] = {
        "input_ids": tensor("input_ids", pad),
        "labels": tensor("labels", IGNORE_INDEX),
        "position_ids": tensor("position_ids", 0),
        "segment_ids": tensor("segment_ids", 0),
    }
    batch["num_label_tokens"] = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return batch


class BatchStream:
    """A deterministic, resumable stream of collated batches (what a `DataLoader` with a sampler does).

    Give it rows (they are shuffled each epoch and cut into batches of `batch_size`) or ready-made batches from
    `length_grouped_batches` (their order is shuffled each epoch). The order depends only on `seed` and the
    epoch, so `state_dict()` (epoch, index) saved with a checkpoint resumes at the exact next batch.

    In a data-parallel run every process builds the same stream of global batches (batch size x processes) and
    takes its `shard` of each: rank r of w gets the r-th of w contiguous, near-equal parts of the rows. The
    position counts global batches, so it does not depend on the number of processes. A rank whose part is
    empty (a last batch with fewer rows than processes) gets one padding token without a label.

    Iterating yields the rest of the current epoch; the next iteration starts the next epoch.
    """

    def __init__(self, items: Sequence[Row] | Sequence[Sequence[Row]], batch_size: int = 1, seed: int = 0,
                 epoch: int = 0, pad_id: int | None = 0, pad_to: int | None = None, shuffle: bool = True,
                 drop_last: bool = False, shard: tuple[int, int] = (0, 1)) -> None:
        """Set up the stream.

        Args:
            items: Rows, or batches (lists of rows).
            batch_size: Rows per batch (ignored for ready-made batches).
            seed: Shuffle seed; each epoch's order comes from (seed, epoch).
            epoch: Epoch to start at.
            pad_id: Padding id for `collate`.
            pad_to: Fixed length for `collate` (None: the batch's longest row).
            shuffle: Shuffle each epoch (off: the given order every epoch).
            drop_last: Drop a last incomplete batch of rows.
            shard: (rank, world size): the share of each batch this process takes.
        """
        if not items:
            raise DataError("no training rows: the dataset is empty after tokenization")
        self.batched = isinstance(items[0], (list, tuple))
        self.items = list(items)
        self.batch_size = batch_size
        self.seed, self.epoch, self.index = seed, epoch, 0
        self.pad_id, self.pad_to, self.shuffle, self.drop_last = pad_id, pad_to, shuffle, drop_last
        self.shard = shard
        if not self.batched and batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.batched:
            return len(self.items)
        full, rest = divmod(len(self.items), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def batches(self, epoch: int) -> list[list[Row]]:
        """The batches of an epoch, in order (uncollated)."""
        order = list(range(len(self.items)))
        if self.shuffle:
            random.Random(f"{self.seed}-{epoch}").shuffle(order)
        if self.batched:
            return [list(self.items[i]) for i in order]
        b = self.batch_size
        chunks = [[self.items[i] for i in order[k:k + b]] for k in range(0, len(order), b)]
        return chunks[:len(self)]  # drops an incomplete last batch when drop_last

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.index >= len(self):
            self.epoch, self.index = self.epoch + 1, 0
        batches = self.batches(self.epoch)
        while self.index < len(batches):
            rows = self._share(batches[self.index])
            self.index += 1  # counted before yielding: a state saved after using this batch resumes at the next
            yield collate(rows, self.pad_id, self.pad_to)
        self.epoch, self.index = self.epoch + 1, 0

    def _share(self, rows: list[Row]) -> list[Row]:
        rank, world = self.shard
        if world == 1:
            return rows
        part = rows[len(rows) * rank // world : len(rows) * (rank + 1) // world]
        pad = 0 if self.pad_id is None else self.pad_id
        return part or [Row([pad], [IGNORE_INDEX], [0], [1])]

    def state_dict(self) -> dict[str, int]:
        """The position: `{"epoch", "index", "seed", "num_batches"}`."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "num_batches": len(self)}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Resume at a saved position.

        Raises:
            ValueError: The saved stream had a different seed or number of batches (the data changed).
        """
        if state.get("seed", self.seed) != self.seed or state.get("num_batches", len(self)) != len(self):
            raise ValueError(f"the saved data position is for seed {state.get('seed')} and "
                             f"{state.get('num_batches')} batches per epoch, but this stream has seed {self.seed} and "
                             f"{len(self)}; resume with the same data, seq_len, batch size and seed (with several "
                             "processes: the same batch size x processes)")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def split_validation(examples: Sequence[T], size: float | int, seed: int = 0) -> tuple[list[T], list[T]]:
    """Hold out a deterministic random validation set.

    Args:
        examples: The examples.
        size: A fraction (a float in [0, 1); at least one example is held out when it is > 0), or a number of
            examples (an int); 0 holds out nothing.
        seed: Which examples are picked.

    Returns:
        (train, validation), each in the original order.

    Raises:
        DataError: The validation set would take every example.
    """
    n = len(examples)
    if isinstance(size, float):
        if not 0 <= size < 1:
            raise ValueError(f"a validation fraction must be in [0, 1), got {size}")
        count = max(1, round(n * size)) if size > 0 else 0
    else:
        count = int(size)
        if count < 0:
            raise ValueError(f"validation size must be >= 0, got {size}")
    if count == 0:
        return list(examples), []
    if count >= n:
        raise DataError(f"the validation split takes {count} of {n} examples, leaving none to train on; use a "
                        "smaller val_fraction / val_size or more data")
    picked = set(random.Random(seed).sample(range(n), count))
    return ([e for i, e in enumerate(examples) if i not in picked], [e for i, e in enumerate(examples) if i in picked])
