"""Packed rows: nomoat's per-example attention (forward and backward) against transformers with a block mask."""

from __future__ import annotations

import pytest
import torch

from nomoat.models import segments as sg
from nomoat.models.checkpoint import load_model

from hf_models import load_hf, make_hf_model

# Row 0: three examples (5, 9 and 10 tokens); row 1: two examples and 6 padding positions.
SEGMENTS = [[1] * 5 + [2] * 9 + [3] * 10, [1] * 12 + [2] * 6 + [0] * 6]


def _batch(vocab: int = 64):
    seg = torch.tensor(SEGMENTS)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, seg.shape, generator=g) * (seg > 0)
    pos = torch.zeros_like(seg)
    for b in range(seg.shape[0]):
        for s in seg[b].unique().tolist():
            where = seg[b] == s
            pos[b, where] = torch.arange(int(where.sum())) if s else 0
    return ids, pos, seg


def _block_mask(seg: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) additive mask: causal within an example; padding attends only to itself."""
    T = seg.shape[1]
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
    allowed = same & torch.tril(torch.ones(T, T, dtype=torch.bool)) | torch.eye(T, dtype=torch.bool)
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_packed_forward_and_backward_match_transformers(tmp_path, family, monkeypatch):
    make_hf_model(family, tmp_path)
    ref = load_hf(tmp_path).train()
    ours = load_model(tmp_path).train()
    ids, pos, seg = _batch()
    calls = []
    real = sg._SegmentAttentionFn.apply
    monkeypatch.setattr(sg._SegmentAttentionFn, "apply", lambda *a: calls.append(1) or real(*a))
    out = ours(ids, position_ids=pos, segment_ids=seg)
    assert len(calls) == ours.config.num_layers  # the one-node path ran in every layer
    expected = ref(input_ids=ids, attention_mask=_block_mask(seg), position_ids=pos).logits
    real_tokens = seg > 0
    torch.testing.assert_close(out[real_tokens], expected[real_tokens], rtol=1e-5, atol=1e-5)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)) * real_tokens[..., None]
    (out * w).sum().backward()
    (expected * w).sum().backward()
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        if "layers.0." in name or "layers.1." in name:
            expected_grad = ref_params[name].grad
            # fp32 rounding of differently ordered sums (flash kernel vs eager softmax): relative to the largest entry
            torch.testing.assert_close(p.grad, expected_grad, rtol=1e-4, atol=1e-4 * float(expected_grad.abs().max()),
                                       msg=lambda m, n=name: f"{n}: {m}")  # fmt: skip


def test_one_node_path_equals_per_example_autograd(tmp_path, monkeypatch):
    make_hf_model("qwen2", tmp_path)
    ids, pos, seg = _batch()
    results = []
    for flash_backward in (sg._FLASH_CPU_BACKWARD, None):  # None: the per-example autograd path
        monkeypatch.setattr(sg, "_FLASH_CPU_BACKWARD", flash_backward)
        model = load_model(tmp_path).train()
        out = model(ids, position_ids=pos, segment_ids=seg)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.equal(out_a, out_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7, msg=name)


# Row 0: a 6-token prompt (segment 1) continued by two answers (segments 2 and 3, 5 and 7 tokens), then a plain
# 4-token example; row 1: an answer-less prompt, a pair sharing a 3-token prompt, and padding.
SHARED = [[1] * 6 + [2] * 5 + [3] * 7 + [4] * 4, [1] * 4 + [2] * 3 + [3] * 6 + [4] * 5 + [0] * 4]
PARENT = [[0] * 6 + [1] * 5 + [1] * 7 + [0] * 4, [0] * 4 + [0] * 3 + [2] * 6 + [2] * 5 + [0] * 4]


def _shared_batch(vocab: int = 64):
    seg, parent = torch.tensor(SHARED), torch.tensor(PARENT)
    ids = torch.randint(3, vocab, seg.shape, generator=torch.Generator().manual_seed(2)) * (seg > 0)
    pos = torch.zeros_like(seg)
    for b in range(seg.shape[0]):
        for s in seg[b].unique().tolist():
            where = seg[b] == s
            if s:
                first = int(parent[b][where][0])
                start = int((seg[b] == first).sum()) if first else 0
                pos[b, where] = torch.arange(int(where.sum())) + start
    return ids, pos, seg, parent


def _shared_mask(seg: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) additive mask written out token by token: causal within an example, all of its prefix."""
    B, T = seg.shape
    allowed = torch.eye(T, dtype=torch.bool).repeat(B, 1, 1)
    for b in range(B):
        for i in range(T):
            for j in range(T):
                same = seg[b, i] > 0 and seg[b, j] == seg[b, i] and j <= i
                allowed[b, i, j] |= bool(same or (parent[b, i] > 0 and seg[b, j] == parent[b, i]))
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]


@pytest.mark.parametrize("flash", [True, False])
def test_shared_prefix_forward_and_backward_match_transformers(tmp_path, flash, monkeypatch):
    make_hf_model("llama3", tmp_path)
    if not flash:
        monkeypatch.setattr(sg, "_FLASH_CPU_BACKWARD", None)  # the per-example autograd path
    ref = load_hf(tmp_path).train()
    ours = load_model(tmp_path).train()
    ids, pos, seg, parent = _shared_batch()
    out = ours(ids, position_ids=pos, segment_ids=seg, prefix_ids=parent)
    expected = ref(input_ids=ids, attention_mask=_shared_mask(seg, parent), position_ids=pos).logits
    real_tokens = seg > 0
    torch.testing.assert_close(out[real_tokens], expected[real_tokens], rtol=1e-5, atol=1e-5)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)) * real_tokens[..., None]
    (out * w).sum().backward()
    (expected * w).sum().backward()
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        expected_grad = ref_params[name].grad
        torch.testing.assert_close(p.grad, expected_grad, rtol=1e-4, atol=1e-4 * float(expected_grad.abs().max()),
                                   msg=lambda m, n=name: f"{n}: {m}")  # fmt: skip


def test_a_prefix_must_be_an_earlier_example_of_its_row():
    seg = torch.tensor([[1, 1, 2, 2]])
    with pytest.raises(ValueError, match="continues segment 3"):
        sg.Segments(seg, torch.tensor([[0, 0, 3, 3]]))
