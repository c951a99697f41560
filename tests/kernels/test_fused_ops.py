"""The compiled training kernels (`torch.ops.nomoat`, as `models/fused_ops.py` gives them to training) against torch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nomoat.models import fused_ops


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    assert fused_ops.get() is not None, "nomoat's training kernels did not build: see the log for the compiler error"


@pytest.mark.parametrize("shape", [(2, 37, 129), (1024, 64), (5,)])
def test_swiglu_forward_matches_torch(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(0)
    gate = torch.randn(shape, generator=gen) * 4
    up = torch.randn(shape, generator=gen)
    torch.testing.assert_close(fused_ops.swiglu_forward(gate, up), F.silu(gate) * up, rtol=1e-6, atol=1e-6)


def test_silu_tails_saturate_like_torch() -> None:
    x = torch.linspace(-120, 120, 4097)
    ours = fused_ops.swiglu_forward(x, torch.ones_like(x))
    torch.testing.assert_close(ours, F.silu(x), rtol=1e-6, atol=1e-30)
    assert torch.isnan(fused_ops.swiglu_forward(torch.tensor([float("nan")] * 17), torch.ones(17))).all()


@pytest.mark.parametrize("shape", [(3, 50, 97), (256, 1536)])
def test_swiglu_backward_matches_autograd(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(1)
    gate = torch.randn(shape, generator=gen) * 3
    up = torch.randn(shape, generator=gen)
    grad = torch.randn(shape, generator=gen)
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    p_ref = F.silu(g) * u
    p_ref.backward(grad)
    p = torch.empty_like(gate)
    grad_in = grad.clone()
    grad_gate, grad_up = fused_ops.swiglu_backward(gate, up, grad_in, p)
    assert grad_gate.data_ptr() == grad_in.data_ptr()  # in place, as documented
    torch.testing.assert_close(grad_gate, g.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_up, u.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p, p_ref.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("vocab", [49152, 1001])
def test_softmax_xent_matches_cross_entropy(vocab: int) -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(33, vocab, generator=gen) * 6
    logits[0, :] = 0.0  # a flat row
    logits[1, 7] = 80.0  # a confident row
    targets = torch.randint(0, vocab, (33,), generator=gen)
    targets[1] = 7
    ref = logits.clone().requires_grad_()
    F.cross_entropy(ref, targets, reduction="sum").backward()
    loss = fused_ops.softmax_xent_(logits, targets)
    torch.testing.assert_close(loss, F.cross_entropy(ref.detach(), targets, reduction="none"), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(logits, ref.grad, rtol=1e-5, atol=1e-7)  # logits became softmax - onehot


def test_softmax_xent_rejects_bad_targets() -> None:
    with pytest.raises(RuntimeError, match="target outside the vocabulary"):
        fused_ops.softmax_xent_(torch.zeros(2, 10), torch.tensor([3, 10]))


def test_applicable_only_for_fp32_contiguous_cpu() -> None:
    x = torch.zeros(4, 8)
    assert fused_ops.applicable(x, x)
    assert not fused_ops.applicable(x.double())
    assert not fused_ops.applicable(x.t())
    assert not fused_ops.applicable(x.bfloat16())


def test_linear_cross_entropy_uses_the_kernel_and_matches_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    from nomoat.train import loss as loss_mod

    calls = []
    real = fused_ops.softmax_xent_
    monkeypatch.setattr(fused_ops, "softmax_xent_", lambda *a: calls.append(1) or real(*a))
    gen = torch.Generator().manual_seed(3)
    model = torch.nn.Module()
    model.lm_head = torch.nn.Linear(32, 500, bias=False)  # trainable: its gradient is checked too
    ref_head = torch.nn.Linear(32, 500, bias=False)
    ref_head.load_state_dict(model.lm_head.state_dict())
    hidden = torch.randn(2, 40, 32, generator=gen, requires_grad=True)
    labels = torch.randint(0, 500, (2, 40), generator=gen)
    labels[:, :7] = -100
    total, n = loss_mod.causal_lm_loss_sum(model, hidden, labels, chunk=16)
    total.backward()
    assert len(calls) == 5, "the fused cross-entropy did not run the compiled kernel once per chunk"
    ref_hidden = hidden.detach().clone().requires_grad_()
    logits = ref_head(ref_hidden[:, :-1]).reshape(-1, 500)
    ref = F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
    ref.backward()
    assert n == int((labels[:, 1:] != -100).sum()) == 66
    torch.testing.assert_close(total, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(model.lm_head.weight.grad, ref_head.weight.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rd", [64, 32])
def test_rope_forward_and_backward_match_torch(rd: int) -> None:
    from nomoat.models import transformer as tr

    gen = torch.Generator().manual_seed(4)
    base = torch.randn(2, 12, 9, 64, generator=gen)  # (B, T, H, hd): q as the projections lay it out
    cos, sin = torch.randn(2, 12, rd, generator=gen), torch.randn(2, 12, rd, generator=gen)
    x = base.clone().requires_grad_()
    ours = tr.apply_rope(x.transpose(1, 2), cos, sin)
    assert ours.grad_fn is not None and type(ours.grad_fn).__name__ == "_RopeFnBackward"
    ref_x = base.clone().requires_grad_()
    xv, c, s = ref_x.transpose(1, 2), cos.unsqueeze(1), sin.unsqueeze(1)
    rot = xv[..., :rd] * c + tr._rotate_half(xv[..., :rd]) * s
    ref = torch.cat((rot, xv[..., rd:]), dim=-1)
    grad = torch.randn(ref.shape, generator=gen)
    ours.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-5, atol=1e-6)
