"""The 4-bit kernel (`torch.ops.nomoat.linear_q4`, GGUF Q4_0 / Q4_1 blocks of 32 input channels) against its
reference, the panel layout against plain block arithmetic, and the quantizers against the `gguf` package's own."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nomoat import kernels
from nomoat.kernels import reference
from nomoat.models.quantize import QuantizedLinear, quantize_q4_0, quantize_q4_1

QT = gguf.GGMLQuantizationType
# (out, in): outputs not multiples of 64, inputs multiples of 32 but not of 256
SHAPES = [(1, 32), (13, 96), (64, 64), (100, 160), (130, 288), (257, 544)]


@pytest.fixture(scope="module")
def built() -> None:
    assert kernels.available(), "nomoat's kernels did not build: see the log for the compiler error"


def _blocks(n: int, k: int, asym: bool, g: torch.Generator):
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    d = (torch.rand(n, k // 32, generator=g) * 0.2 - 0.1).half()
    m = (torch.randn(n, k // 32, generator=g) * 0.1).half() if asym else None
    return codes, d, m


def _plain(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """w = d (code - 8) or d code + m, block by block, in float64 (independent of the panels)."""
    scale = d.double().repeat_interleave(32, dim=1)
    if m is None:
        return scale * (codes.double() - 8)
    return scale * codes.double() + m.double().repeat_interleave(32, dim=1)


@pytest.mark.parametrize("asym", [False, True], ids=["q4_0", "q4_1"])
def test_panels_round_trip_and_dequantize(asym):
    g = torch.Generator().manual_seed(0)
    for n, k in SHAPES:
        codes, d, m = _blocks(n, k, asym, g)
        panels = kernels.pack_q4(codes, d, m)
        assert panels.dtype == torch.uint8 and panels.shape == (-(-n // 64), k // 32, 1280 if asym else 1152)
        c2, d2, m2 = kernels.unpack_q4(panels, n)
        assert torch.equal(c2, codes) and torch.equal(d2, d) and (m2 is None) == (m is None)
        assert m is None or torch.equal(m2, m)
        torch.testing.assert_close(kernels.dequantize_q4(panels, n).double(), _plain(codes, d, m), rtol=1e-6, atol=0)


@pytest.mark.parametrize("asym", [False, True], ids=["q4_0", "q4_1"])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_q4_matches_reference_at_any_row_count(built, asym, bias):
    g = torch.Generator().manual_seed(1)
    for n, k in SHAPES:
        codes, d, m = _blocks(n, k, asym, g)
        panels = kernels.pack_q4(codes, d, m)
        b = torch.randn(n, generator=g) if bias else None
        w = _plain(codes, d, m).float()
        for rows in (1, 2, 3, 5, 8, 9, 17, 31, 40):
            x = torch.randn(rows, k, generator=g)
            got, want = kernels.linear_q4(x, panels, n, b), reference.linear_q4(x, panels, n, b)
            assert got.shape == (rows, n) and got.dtype == torch.float32
            scale = want.abs().max().item()
            assert (got - want).abs().max().item() <= 1e-5 * scale + 1e-6, (n, k, rows)
            # the reference's own arithmetic: activations rounded to int8 per block, then the dequantized product
            xr = reference.quantize_activations(x)
            torch.testing.assert_close(want, F.linear(xr, w, b), rtol=1e-5, atol=1e-5 * scale)
            assert (xr - x).abs().max() <= x.abs().max() / 254 + 1e-7  # at most half an int8 step per block


def test_linear_q4_strided_and_zero_inputs(built):
    g = torch.Generator().manual_seed(2)
    codes, d, _ = _blocks(70, 96, False, g)
    panels = kernels.pack_q4(codes, d)
    x = torch.randn(5, 200, generator=g)[:, 7:103]  # rows with a stride
    torch.testing.assert_close(kernels.linear_q4(x, panels, 70), reference.linear_q4(x.contiguous(), panels, 70))
    zero = torch.zeros(3, 96)  # all-zero blocks: scale 0, no division by zero
    assert torch.equal(kernels.linear_q4(zero, panels, 70), torch.zeros(3, 70))


def test_fake_implementation_passes_opcheck(built):
    g = torch.Generator().manual_seed(3)
    codes, d, m = _blocks(70, 64, True, g)
    args = (torch.randn(3, 64, generator=g), kernels.pack_q4(codes, d, m), torch.randn(70, generator=g), 70)
    torch.library.opcheck(torch.ops.nomoat.linear_q4.default, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1], ids=lambda q: q.name)
def test_quantizers_give_ggufs_own_blocks(qtype):
    """Codes and scales bit for bit as `gguf.quants.quantize` (llama.cpp's reference rounding) gives them."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(37, 160, generator=g) * 0.05
    w[3, :32] = 0  # an all-zero block
    blocks = gguf.quants.quantize(w.numpy(), qtype).reshape(-1, 18 if qtype == QT.Q4_0 else 20)
    head = 2 if qtype == QT.Q4_0 else 4
    qs = torch.from_numpy(blocks[:, head:].copy())
    codes = torch.cat((qs & 15, qs >> 4), dim=1).reshape(37, 160)
    d = torch.from_numpy(blocks[:, :2].copy()).view(torch.float16).reshape(37, 5)
    got = quantize_q4_0(w) if qtype == QT.Q4_0 else quantize_q4_1(w)
    assert torch.equal(got[0], codes) and torch.equal(got[1], d)
    if qtype == QT.Q4_1:
        assert torch.equal(got[2], torch.from_numpy(blocks[:, 2:4].copy()).view(torch.float16).reshape(37, 5))
    layer = QuantizedLinear.from_q4(*got)
    want = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype), qtype)
    assert torch.equal(layer.dequantize(), torch.from_numpy(np.ascontiguousarray(want)))
