"""NF4 products a tile at a time: the table decode against the codebook, tiled forward and input gradient against a
dequantized reference, bf16 compute against fp32, and a QLoRA layer under bf16 autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nomoat.lora.nf4 as nf4
from nomoat.config import LoRAConfig
from nomoat.lora import LoRALinear, NF4Linear
from nomoat.lora.nf4 import NF4_CODEBOOK, dequantize_nf4, quantize_nf4


def _codebook_reference(packed: torch.Tensor, absmax: torch.Tensor, block: int) -> torch.Tensor:
    """Two nibbles per byte, high first, each codebook value times its block's absmax, in fp32."""
    book = torch.tensor(NF4_CODEBOOK)
    codes = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1).long()
    return (book[codes].view(-1, block) * absmax[:, None]).reshape(-1)


@pytest.mark.parametrize("shape,block", [((96, 128), 64), ((40, 48), 64), ((24, 36), 32), ((10, 6), 2)])
def test_dequantize_is_the_codebook_times_absmax(shape, block):
    torch.manual_seed(0)
    w = torch.randn(shape)
    q, a = quantize_nf4(w, block)
    ref = _codebook_reference(q, a, block).view(shape)
    assert torch.equal(dequantize_nf4(q, a, shape, block), ref)
    layer = NF4Linear.from_linear(nn.Linear(shape[1], shape[0], bias=False), block) if shape[0] * shape[1] % 64 == 0 \
        else None  # fmt: skip
    if layer is not None:
        exact = _codebook_reference(layer.qweight, layer.absmax, layer.block_size).view(shape)
        assert torch.equal(layer.dequantize(), exact)
        # bf16: the codebook value, the absmax and their product each rounded to bf16 (8 significant bits).
        got = layer.dequantize(torch.bfloat16).float()
        assert (got - exact).abs().le(exact.abs() * 3 * 2**-8).all()
        assert torch.equal(got == 0, exact == 0)


@pytest.mark.parametrize("compute", [None, torch.bfloat16])
def test_tiled_forward_and_input_gradient_match_the_dequantized_weight(compute, monkeypatch):
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(nn.Linear(256, 192, bias=True))
    layer.compute_dtype = compute
    cd = compute or torch.float32
    x, g = torch.randn(3, 7, 256), torch.randn(3, 7, 192)
    w = layer.dequantize(cd)  # (192, 256)
    want_y = F.linear(x.to(cd), w, layer.bias.to(cd)).float()
    want_dx = (g.to(cd) @ w).float()
    tol = {} if compute is None else {"rtol": 2e-2, "atol": 2e-2}
    for chunk in (1 << 22, 256 * 20, 192 * 64):  # one tile; 20-row tiles; 64-column tiles
        monkeypatch.setattr(nf4, "CHUNK_ELEMENTS", chunk)
        y, dx = layer(x), layer.grad_input(g)
        assert y.dtype == dx.dtype == torch.float32 and y.shape == (3, 7, 192) and dx.shape == (3, 7, 256)
        torch.testing.assert_close(y, want_y, **tol)
        torch.testing.assert_close(dx, want_dx, **tol)


def test_bf16_compute_lora_gradients_equal_the_fp32_reference():
    """A QLoRA layer computing its base in bf16 gives the adapter the gradients of an fp32 layer over the same
    (dequantized) weight, within bf16 rounding."""
    torch.manual_seed(0)
    cfg = LoRAConfig(r=8, alpha=16)
    base = NF4Linear.from_linear(nn.Linear(128, 192))
    base.compute_dtype = torch.bfloat16
    q = LoRALinear.from_quantized(base, cfg)
    with torch.no_grad():
        q.lora_B.weight.normal_(std=0.1)
    lin = nn.Linear(128, 192)
    with torch.no_grad():
        lin.weight.copy_(base.dequantize())
        lin.bias.copy_(q.bias)
    ref = LoRALinear.from_linear(lin, cfg)
    ref.load_state_dict(q.state_dict(), strict=False)
    x = torch.randn(4, 9, 128)
    g = torch.randn(4, 9, 192)
    grads = []
    for layer in (q, ref):
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.backward(g)
        grads.append({"y": y.detach(), "x": xi.grad, "A": layer.lora_A.weight.grad, "B": layer.lora_B.weight.grad})
    assert grads[0]["A"].dtype == grads[0]["B"].dtype == torch.float32
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=2e-2, atol=2e-2, msg=k)


def test_qlora_layer_under_autocast_keeps_no_fp32_copy_of_its_input():
    torch.manual_seed(0)
    base = NF4Linear.from_linear(nn.Linear(128, 64))
    base.compute_dtype = torch.bfloat16
    layer = LoRALinear.from_quantized(base, LoRAConfig(r=4, alpha=8))
    x = torch.randn(6, 128, dtype=torch.bfloat16, requires_grad=True)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert not [t for t in saved if t.dtype == torch.float32 and t.numel() == x.numel()]
    assert max(t.numel() for t in saved) < base.in_features * base.out_features  # no weight kept either
    y.float().sum().backward()
    assert layer.lora_A.weight.grad is not None and layer.lora_A.weight.grad.dtype == torch.float32
    assert x.grad is not None and x.grad.dtype == torch.bfloat16


