"""A bf16 model's decode form: bf16 panels (`kernels.linear_bf16`, fp32 sums) and the decode model's layers, which read
the user's bf16 weights in place (`Bf16Linear`), against torch's own bf16 layers and model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nomoat.inference import DecodeConfig, PanelLinear, prepare
from nomoat.inference.bf16_linear import Bf16Linear
from nomoat.models.checkpoint import load_model
from nomoat.models.kv_cache import KVCache

from hf_models import make_hf_model


def test_bf16_layer_matches_torch(built):
    """Decode rows and a prefill's many rows: bf16 weights, bf16 activations, fp32 sums, a bf16 result (the sum
    rounded once), as `F.linear` of the same bf16 tensors widened to fp32."""
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(83, 141, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(141, 83, generator=g))
    layer = PanelLinear.from_module(lin)
    assert layer is not None and layer.bf16 and layer.in_features == 83
    assert torch.equal(layer.weight(), lin.weight.float())
    with torch.inference_mode():
        for rows in (1, 3, 8, 20, 70):
            x = torch.randn(rows, 83, generator=g).bfloat16()
            want = F.linear(x.float(), lin.weight.float(), lin.bias.float())
            got = layer(x)
            assert got.dtype == torch.bfloat16
            torch.testing.assert_close(got.float(), want.bfloat16().float(), rtol=8e-3, atol=1e-2)
            torch.testing.assert_close(got.float(), lin(x).float(), rtol=1.6e-2, atol=2e-2)  # torch's bf16 layer


def test_bf16_model_decodes_through_shared_bf16_weights(built, tmp_path):
    make_hf_model("llama3", tmp_path)
    model = load_model(tmp_path, "bfloat16", "cpu")
    dm = prepare(model, DecodeConfig())
    shared = [m for m in dm.net.modules() if isinstance(m, Bf16Linear)]
    assert shared and not any(type(m) is nn.Linear for m in dm.net.modules())  # every linear layer in decode form
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)  # the user's model is unchanged
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = model(ids).float()  # torch's bf16 layers, whole sequence
        cache = KVCache(dm.config, 2, 32, torch.bfloat16, "cpu")
        got = [dm(ids[:, :6], torch.arange(6).expand(2, 6), cache, rows=slice(0, 2))]
        for t in range(6, 9):
            got.append(dm(ids[:, t : t + 1], torch.full((2, 1), t), cache, rows=slice(0, 2)))
    got = torch.cat(got, dim=1).float()
    assert ((got - want).abs().max() / want.abs().max()).item() < 3e-2
    cos = F.cosine_similarity(got.reshape(-1, got.shape[-1]), want.reshape(-1, want.shape[-1]), dim=-1)
    assert cos.min().item() > 0.999
