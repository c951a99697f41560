"""QLoRA: LoRA over a frozen int8 / int4 / NF4 base.

Bounds used (fp32):
  * Layer level, exact reference: a QLoRA layer equals a LoRA layer over the *dequantized* base weight to 1e-5 (outputs
    and all gradients), since it computes the same thing.
  * Layer level, against the fp32 base: |y_q - y| <= |x| @ |W - deq(W)|^T elementwise (+1e-5), the worst case of the
    per-weight quantization error; adapter gradients obey the same kind of bound through the base output.
  * Model level (tiny random llama3, 2 layers): relative logit error and gradient cosine measured against the fp32
    base with the same adapter; thresholds below are ~3x the measured values (int8 much tighter than the 4-bit modes).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nomoat.config import LoRAConfig
from nomoat.lora import (
    NF4_CODEBOOK,
    LoRALinear,
    NF4Linear,
    dequantize_nf4,
    inject_lora,
    lora_layers,
    lora_parameters,
    merge_lora,
    quantize_model_nf4,
    quantize_nf4,
    trainable_parameters,
)
from nomoat.models.checkpoint import load_model
from nomoat.models.quantize import QuantizedLinear, quantize_model

from hf_models import make_hf_model, padded_batch

MODES = ["int8", "int4", "nf4"]
PAPER_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip


def quantize(lin: nn.Linear, mode: str) -> nn.Module:
    return NF4Linear.from_linear(lin) if mode == "nf4" else QuantizedLinear.from_linear(lin, mode, group_size=32)


def pair(mode: str, dora: bool = False, seed: int = 0):
    """(qlora layer, lora over the dequantized weight, lora over the fp32 weight), sharing adapter weights."""
    torch.manual_seed(seed)
    lin = nn.Linear(64, 96)
    cfg = LoRAConfig(r=4, alpha=8, use_dora=dora)
    q = LoRALinear.from_quantized(quantize(lin, mode), cfg)
    deq = nn.Linear(64, 96)
    with torch.no_grad():
        deq.weight.copy_(q.qbase.dequantize())
        deq.bias.copy_(lin.bias)
    ref_q = LoRALinear.from_linear(deq, cfg)
    ref = LoRALinear.from_linear(lin, cfg)
    with torch.no_grad():
        q.lora_B.weight.normal_(0, 0.2)
        for other in (ref_q, ref):
            other.lora_A.weight.copy_(q.lora_A.weight)
            other.lora_B.weight.copy_(q.lora_B.weight)
        if dora:
            q.lora_magnitude_vector.mul_(1.1)
            ref_q.lora_magnitude_vector.copy_(q.lora_magnitude_vector)
            ref.lora_magnitude_vector.copy_(q.lora_magnitude_vector)
    return q, ref_q, ref, lin


def grads(layer: LoRALinear, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    y = layer(x)
    params = {n: p for n, p in layer.named_parameters() if p.requires_grad}
    out = torch.autograd.grad((y * g).sum(), [x, *params.values()])
    return {"y": y.detach(), "x": out[0], **dict(zip(params, out[1:]))}


# ---- NF4 format -----------------------------------------------------------------------------------------------


def test_nf4_codebook_is_the_papers():
    assert list(NF4_CODEBOOK) == PAPER_NF4
    # Rebuilt from its definition (bitsandbytes create_normal_map): normal quantiles, 8 positive, 7 negative, a zero.
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    offset = 0.9677083
    pos = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    values = values / values.abs().max()
    torch.testing.assert_close(values, torch.tensor(PAPER_NF4, dtype=torch.float64), rtol=0, atol=1e-6)


def test_nf4_round_trip_bound_and_memory():
    torch.manual_seed(0)
    w = torch.randn(96, 128) * 0.05
    w[3, 5] = 0.9  # an outlier only hurts its own block
    packed, absmax = quantize_nf4(w)
    assert packed.dtype == torch.uint8 and packed.numel() == w.numel() // 2
    assert absmax.numel() == w.numel() // 64
    back = dequantize_nf4(packed, absmax, w.shape)
    book = torch.tensor(PAPER_NF4)
    blocks_w, blocks_b = w.reshape(-1, 64), back.reshape(-1, 64)
    # Each value is the nearest codebook value times its block's absmax ...
    normed = blocks_w / absmax[:, None]
    nearest = book[(normed[..., None] - book).abs().argmin(-1)]
    torch.testing.assert_close(blocks_b, nearest * absmax[:, None], rtol=0, atol=1e-7)
    # ... so the error is at most half the widest gap of the codebook, times the block's absmax.
    half_gap = (book[1:] - book[:-1]).max() / 2
    assert ((blocks_w - blocks_b).abs() <= half_gap * absmax[:, None] + 1e-7).all()
    assert (back - w).abs().mean() < 0.1 * w.abs().mean()
    layer = NF4Linear.from_linear(nn.Linear(128, 96))
    n_bytes = sum(b.numel() * b.element_size() for b in layer.buffers())
    assert n_bytes == 96 * 128 * (0.5 + 4 / 64)
    x = torch.randn(3, 128)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.dequantize(), layer.bias))


def test_nf4_chunked_forward(monkeypatch):
    import nomoat.lora.nf4 as nf4

    layer = NF4Linear.from_linear(nn.Linear(128, 96))
    x = torch.randn(2, 5, 128)
    full = layer(x)
    monkeypatch.setattr(nf4, "CHUNK_ELEMENTS", 128 * 10)  # 10 rows per chunk
    torch.testing.assert_close(layer(x), full, rtol=0, atol=1e-6)


# ---- layers -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_qlora_layer_matches_dequantized_reference(mode, dora):
    q, ref_q, ref, lin = pair(mode, dora)
    x, g = torch.randn(2, 5, 64), torch.randn(2, 5, 96)
    got, exp = grads(q, x, g), grads(ref_q, x, g)
    assert set(got) == set(exp) == {"y", "x", "lora_A.weight", "lora_B.weight"} | ({"lora_magnitude_vector"} if dora
                                                                                  else set())  # fmt: skip
    for k in got:
        torch.testing.assert_close(got[k], exp[k], rtol=1e-5, atol=1e-5, msg=k)
    # Against the fp32 base: the quantization error bound.
    if not dora:
        err = (lin.weight - q.qbase.dequantize()).abs()
        bound = x.abs() @ err.T + 1e-5
        fp = grads(ref, x, g)
        assert ((got["y"] - fp["y"]).abs() <= bound).all()
        # Plain LoRA's adapter gradients do not depend on the base weight at all: equal to the fp32 ones.
        torch.testing.assert_close(got["lora_A.weight"], fp["lora_A.weight"], rtol=1e-5, atol=1e-5)
        assert ((got["x"] - fp["x"]).abs() <= g.abs() @ err + 1e-5).all()


@pytest.mark.parametrize("mode", MODES)
def test_backward_keeps_no_dequantized_weight(mode):
    q, _, _, _ = pair(mode)
    weight_numel = q.in_features * q.out_features
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    x = torch.randn(4, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = q(x)
    assert saved and max(saved) < weight_numel, saved
    y.sum().backward()
    assert x.grad is not None and q.lora_A.weight.grad is not None
    # The hook does see a full weight when a plain dequantize + linear is differentiated (the check can fail).
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        q.qbase(torch.randn(4, 64, requires_grad=True)) if mode != "nf4" else nn.functional.linear(
            torch.randn(4, 64, requires_grad=True), q.qbase.dequantize()
        )
    assert max(saved) >= weight_numel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qlora_swiglu_down_matches_plain_autograd(dtype):
    """`swiglu_forward` over an NF4 down projection (which keeps neither `silu(gate) * up` nor any weight) gives
    the output and gradients of plain autograd over the dequantized weight, in the activations' dtype."""
    q, ref_q, _, _ = pair("nf4")  # down: 64 -> 96
    torch.manual_seed(1)
    gate, up, g = torch.randn(2, 5, 64).to(dtype), torch.randn(2, 5, 64).to(dtype), torch.randn(2, 5, 96).to(dtype)
    ga, ua = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = q.swiglu_forward(ga, ua)
    assert y is not None and y.dtype == dtype and type(y.grad_fn).__name__ == "_SwiGLUDownLoRABackward"
    # gate, up, the rank-r product and the adapter: no third (N, I) tensor (the product) and no weight.
    assert sorted(saved)[-3:] == [q.lora_B.weight.numel(), gate.numel(), gate.numel()], saved
    got = torch.autograd.grad((y * g).sum(), [ga, ua, q.lora_A.weight, q.lora_B.weight])
    # Reference: the textbook expression over the dequantized weight, adapter in the activations' dtype.
    ga2, ua2 = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
    a, b = (w.detach().clone().requires_grad_(True) for w in (ref_q.lora_A.weight, ref_q.lora_B.weight))
    p = nn.functional.silu(ga2) * ua2
    w = q.qbase.dequantize(dtype)
    yr = p @ w.T + ref_q.bias.to(dtype) + ((p @ a.to(dtype).T) @ b.to(dtype).T) * q.scaling
    exp = torch.autograd.grad((yr * g).sum(), [ga2, ua2, a, b])
    # bf16: a few units in the last place of the largest value (the plain LoRA layer's own path differs as much).
    rel = 1e-6 if dtype == torch.float32 else 2e-2
    for name, x, e in zip(("y", "gate", "up", "lora_A", "lora_B"), (y, *got), (yr, *exp)):
        assert x.dtype == e.dtype, name
        assert (x.float() - e.float()).abs().max() <= rel * e.abs().max(), name