def _bf16_layer(out_f: int, in_f: int, seed: int) -> NF4Linear:
    torch.manual_seed(seed)
    layer = NF4Linear.from_linear(nn.Linear(in_f, out_f, bias=False))
    layer.compute_dtype = torch.bfloat16
    return layer


def test_products_share_one_tile_buffer_and_keep_their_own_outputs(monkeypatch):
    """Forward and input-gradient tiles of layers of several sizes reuse one buffer, and every product still
    equals the one over that layer's own dequantized weight (no output aliases the buffer)."""
    layers = [_bf16_layer(192, 256, 0), _bf16_layer(64, 256, 1), _bf16_layer(256, 192, 2)]
    monkeypatch.setattr(nf4, "CHUNK_ELEMENTS", 256 * 96)  # tiles of 96 rows or 128 columns
    x, outs, grads = torch.randn(5, 256), [], []
    for layer in layers + layers:  # twice: the second round allocates no tile
        if layer is layers[0] and outs:
            ptr = nf4._SCRATCH.cpu.data_ptr() if nf4.ops.available() else None
        xi = x if layer.in_features == 256 else torch.randn(5, 192)
        outs.append((layer, xi, layer(xi)))
        g = torch.randn(5, layer.out_features)
        grads.append((layer, g, layer.grad_input(g)))
    if nf4.ops.available():
        assert nf4._SCRATCH.cpu.data_ptr() == ptr
    for layer, xi, y in outs:
        w = layer.dequantize(torch.bfloat16)  # (out, in)
        torch.testing.assert_close(y, F.linear(xi.bfloat16(), w).float(), rtol=2e-2, atol=2e-2)
    for layer, g, dx in grads:
        torch.testing.assert_close(dx, (g.bfloat16() @ layer.dequantize(torch.bfloat16)).float(), rtol=2e-2, atol=2e-2)


def test_plain_nf4_layers_under_autograd_keep_their_own_tiles():
    """Two same-shaped NF4 layers in a row with the input requiring grad (no LoRA): autograd keeps each product's
    weight, so the input gradient must be the one over both real weights, not over whichever tile came last."""
    a, b = _bf16_layer(128, 128, 0), _bf16_layer(128, 128, 1)
    x = torch.randn(4, 128, requires_grad=True)
    b(a(x)).float().sum().backward()
    wa, wb = a.dequantize(), b.dequantize()
    xr = x.detach().clone().requires_grad_(True)
    F.linear(F.linear(xr, wa), wb).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("compute", [None, torch.bfloat16])
def test_plain_nf4_layer_under_autograd_saves_no_weight(compute):
    """An NF4 layer without LoRA on an input that needs grad keeps nothing of its weight's size for the backward
    pass (the weight is decoded again there), and its input gradient and bias gradient are those of the dequantized
    layer."""
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(nn.Linear(128, 192))
    layer.compute_dtype = compute
    layer.bias.requires_grad_(True)  # a bias that trains still gets its gradient
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    x = torch.randn(6, 128, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert y.dtype == torch.float32
    assert not [t for t in saved if t.numel() >= layer.in_features * layer.out_features]
    g = torch.randn(6, 192)
    y.backward(g)
    cd = compute or torch.float32
    w = layer.dequantize(cd)
    xr = x.detach().clone().requires_grad_(True)
    br = layer.bias.detach().clone().requires_grad_(True)
    F.linear(xr.to(cd), w, br.to(cd)).float().backward(g)
    tol = {} if compute is None else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(x.grad, xr.grad, **tol)
    torch.testing.assert_close(layer.bias.grad, br.grad, **tol)


@pytest.mark.skipif(not nf4.ops.available(), reason="the compiled kernels are not available here")
def test_compiled_decode_into_a_buffer_equals_the_reference_decode():
    from nomoat.kernels import reference

    torch.manual_seed(0)
    q, a = quantize_nf4(torch.randn(48, 512), 64)
    q, a = q.view(48, 256), a.view(48, 8)
    tq, ta = q[5:37, 64:192], a[5:37, 2:6]  # a tile of rows 5..36, columns 128..383 of the weight
    out = torch.full((32, 256), float("nan"), dtype=torch.bfloat16)
    torch.ops.nomoat.nf4_decode_bf16_out(tq, ta, 64, out)
    assert torch.equal(out.view(torch.int16), reference.nf4_decode_bf16(q, a, 64)[5:37, 128:384].view(torch.int16))
    with pytest.raises(RuntimeError, match="contiguous bf16"):
        torch.ops.nomoat.nf4_decode_bf16_out(tq, ta, 64, torch.empty(32, 255, dtype=torch.bfloat16))
