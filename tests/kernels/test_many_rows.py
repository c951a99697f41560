"""The panel kernels and the decode attention op at many rows (the row blocks of a 32-row decode step, remainders
and one row) against their plain PyTorch references, in the build this CPU loads and, in a child process, in the
AVX2 build forced by `NOMOAT_KERNELS_ISA` where the CPU has AVX-512."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nomoat import kernels
from nomoat.kernels import build, reference

# 1-8: every register block (one and two rows keep the memory-bound form, 3 and up hold weights in registers; 5
# and 6 one sweep, 7 and 8 two); 17, 32, 33: several row blocks of 8 and remainders.
ROWS = (1, 2, 3, 4, 5, 6, 7, 8, 17, 32, 33)
SHAPES = [(576, 1536), (100, 577), (7, 13), (1536, 64)]  # (K, N): model-like, odd widths, long K


@pytest.fixture(scope="module")
def built() -> None:
    assert kernels.available(), "nomoat's kernels did not build: see the log for the compiler error"


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()


def test_loaded_build_is_the_forced_one(built):
    """In the child process of the last test: the kernels are the forced variant's (not the CPU's best)."""
    forced = os.environ.get("NOMOAT_KERNELS_ISA")
    if forced is None:
        pytest.skip("no variant forced (NOMOAT_KERNELS_ISA unset)")
    assert kernels.isa() == forced


@pytest.mark.parametrize("k, n", SHAPES)
def test_fp32_panels_at_many_rows(built, k, n):
    g = torch.Generator().manual_seed(k + n)
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    panels = kernels.pack_fp32(w)
    for m in ROWS:
        x = torch.randn(m, k, generator=g)
        for bias in (None, b):
            y = kernels.linear_fp32(x, panels, n, bias)
            assert y.shape == (m, n)
            assert _rel_err(y, reference.linear_fp32(x, panels, n, bias)) < 1e-5, (m, bias is None)


def test_fp32_panels_at_many_rows_strided_input(built):
    """Rows of a wider matrix (row stride above K), as the decode stack and the fused projections pass them."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(130, 96, generator=g)
    panels = kernels.pack_fp32(w)
    for m in (3, 8, 33):
        x = torch.randn(m, 200, generator=g)[:, 50:146]
        assert _rel_err(kernels.linear_fp32(x, panels, 130), reference.linear_fp32(x, panels, 130)) < 1e-5


@pytest.mark.parametrize("k, n", SHAPES)
def test_int8_panels_at_many_rows(built, int8_mode, k, n):
    g = torch.Generator().manual_seed(3 * k + n)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    d = (torch.rand(n, -(-k // 32), generator=g) / 64 + 1e-3).half()  # a scale per block of 32 input channels
    panels, scale = kernels.pack_int8(q, d)
    b = torch.randn(n, generator=g)
    for m in ROWS:
        x = torch.randn(m, k, generator=g)
        for bias in (None, b):
            y = kernels.linear_int8(x, panels, scale, n, bias)
            if int8_mode and k % 32 == 0:
                want = reference.linear_int8_dot(x, panels, scale, n, bias, mode=int8_mode)
            else:
                want = reference.linear_int8(x, panels, scale, n, bias)
            assert _rel_err(y, want) < 1e-5, (m, bias is None)


# GQA groups of 3 (SmolLM2), 7 (Qwen2.5: a register group of 4 and one of 3), 4, 2, 1; head sizes of one to eight
# vectors (16, 32, 64, 128) and one that is no multiple of the vector width (40).
@pytest.mark.parametrize("heads, kv_heads, hd", [(9, 3, 64), (14, 2, 64), (8, 2, 128), (8, 2, 16), (4, 1, 32),
                                                 (6, 3, 64), (5, 5, 64), (6, 2, 40)])  # fmt: skip
def test_decode_attention_groups_at_many_rows(built, heads, kv_heads, hd):
    g = torch.Generator().manual_seed(heads * 31 + hd)
    S, rd, window = 80, hd, 0
    for B in (1, 3, 8, 17, 32, 33):
        k_cache = torch.randn(B + 1, kv_heads, S, hd, generator=g)
        v_cache = torch.randn(B + 1, kv_heads, S, hd, generator=g)
        ref_k, ref_v = k_cache.clone(), v_cache.clone()
        positions = torch.randint(0, 70, (B, 1), generator=g)
        positions[0, 0] = 69  # the longest row: more than 64 scores (several vectors and a tail)
        qkv = torch.randn(B, 1, (heads + 2 * kv_heads) * hd, generator=g)
        q = qkv[..., : heads * hd].view(B, 1, heads, hd)
        k = qkv[..., heads * hd : (heads + kv_heads) * hd].view(B, 1, kv_heads, hd)
        v = qkv[..., (heads + kv_heads) * hd :].view(B, 1, kv_heads, hd)
        angles = positions[..., None].float() * torch.rand(rd // 2, generator=g)
        cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()  # (B, 1, rd)
        args = (cos, sin)
        out = kernels.decode_attention(q, k, v, *args, k_cache, v_cache, 1, positions, 70, window, 0.2)
        ref = reference.decode_attention(q, k, v, *args, ref_k, ref_v, 1, positions, 70, window, 0.2)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(k_cache, ref_k, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(v_cache, ref_v)


def test_lower_variant_at_many_rows(built):
    """The tests above again in a child process whose kernels are the AVX2 build (on an AVX-512 CPU)."""
    if build.current_variant().isa != "avx512":
        pytest.skip("the CPU (or torch) has no AVX-512: its own build is the only one tested")
    env = dict(os.environ, NOMOAT_KERNELS_ISA="avx2")
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__)), "-q", "-x", "-p", "no:cacheprovider",
           "-k", "not lower_variant"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3000,
                            cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