def test_merge_into_quantized_base_is_refused():
    q, _, _, _ = pair("int8")
    model = nn.Sequential()
    model.add_module("q_proj", q)
    with pytest.raises(RuntimeError, match="quantized \\(int8\\) base"):
        merge_lora(model)


# ---- a whole model ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("qlora") / "llama3"
    make_hf_model("llama3", path)
    return path


def _adapted(folder, mode, seed=5):
    model = load_model(folder, dtype=torch.float32, device="cpu")
    if mode == "nf4":
        quantize_model_nf4(model)
    elif mode != "fp32":
        quantize_model(model, mode, group_size=32, include_lm_head=False)
    torch.manual_seed(seed)  # same adapter init for every mode
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.05)
    return model


# mode -> (max relative logit error, min cosine of all adapter gradients); measured on this model:
# int8 0.0068 / 0.99998, int4 (group 32) 0.096 / 0.9954, nf4 (block 64) 0.091 / 0.9914.
MODEL_BOUNDS = {"int8": (0.02, 0.9995), "int4": (0.3, 0.97), "nf4": (0.3, 0.96)}


@pytest.mark.parametrize("mode", MODES)
def test_qlora_model_close_to_fp32_and_trains_adapters_only(folder, mode):
    ids, mask = padded_batch()
    ref, model = _adapted(folder, "fp32"), _adapted(folder, mode)
    assert all(layer.quantized for layer in lora_layers(model).values())
    losses = {}
    for name, m in (("ref", ref), ("q", model)):
        m.train()
        out = m(ids, attention_mask=mask)
        losses[name] = out
        out.logsumexp(-1).mean().backward()
    rel = (losses["q"] - losses["ref"]).abs().max() / losses["ref"].abs().max()
    max_rel, min_cos = MODEL_BOUNDS[mode]
    assert rel < max_rel, float(rel)
    trainable = trainable_parameters(model)
    assert set(trainable) == set(lora_parameters(model))
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    g_q = torch.cat([p.grad.flatten() for p in lora_parameters(model).values()])
    g_ref = torch.cat([p.grad.flatten() for p in lora_parameters(ref).values()])
    cos = torch.nn.functional.cosine_similarity(g_q, g_ref, dim=0)
    assert cos > min_cos, float(cos)
    assert math.isfinite(float(g_q.norm()))
