"""Packed rows, the chunked loss and the schedule, checked against unpacked runs and plain torch references."""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn.functional as F

from nomoat.models.checkpoint import load_model
from nomoat.train.loss import causal_lm_loss_sum
from nomoat.train.optim import lr_factor

from hf_models import ALL, VOCAB, make_hf_model


@pytest.fixture(scope="module", params=ALL)
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    make_hf_model(request.param, path)
    return load_model(path, dtype=torch.float32, device="cpu")


def _packed(lengths: list[int], T: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pieces = [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]
    ids = torch.zeros(1, T, dtype=torch.long)
    pos = torch.zeros(1, T, dtype=torch.long)
    seg = torch.zeros(1, T, dtype=torch.long)
    at = 0
    for i, p in enumerate(pieces):
        ids[0, at : at + len(p)] = p
        pos[0, at : at + len(p)] = torch.arange(len(p))
        seg[0, at : at + len(p)] = i + 1
        at += len(p)
    return pieces, ids, pos, seg


def test_packed_row_equals_examples_alone(model):
    """Block-diagonal attention and restarting positions: each example's logits are those it has alone."""
    lengths = [9, 14, 6]  # 14 > the sliding windows (8) of the tiny mistral/gemma/phi3 models
    pieces, ids, pos, seg = _packed(lengths, 32)
    with torch.no_grad():
        packed = model(ids, position_ids=pos, segment_ids=seg)
        at = 0
        for p in pieces:
            alone = model(p[None])
            torch.testing.assert_close(packed[0, at : at + len(p)], alone[0], atol=2e-5, rtol=1e-5)
            at += len(p)


def test_chunked_loss_equals_plain_cross_entropy(model):
    """The summed loss and its gradients match a full-logits `F.cross_entropy`, for any chunk size."""
    torch.manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 20))
    labels = ids.clone()
    labels[0, :7] = -100
    labels[1, 15:] = -100
    hidden = model(ids, return_hidden=True).detach().requires_grad_(True)
    logits = model.logits(hidden)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                          reduction="sum", ignore_index=-100)  # fmt: skip
    head = model.lm_head.weight
    g_ref, gw_ref = torch.autograd.grad(ref, (hidden, head))
    for chunk in (1, 5, 1024):
        h = hidden.detach().requires_grad_(True)
        head.grad = None
        total, n = causal_lm_loss_sum(model, h, labels, chunk=chunk)
        assert n == int((labels[:, 1:] != -100).sum())
        torch.testing.assert_close(total, ref, atol=1e-4, rtol=1e-5)
        total.backward()
        torch.testing.assert_close(h.grad, g_ref, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(head.grad, gw_ref, atol=1e-6, rtol=1e-4)  # a trained (modules_to_save) head


def test_gradient_checkpointing_same_gradients(model):
    ids = torch.randint(3, VOCAB, (2, 12))
    grads = []
    for flag in (False, True):
        model.zero_grad(set_to_none=True)
        model.train()
        model.gradient_checkpointing = flag
        total, _ = causal_lm_loss_sum(model, model(ids, return_hidden=True), ids)
        total.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.gradient_checkpointing = False
    model.eval()
    model.zero_grad(set_to_none=True)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


def test_lr_schedule_shapes():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(1 / 11)
    assert lr_factor(9, 100, 10, "cosine") == pytest.approx(10 / 11)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(55, 100, 10, "linear") == pytest.approx(0.5)
    assert lr_factor(80, 100, 0, "constant") == 1.0
    assert all(0 < lr_factor(s, 50, 5, "cosine") <= 1 for s in range(50))
    assert math.isclose(lr_factor(30, 50, 10, "linear"), 0.5)


@pytest.mark.parametrize("head_dtype", [torch.float32, torch.bfloat16])
def test_chunks_are_capped_by_the_logits_they_hold(model, head_dtype, monkeypatch):
    """With `LOGITS_ELEMENTS` below a chunk's logits, the chunk shrinks and the loss and gradients are unchanged
    (fp32 head; bf16 head under bf16 autocast, against the same products done in full)."""
    import nomoat.train.loss as loss_mod

    torch.manual_seed(0)
    ids = torch.randint(3, VOCAB, (1, 24))
    hidden = model(ids, return_hidden=True).detach().to(head_dtype)
    head = torch.nn.Linear(hidden.shape[-1], VOCAB, bias=False, dtype=head_dtype)
    head.weight.data.normal_(std=0.02)
    wrapper = torch.nn.Module()
    wrapper.lm_head, wrapper.config = head, types.SimpleNamespace(vocab_size=VOCAB)  # no soft-capping
    h_ref = hidden.detach().requires_grad_(True)
    logits = (h_ref[0, :-1] @ head.weight.t()).float()
    ref = F.cross_entropy(logits, ids[0, 1:], reduction="sum")
    g_ref, gw_ref = torch.autograd.grad(ref, (h_ref, head.weight))
    seen = []
    real = loss_mod._logits_buffer
    monkeypatch.setattr(loss_mod, "_logits_buffer", lambda *a: seen.append(a[0]) or real(*a))
    monkeypatch.setattr(loss_mod, "LOGITS_ELEMENTS", VOCAB * 5)  # at most 5 rows a chunk
    h = hidden.detach().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=head_dtype == torch.bfloat16):
        total, n = causal_lm_loss_sum(wrapper, h, ids, chunk=1024)
    total.backward()
    assert n == 23 and seen and max(seen) == 5
    tol = {"atol": 1e-4, "rtol": 1e-5} if head_dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(total, ref, **tol)
    torch.testing.assert_close(h.grad.float(), g_ref.float(), **tol)
    torch.testing.assert_close(head.weight.grad.float(), gw_ref.float(), **tol)
