"""The compiled NF4 tile decode (`torch.ops.nomoat.nf4_decode_bf16`) against its plain-torch reference and against
the codebook times the block absmax."""

from __future__ import annotations

import pytest
import torch

from nomoat.kernels import ops, reference
from nomoat.lora.nf4 import NF4_CODEBOOK, quantize_nf4


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    assert ops.available(), "nomoat's kernels did not build: see the log for the compiler error"


def _codes(rows: int, cols: int, block: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * torch.logspace(-3, 1, rows)[:, None]  # scales over 4 decades
    q, a = quantize_nf4(w, block)
    return q.view(rows, cols // 2), a.view(rows, cols // block)


@pytest.mark.parametrize("rows,cols,block", [(64, 256, 64), (7, 96, 32), (33, 2048, 64), (5, 12, 2), (3, 40, 8)])
def test_decode_equals_the_reference_bit_for_bit(rows, cols, block):
    q, a = _codes(rows, cols, block)
    got = torch.ops.nomoat.nf4_decode_bf16(q, a, block)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, cols)
    assert torch.equal(got.view(torch.int16), reference.nf4_decode_bf16(q, a, block).view(torch.int16))


def test_reference_is_the_codebook_times_absmax_within_bf16_rounding():
    q, a = _codes(16, 128, 64, seed=3)
    book = torch.tensor(NF4_CODEBOOK)
    codes = torch.stack([q.long() >> 4, q.long() & 15], dim=-1).reshape(16, 128)
    exact = (book[codes].view(16, 2, 64) * a[:, :, None]).reshape(16, 128)
    got = reference.nf4_decode_bf16(q, a, 64).float()
    assert (got - exact).abs().le(exact.abs() * 3 * 2**-8).all()
    assert torch.equal(got == 0, exact == 0)


def test_decode_of_a_tile_inside_a_larger_weight():
    q, a = _codes(48, 512, 64, seed=1)
    tq, ta = q[8:40, 64:192], a[8:40, 2:6]  # rows 8..39, columns 128..383: strided views
    got = ops.nf4_decode_bf16(tq, ta, 64)
    assert torch.equal(got, reference.nf4_decode_bf16(q, a, 64)[8:40, 128:384])


def test_fake_gives_the_shape_for_compile():
    q, a = _codes(8, 128, 64)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        out = torch.ops.nomoat.nf4_decode_bf16(mode.from_tensor(q), mode.from_tensor(a), 64)
    assert out.shape == (8, 128) and out.dtype == torch.bfloat16


def test_nf4_layer_products_equal_with_and_without_the_compiled_decode(monkeypatch):
    from torch import nn

    import nomoat.lora.nf4 as nf4

    torch.manual_seed(0)
    layer = nf4.NF4Linear.from_linear(nn.Linear(256, 192, bias=True))
    layer.compute_dtype = torch.bfloat16
    x, g = torch.randn(2, 9, 256), torch.randn(2, 9, 192)
    compiled = layer.dequantize(torch.bfloat16), layer(x), layer.grad_input(g)
    monkeypatch.setattr(nf4.ops, "available", lambda: False)  # the plain-torch tile decode
    plain = layer.dequantize(torch.bfloat16), layer(x), layer.grad_input(g)
    for a, b in zip(compiled, plain):
        assert torch.equal(a, b)


def test_decode_into_a_buffer_passes_opcheck_and_equals_the_reference():
    q, a = _codes(7, 96, 32, seed=4)
    out = torch.empty(7, 96, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.nomoat.nf4_decode_bf16_out.default, (q, a, 32, out),
                          test_utils=("test_schema", "test_faketensor"))  # fmt: skip
    assert ops.nf4_decode_bf16_out(q, a, 32, out) is out
    assert torch.equal(out.view(torch.int16), reference.nf4_decode_bf16(q, a, 32).view(torch.int16))
