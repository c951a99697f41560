"""The decode model of an int4 model: 4-bit panels shared with the user's layers, logits as the layers give them."""

from __future__ import annotations

import torch
from torch import nn

from nomoat import kernels
from nomoat.inference import DecodeConfig, prepare
from nomoat.inference.panel_linear import Q4PanelLinear
from nomoat.models.checkpoint import load_model
from nomoat.models.kv_cache import KVCache
from nomoat.models.quantize import QuantizedLinear, quantize_model

from hf_models import make_hf_model


def _greedy_logits(forward, config, prompt: list[int], steps: int) -> torch.Tensor:
    """Prefill `prompt`, then `steps` greedy one-token steps through a KV cache; the (steps, V) logits."""
    cache = KVCache(config, 1, 64, torch.float32, "cpu")
    out = []
    with torch.inference_mode():
        logits = forward(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache)
        pos = len(prompt)
        for _ in range(steps):
            tok = logits[:, -1].argmax(-1, keepdim=True)
            logits = forward(tok, torch.tensor([[pos]]), cache)
            out.append(logits[0, -1])
            pos += 1
    return torch.stack(out)


def test_decode_model_shares_q4_panels_and_matches_the_layers(tmp_path):
    make_hf_model("llama3", tmp_path)
    model = quantize_model(load_model(tmp_path, dtype=torch.float32, device="cpu"), "int4")
    int4 = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear) and m.mode == "int4"}
    assert int4
    dm = prepare(model)
    prompt = [5, 9, 33, 100, 7, 2]
    got = _greedy_logits(lambda ids, pos, cache: dm(ids, pos, cache, rows=slice(0, 1)), model.config, prompt, 6)
    want = _greedy_logits(lambda ids, pos, cache: model(ids, position_ids=pos, cache=cache), model.config, prompt, 6)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4
    if kernels.available():
        for name, layer in int4.items():  # the decode form holds no second copy of the codes
            twin = dm.net.get_submodule(name)
            assert type(twin) is Q4PanelLinear and twin.panels.data_ptr() == layer.qweight.data_ptr(), name


def test_prepare_quantizes_fp32_layers_to_q4(tmp_path):
    """`DecodeConfig(quantize="int4")` gives the 4-bit panels `quantize_model(..., "int4")` gives (same codes)."""
    make_hf_model("qwen2", tmp_path)
    plain = load_model(tmp_path, dtype=torch.float32, device="cpu")
    dm = prepare(plain, DecodeConfig(quantize="int4"))
    quantized = quantize_model(load_model(tmp_path, dtype=torch.float32, device="cpu"), "int4")
    for name, layer in quantized.named_modules():
        if isinstance(layer, QuantizedLinear) and layer.mode == "int4" and kernels.available():
            assert torch.equal(dm.net.get_submodule(name).panels, layer.qweight), name
    assert all(type(m) is nn.Linear for n, m in plain.named_modules() if n.endswith("proj"))  # unchanged
