"""nomoat's compiled decode kernels (`torch.ops.nomoat`) against `F.linear`, their references, and the torch
fallback when they cannot be built."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nomoat import kernels
from nomoat.kernels import build, ops
from nomoat.kernels.reference import Q16_MAX, quantize_activations
from nomoat.models import quantize
from nomoat.models.packed import PackedLinear, pack_model
from nomoat.models.quantize import QuantizedLinear, int8_codes, int8_panels, quantize_int8

from q8_oracle import dequantized, q8_0

# Odd widths (not multiples of 8, 16 or the 64-channel panel) next to model-like ones.
SHAPES = [(1, 1), (7, 13), (19, 37), (64, 64), (65, 130), (100, 577), (576, 192)]


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()


@pytest.fixture(scope="module")
def built() -> None:
    """The kernels must build here (the test machines have a compiler); a failure would silently hide them."""
    assert kernels.available(), "nomoat's decode kernels did not build: see the log for the compiler error"


@pytest.mark.parametrize("k, n", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_fp32_matches_linear(built, k, n, bias):
    g = torch.Generator().manual_seed(k * 1000 + n)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    panels = kernels.pack_fp32(w)
    for m in range(1, 10):  # 9: two blocks of rows
        x = torch.randn(m, k, generator=g)
        y = kernels.linear_fp32(x, panels, n, b)
        assert y.shape == (m, n)
        assert _rel_err(y, F.linear(x, w, b)) < 1e-5


def test_fp32_non_contiguous_input(built):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(45, 70, generator=g)
    panels = kernels.pack_fp32(w)
    big = torch.randn(6, 140, generator=g)
    for x in (big[:, ::2], big[:, :70], big[::2, 10:80], torch.randn(70, 5, generator=g).t()):
        assert not x.is_contiguous()
        assert _rel_err(kernels.linear_fp32(x, panels, 45), F.linear(x, w)) < 1e-5


def _int8_input(x: torch.Tensor, mode: int) -> torch.Tensor:
    """The activations the int8 kernel multiplies: rounded per block of 32 in the dot modes (K a multiple of 32): to
    int8 in mode 1, to 16-bit codes in mode 2."""
    return quantize_activations(x, codes16=mode == 2) if mode and x.shape[1] % 32 == 0 else x


def test_int8_dot_mode_and_its_default(built):
    """The integer dot-product modes exist exactly where the build has AVX-512-VNNI, and mode 2 (16-bit activation
    codes) is the default there (`NOMOAT_I8_DOT=0` or `=1` starts in that mode)."""
    has = "vnni" in build.current_variant().name
    was = kernels.int8_dot()
    env = os.environ.get("NOMOAT_I8_DOT")
    assert was == (int(env) if has and env in ("0", "1") else 2 * int(has))
    assert kernels.int8_dot(1) == int(has) and kernels.int8_dot(2) == 2 * int(has) and kernels.int8_dot(0) == 0
    assert kernels.int8_dot(7) == 2 * int(has)  # clamped to the last mode
    kernels.int8_dot(was)


@pytest.mark.parametrize("k, n", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_int8_matches_dequantized(built, int8_mode, k, n, bias):
    g = torch.Generator().manual_seed(k * 7 + n)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    q, d = quantize_int8(w)
    oq, od = q8_0(w)  # the gguf package's Q8_0 blocks: nomoat's codes and scales are llama.cpp's, bit for bit
    assert torch.equal(q, oq) and torch.equal(d.view(torch.int16), od.view(torch.int16))
    ref_w = dequantized(oq, od)  # independent: plain torch ops
    panels, scale = int8_panels(q, d)
    assert torch.equal(int8_codes(panels, n), q)  # the panels give the plain codes back exactly
    assert torch.equal(kernels.unpack_int8(panels, scale, n)[1].view(torch.int16), d.view(torch.int16))
    for m in range(1, 10):
        x = torch.randn(m, k, generator=g)
        y = kernels.linear_int8(x, panels, scale, n, b)
        assert _rel_err(y, F.linear(_int8_input(x, int8_mode), ref_w, b)) < 1e-5
        exact = kernels.linear_int8(x, panels, scale, n, b, exact=True)  # fp32 activations in either mode
        assert _rel_err(exact, F.linear(x, ref_w, b)) < 1e-5
    x = torch.randn(3, 2 * k, generator=g)[:, ::2]  # non-contiguous
    assert _rel_err(kernels.linear_int8(x, panels, scale, n), F.linear(_int8_input(x, int8_mode), ref_w)) < 1e-5


@pytest.mark.parametrize("k, n, m", [(64, 64, 1), (576, 192, 3), (1536, 130, 9), (96, 77, 2)])
def test_int8_dot_error_is_within_half_an_activation_step(built, int8_mode, k, n, m):
    """Against the exact product, a dot mode is off by at most what rounding each activation to its block's step
    (absmax / 127 in mode 1, absmax / 32639 in mode 2, so at most half a step off) can move each output: sum over
    blocks of half the step times the block's sum of |w|. The exact mode stays within fp32 rounding."""
    g = torch.Generator().manual_seed(k + n + m)
    q, d = quantize_int8(torch.randn(n, k, generator=g) * torch.rand(n, k, generator=g) * 4)
    ref_w = dequantized(q, d)
    x = torch.randn(m, k, generator=g) * torch.rand(m, k, generator=g) * 4  # blocks of different ranges
    y = kernels.linear_int8(x, *int8_panels(q, d), n)
    exact = F.linear(x.double(), ref_w.double())
    half_step = x.reshape(m, k // 32, 32).abs().amax(2).double() / (127 if int8_mode == 1 else Q16_MAX) / 2
    w_abs = ref_w.abs().double().reshape(n, k // 32, 32).sum(2)  # (n, blocks)
    bound = half_step @ w_abs.T if int8_mode else torch.zeros(m, n, dtype=torch.float64)  # (m, n)
    slack = 1e-5 * exact.abs().max()
    assert ((y.double() - exact).abs() <= bound + slack).all()
    if int8_mode == 1:  # the rounding shows: the bound is not vacuous (and int8 codes exceed mode 2's, 1/257 of it)
        assert (y.double() - exact).abs().max() > slack


@pytest.mark.parametrize("k, n", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_matches_fp32_product_of_bf16_weights(built, k, n, bias):
    """bf16 panels (input channels in pairs, odd K padded): the op sums in fp32 what `F.linear` over the bf16
    weights widened to fp32 gives, for any row count and for non-contiguous rows."""
    g = torch.Generator().manual_seed(k * 5 + n)
    w = torch.randn(n, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g) if bias else None
    panels = kernels.pack_bf16(w)
    assert panels.dtype == torch.bfloat16 and panels.shape == (-(-n // 64), (k + 1) // 2, 128)
    assert torch.equal(kernels.unpack_bf16(panels, n, k), w)
    ref_w = w.float()  # independent: plain torch widening
    dot_rows = ops.bf16_dot_rows()
    for m in (1, 2, 3, 4, 5, 8, 9, 16, 17, 40):
        x = torch.randn(m, k, generator=g)
        xr = x.bfloat16().float() if dot_rows is not None and m > dot_rows else x  # prefill: bf16 activations
        assert _rel_err(kernels.linear_bf16(x, panels, n, b), F.linear(xr, ref_w, b)) < 1e-5
    x = torch.randn(3, 2 * k, generator=g)[:, ::2]  # non-contiguous
    assert _rel_err(kernels.linear_bf16(x, panels, n), F.linear(x, ref_w)) < 1e-5


def test_layers_use_kernels_and_match(built):
    g = torch.Generator().manual_seed(3)
    lin = nn.Linear(83, 141, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(141, 83, generator=g))
    p = PackedLinear(lin)
    assert p.panels is not None and p.packed_weight is None  # the weight is stored once
    torch.testing.assert_close(p.weight(), lin.weight.detach())  # and rebuilt from the panels on demand
    q = QuantizedLinear.from_linear(lin, "int8")
    ref_q = F.linear  # against the dequantized weight
    with torch.inference_mode():
        for shape in ((1, 1, 83), (2, 3, 83), (1, 20, 83)):  # decode rows (kernels) and prefill rows (torch paths)
            x = torch.randn(*shape, generator=g)
            torch.testing.assert_close(p(x), lin(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(q(x), ref_q(x, q.dequantize(), lin.bias), rtol=1e-5, atol=1e-5)


def test_head_weight_is_stored_once(built):
    """An output head (lazy) and any layer keep one layout: decode rows and a prefill's many rows both run on the
    panels, and no second (oneDNN) copy is made."""
    lin = nn.Linear(40, 300, bias=False)
    p = PackedLinear(lin, lazy_onednn=True)
    assert p.packed_weight is None
    x = torch.randn(12, 40)
    with torch.inference_mode():
        torch.testing.assert_close(p(x[:1]), lin(x[:1]), rtol=1e-5, atol=1e-5)
        assert p.packed_weight is None  # one row: the kernels only
        torch.testing.assert_close(p(x), lin(x), rtol=1e-5, atol=1e-5)
        assert p.packed_weight is None  # twelve rows: still the panels


def test_int8_panels_follow_load_state_dict(built):
    a, b = nn.Linear(30, 50), nn.Linear(30, 50)
    qa, qb = QuantizedLinear.from_linear(a, "int8"), QuantizedLinear.from_linear(b, "int8")
    x = torch.randn(1, 30)
    with torch.inference_mode():
        qa(x)  # builds and caches qa's panels
        qa.load_state_dict(qb.state_dict())  # in-place copy: the cached panels are stale
        torch.testing.assert_close(qa(x), F.linear(x, qb.dequantize(), qb.bias), rtol=1e-5, atol=1e-5)


def test_fallback_when_build_fails(monkeypatch, caplog):
    """A failed build (no compiler, a compiler error) leaves the torch paths, with the same results; the ops run
    their references (with a one-line notice)."""
    import torch.utils.cpp_extension as cpp

    def broken(*args, **kwargs):
        raise RuntimeError("simulated compiler failure")

    monkeypatch.setattr(cpp, "load", broken)
    monkeypatch.setattr(build, "_state", {})
    with caplog.at_level("WARNING", logger="nomoat.kernels.build"):
        assert not kernels.available()
    assert any("could not build nomoat's kernels" in r.message and "simulated" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    w, x = torch.randn(3, 4), torch.randn(1, 4)
    torch.testing.assert_close(kernels.linear_fp32(x, kernels.pack_fp32(w), 3), F.linear(x, w))  # the reference
    g = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Linear(37, 70), nn.Linear(70, 19, bias=False))
    qmodel = nn.Sequential(nn.Linear(37, 70), nn.Linear(70, 19, bias=False))
    qmodel.load_state_dict(model.state_dict())
    quantize.quantize_model(qmodel, "int8")
    ref_q = [m.dequantize() for m in qmodel]
    xs = [torch.randn(m, 37, generator=g) for m in (1, 3, 12)]
    with torch.inference_mode():
        refs = [model(x) for x in xs]
        assert pack_model(model) == 2
        assert all(m.panels is None and m.packed_weight is not None for m in model)
        for x, ref in zip(xs, refs):
            torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
            h = F.linear(x, ref_q[0], qmodel[0].bias)
            torch.testing.assert_close(qmodel(x), F.linear(h, ref_q[1]), rtol=1e-5, atol=1e-5)
        assert all(getattr(m, "_panels", None) is None for m in qmodel)


def test_disabled_by_environment(monkeypatch):
    """NOMOAT_KERNELS=0: nothing is built or called; the ops give their references' results and layers keep torch's
    layouts (no panels), with unchanged outputs."""
    import torch.utils.cpp_extension as cpp

    def must_not_build(*args, **kwargs):
        raise AssertionError("NOMOAT_KERNELS=0 must not build the kernels")

    monkeypatch.setenv("NOMOAT_KERNELS", "0")
    monkeypatch.setattr(build, "_state", {})
    monkeypatch.setattr(cpp, "load", must_not_build)
    assert not kernels.available() and kernels.isa() is None
    g = torch.Generator().manual_seed(11)
    w, b, x = torch.randn(70, 33, generator=g), torch.randn(70, generator=g), torch.randn(5, 33, generator=g)
    called = []
    monkeypatch.setattr(torch.ops.nomoat, "linear_f32", lambda *a: called.append(a), raising=False)
    torch.testing.assert_close(kernels.linear_fp32(x, kernels.pack_fp32(w), 70, b), F.linear(x, w, b))
    assert not called  # the reference ran, not the compiled op
    lin = nn.Linear(33, 70)
    p = PackedLinear(lin)
    assert p.panels is None and p.packed_weight is not None
    with torch.inference_mode():
        torch.testing.assert_close(p(x), lin(x), rtol=1e-5, atol=1e-5)


def _rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Hugging Face's rotate-half rotary embedding of the first `rd` channels, in plain torch ops: x (B, H, hd)."""
    rd = cos.shape[-1]
    rot, rest = x[..., :rd], x[..., rd:]
    x1, x2 = rot[..., : rd // 2], rot[..., rd // 2 :]
    return torch.cat((rot * cos + torch.cat((-x2, x1), dim=-1) * sin, rest), dim=-1)


# Head sizes: vector-width multiples (16, 64, 128: the vectorised path) and others (10, 8: the scalar one); windows
# and long rows (over 64 keys: several vectors of scores, and a tail).
@pytest.mark.parametrize("heads, kv_heads, hd, rd, window", [(4, 2, 16, 16, 0), (3, 3, 10, 6, 0), (6, 1, 8, 8, 5),
                                                             (9, 3, 64, 64, 0), (4, 2, 128, 64, 37)])  # fmt: skip
def test_decode_attention_matches_sdpa(built, heads, kv_heads, hd, rd, window):
    g = torch.Generator().manual_seed(heads * 100 + hd)
    B, rows, S, row0 = 3, 5, 96, 1
    k_cache = torch.randn(rows, kv_heads, S, hd, generator=g)
    v_cache = torch.randn(rows, kv_heads, S, hd, generator=g)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    positions = torch.tensor([[7], [0], [83]])
    kv_len = 84
    qkv = torch.randn(B, 1, (heads + 2 * kv_heads) * hd + 3, generator=g)  # strided views, as the fused projection
    q = qkv[..., : heads * hd].view(B, 1, heads, hd)
    k = qkv[..., heads * hd : (heads + kv_heads) * hd].view(B, 1, kv_heads, hd)
    v = qkv[..., (heads + kv_heads) * hd : (heads + 2 * kv_heads) * hd].view(B, 1, kv_heads, hd)
    angles = positions[..., None].float() * torch.rand(rd // 2, generator=g)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()  # (B, 1, rd)
    scale = 0.3
    out = kernels.decode_attention(q, k, v, cos, sin, k_cache, v_cache, row0, positions, kv_len, window, scale)
    # Reference: write rotated keys and values, then SDPA under the boolean mask the model builds.
    for b in range(B):
        p = int(positions[b])
        ref_k[row0 + b, :, p] = _rope_ref(k[b, 0], cos[b], sin[b])
        ref_v[row0 + b, :, p] = v[b, 0]
    keys = torch.arange(kv_len)[None, :]
    allowed = keys <= positions  # (B, S)
    if window:
        allowed &= keys > positions - window
    qr = torch.stack([_rope_ref(q[b, 0], cos[b], sin[b]) for b in range(B)])[:, :, None]  # (B, H, 1, hd)
    kk = ref_k[row0 : row0 + B, :, :kv_len].repeat_interleave(heads // kv_heads, dim=1)
    vv = ref_v[row0 : row0 + B, :, :kv_len].repeat_interleave(heads // kv_heads, dim=1)
    ref = F.scaled_dot_product_attention(qr, kk, vv, attn_mask=allowed[:, None, None], scale=scale)
    torch.testing.assert_close(out, ref.transpose(1, 2).reshape(B, 1, heads * hd), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_cache, ref_k, rtol=1e-6, atol=1e-6)  # the cache holds the rotated keys
    torch.testing.assert_close(v_cache, ref_v)
