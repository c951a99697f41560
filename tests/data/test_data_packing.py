"""Packing, length-grouped batches, collation, the resumable batch stream and the validation split."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
import transformers

from nomoat.data import (
    IGNORE_INDEX,
    BatchStream,
    DataError,
    Source,
    Tokenized,
    collate,
    length_grouped_batches,
    pack,
    split_validation,
)


def examples(n: int = 40, lo: int = 2, hi: int = 30, seed: int = 0, vocab: int = 64) -> list[Tokenized]:
    """Random sequences; the first half of each is masked (a prompt), labels[0] always masked."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ids = [rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))]
        labels = [IGNORE_INDEX if k < max(1, len(ids) // 2) else t for k, t in enumerate(ids)]
        out.append(Tokenized(ids, labels, source=Source("d.jsonl", i + 1)))
    return out


def test_pack_rows() -> None:
    data = examples()
    rows = pack(data, seq_len=64, seed=1)
    assert all(len(r) <= 64 for r in rows)
    # Every example is in exactly one row, intact, with positions restarting and segments numbered 1, 2, ...
    seen = []
    for r in rows:
        assert len(r.labels) == len(r.position_ids) == len(r.segment_ids) == len(r)
        segs = sorted(set(r.segment_ids))
        assert segs == list(range(1, len(segs) + 1)) and r.segment_ids == sorted(r.segment_ids)
        start = 0
        for n in r.seq_lengths:
            assert r.position_ids[start:start + n] == list(range(n))
            assert r.labels[start] == IGNORE_INDEX
            seen.append((tuple(r.input_ids[start:start + n]), tuple(r.labels[start:start + n])))
            start += n
        assert r.sources and len(r.sources) == len(segs)
    assert Counter(seen) == Counter((tuple(t.input_ids), tuple(t.labels)) for t in data)
    # Best-fit decreasing is close to the bound, and deterministic for a seed.
    total = sum(len(t) for t in data)
    assert len(rows) <= -(-total // 64) + 1
    assert [r.input_ids for r in pack(data, 64, seed=1)] == [r.input_ids for r in rows]


def test_pack_cuts_long_examples_and_masks_segment_starts() -> None:
    long = Tokenized(list(range(3, 23)), list(range(3, 23)))  # labels[0] not masked on purpose
    rows = pack([long, Tokenized([5, 6], [5, 6])], seq_len=8)
    assert [len(r) for r in rows] == [8, 2]
    assert rows[0].input_ids == list(range(3, 11)) and rows[0].labels[0] == IGNORE_INDEX
    assert rows[1].labels == [IGNORE_INDEX, 6]
    with pytest.raises(ValueError):
        pack([long], seq_len=0)


def test_collate() -> None:
    rows = pack(examples(6), seq_len=50)
    batch = collate(rows, pad_id=0)
    B, T = len(rows), max(len(r) for r in rows)
    for key in ("input_ids", "labels", "position_ids", "segment_ids"):
        assert batch[key].shape == (B, T) and batch[key].dtype == torch.long
    for b, r in enumerate(rows):
        n = len(r)
        assert batch["input_ids"][b, :n].tolist() == r.input_ids and (batch["input_ids"][b, n:] == 0).all()
        assert (batch["labels"][b, n:] == IGNORE_INDEX).all() and (batch["segment_ids"][b, n:] == 0).all()
    assert batch["num_label_tokens"] == sum(r.num_label_tokens for r in rows)
    assert batch["num_label_tokens"] == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert collate(rows, pad_id=9, pad_to=64)["input_ids"].shape == (B, 64)
    with pytest.raises(ValueError):
        collate(rows, pad_to=2)


def test_length_grouped_batches() -> None:
    data = examples(103, lo=1, hi=60)
    batches = length_grouped_batches(data, batch_size=8, seed=3, mega_batch_mult=4)
    assert sum(len(b) for b in batches) == 103 and all(len(b) <= 8 for b in batches)
    got = Counter(tuple(r.input_ids) for b in batches for r in b)
    assert got == Counter(tuple(t.input_ids) for t in data)
    for b in batches:
        assert all(r.segment_ids == [1] * len(r) and r.position_ids == list(range(len(r))) for r in b)
    # Grouping cuts padding compared with random batches.
    def padding(bs: list) -> int:
        return sum(max(len(r) for r in b) * len(b) - sum(len(r) for r in b) for b in bs)
    rng = random.Random(0)
    shuffled = [data[i] for i in rng.sample(range(103), 103)]
    random_batches = [[type(batches[0][0]).single(t) for t in shuffled[k:k + 8]] for k in range(0, 103, 8)]
    assert padding(batches) < padding(random_batches) / 2
    assert [[r.input_ids for r in b] for b in length_grouped_batches(data, 8, seed=3, mega_batch_mult=4)] == [
        [r.input_ids for r in b] for b in batches]


def _ids(stream: BatchStream, n: int) -> list[list[list[int]]]:
    out = []
    while len(out) < n:
        for batch in stream:
            out.append(batch["input_ids"].tolist())
            if len(out) == n:
                break
    return out


@pytest.mark.parametrize("batched", [False, True])
def test_batch_stream_resume(batched: bool) -> None:
    data = examples(30)
    items = length_grouped_batches(data, 4, seed=0) if batched else pack(data, 48)
    make = lambda: BatchStream(items, batch_size=3, seed=5)  # noqa: E731
    n_epoch = len(make())
    assert n_epoch == (len(items) if batched else -(-len(items) // 3))
    reference = _ids(make(), 3 * n_epoch)
    # Epochs differ (reshuffled) but each covers everything once.
    assert reference[:n_epoch] != reference[n_epoch:2 * n_epoch]
    for stop in (1, n_epoch - 1, n_epoch, n_epoch + 2):
        first = make()
        head = _ids(first, stop)
        state = first.state_dict()
        resumed = make()
        resumed.load_state_dict(state)
        assert head + _ids(resumed, 3 * n_epoch - stop) == reference
    with pytest.raises(ValueError, match="seed"):
        BatchStream(items, batch_size=3, seed=6).load_state_dict(state)
    with pytest.raises(DataError):
        BatchStream([], batch_size=3)


def test_batch_stream_drop_last_and_order() -> None:
    rows = pack(examples(10), 30)
    stream = BatchStream(rows, batch_size=4, drop_last=True, shuffle=False)
    assert len(stream) == len(rows) // 4
    batches = stream.batches(0)
    assert all(len(b) == 4 for b in batches) and batches[0][0] is rows[0]


def test_split_validation() -> None:
    data = list(range(100))
    train, val = split_validation(data, 0.1, seed=1)
    assert len(val) == 10 and sorted(train + val) == data and val == sorted(val)
    assert split_validation(data, 0.1, seed=1) == (train, val)
    assert split_validation(data, 0.1, seed=2)[1] != val
    assert len(split_validation(data, 7)[1]) == 7
    assert split_validation(data, 0) == (data, [])
    assert len(split_validation(data[:3], 0.01)[1]) == 1  # a positive fraction holds out at least one
    with pytest.raises(DataError, match="leaving none"):
        split_validation(data[:3], 3)
    with pytest.raises(ValueError):
        split_validation(data, 1.5)


def _block_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) additive mask: causal within a segment; padding attends only to itself."""
    T = segment_ids.shape[1]
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, :, None] > 0)
    allowed = same & torch.tril(torch.ones(T, T, dtype=torch.bool)) | torch.eye(T, dtype=torch.bool)
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]


def test_packed_loss_equals_unpacked_with_hf_llama() -> None:
    """A plain reference: transformers' Llama with a block-diagonal 4D mask and restarted positions."""
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    data = examples(8, lo=3, hi=20)
    batch = collate(pack(data, seq_len=40, seed=0))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=_block_mask(batch["segment_ids"]),
                       position_ids=batch["position_ids"]).logits
        # Token losses, shifted: position t predicts labels[t + 1].
        losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none")
        packed = {}
        for b in range(losses.shape[0]):
            for seg in batch["segment_ids"][b].unique().tolist():
                if seg:
                    ids = tuple(batch["input_ids"][b][batch["segment_ids"][b] == seg].tolist())
                    packed[ids] = losses[b][batch["segment_ids"][b, 1:] == seg].sum()  # targets in the segment
        assert len(packed) == len(data)
        for t in data:
            ref = model(input_ids=torch.tensor([t.input_ids])).logits
            loss = F.cross_entropy(ref[0, :-1], torch.tensor(t.labels[1:]), reduction="sum")
            torch.testing.assert_close(packed[tuple(t.input_ids)], loss, rtol=1e-5, atol=1e-5)
