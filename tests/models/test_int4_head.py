"""Under int4 the output head is int8 (GGUF Q8_0 blocks; `nomoat.models.quantize.layer_mode`), however the model is
quantized.

The oracle of the head's codes and block scales is the `gguf` package's Q8_0 quantizer (llama.cpp's own); the oracle
of the logits is the fp32 model with every linear weight replaced by what its codes stand for (4-bit blocks
dequantized by plain torch arithmetic from `quantize_q4_0`'s codes, the head from the gguf package's Q8_0 blocks),
run by torch alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from nomoat import kernels
from nomoat.inference import DecodeConfig, prepare
from nomoat.inference.panel_linear import PanelLinear
from nomoat.kernels.reference import quantize_activations
from nomoat.models import load_plan
from nomoat.models.checkpoint import load_model, tensor_shapes
from nomoat.models.quantize import QuantizedLinear, layer_mode, quantize_model, quantize_q4_0

from hf_models import make_hf_model, padded_batch
from q8_oracle import dequantized, q8_0


def _q4_dequantized(w: torch.Tensor) -> torch.Tensor:
    codes, d = quantize_q4_0(w)  # (out, in) in [0, 15], (out, in / 32) fp16
    return ((codes.float() - 8).view(w.shape[0], -1, 32) * d.float()[:, :, None]).view(w.shape)


def _round_per_block(codes16: bool = False):
    """A forward pre-hook: the layer's input rounded per block of 32 as the kernels round it (the 4-bit kernel to
    int8; the int8 one to int8 in dot mode 1, to 16-bit codes in mode 2)."""

    def hook(_: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
        x = args[0]
        return (quantize_activations(x.reshape(-1, x.shape[-1]), codes16=codes16).view(x.shape),)

    return hook


def test_layer_mode_is_the_rule() -> None:
    assert layer_mode("lm_head", "int4") == "int8" and layer_mode("x.lm_head", "int4", 64) == "int8"
    assert layer_mode("model.layers.0.mlp.up_proj", "int4", 64) == "int4"
    assert layer_mode("model.layers.0.mlp.down_proj", "int4", 48) == "int8"  # not a multiple of the block
    assert layer_mode("lm_head", "int8") == "int8" and layer_mode("q_proj", "int8", 48) == "int8"


@pytest.mark.parametrize("family", ["llama3", "llama_tied_mqa"])  # a separate head, a head tied to the embedding
def test_int4_head_is_int8_q8_0_blocks_and_logits_follow(family: str, tmp_path: Path) -> None:
    make_hf_model(family, tmp_path)
    fp32 = load_model(tmp_path, "float32", "cpu")
    tied = fp32.lm_head.weight is fp32.model.embed_tokens.weight
    assert tied == (family == "llama_tied_mqa")
    for model in (quantize_model(load_model(tmp_path, "float32", "cpu"), "int4"),
                  load_model(tmp_path, "float32", "cpu", quantize="int4")):  # fmt: skip
        head = model.lm_head
        assert isinstance(head, QuantizedLinear) and head.mode == "int8", type(head)
        assert model.quantization["layers"]["lm_head"] == "int8"
        assert {m.mode for n, m in model.named_modules() if isinstance(m, QuantizedLinear) and n != "lm_head"} == {
            "int4"}
        codes, d = q8_0(fp32.lm_head.weight.detach())
        assert torch.equal(head.int8_codes(), codes) and torch.equal(head.int8_scales(), d)
        if tied:  # lookups keep the full-precision embedding
            assert torch.equal(model.model.embed_tokens.weight, fp32.model.embed_tokens.weight)

    # The reference: fp32 weights replaced by what the codes stand for, run by torch (activations rounded per block
    # where the 4-bit kernel rounds them, and the int8 one in its integer dot-product mode).
    ref = load_model(tmp_path, "float32", "cpu")
    ref.lm_head = nn.Linear(ref.lm_head.in_features, ref.lm_head.out_features, bias=False)
    with torch.no_grad():
        for name, m in ref.named_modules():
            if type(m) is nn.Linear and name != "lm_head":
                m.weight.copy_(_q4_dequantized(fp32.get_submodule(name).weight.detach()))
        ref.lm_head.weight.copy_(dequantized(codes, d))
    if kernels.available():
        for name, m in ref.named_modules():
            if type(m) is nn.Linear and name != "lm_head":
                m.register_forward_pre_hook(_round_per_block())
        if kernels.int8_dot():
            ref.lm_head.register_forward_pre_hook(_round_per_block(codes16=kernels.int8_dot() == 2))
    ids, mask = padded_batch()
    with torch.no_grad():
        got, want = model(ids, attention_mask=mask), ref(ids, attention_mask=mask)
    # fp32 summation order moves an activation across an int8 rounding boundary now and then (measured 1.0e-4 over
    # the layers); a 4-bit head would be off by about 1e-2.
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-3


def test_estimate_counts_the_int8_head(tmp_path: Path) -> None:
    """The memory check's estimate is the loaded bytes, head in int8, tied or not."""
    for family in ("llama3", "llama_tied_mqa"):
        path = tmp_path / family
        make_hf_model(family, path)
        model = load_model(path, "float32", "cpu", quantize="int4")
        seen, loaded = set(), 0
        for v in model.state_dict().values():
            if v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                loaded += v.numel() * v.element_size()
        tied = model.config.tie_word_embeddings
        assert load_plan.estimate_bytes(tensor_shapes(path), torch.float32, load_plan.quantizer_for("int4"), tied) \
            == loaded, family
        assert load_plan.IntQuantizer("int4").for_layer("lm_head").mode == "int8"
        assert load_plan.IntQuantizer("int4").for_layer("model.layers.0.mlp.up_proj").mode == "int4"


@pytest.mark.skipif(not kernels.available(), reason="the decode model's panels need the compiled kernels")
def test_decode_model_int4_head_is_int8_panels(tmp_path: Path) -> None:
    """`prepare(quantize="int4")` on an fp32 model gives the head the int8 panels `quantize_model` gives it."""
    make_hf_model("qwen2", tmp_path)  # tied head
    plain = load_model(tmp_path, "float32", "cpu")
    dm = prepare(plain, DecodeConfig(quantize="int4"))
    head = dm.net.lm_head
    assert type(head) is PanelLinear and head.int8
    quantized = quantize_model(load_model(tmp_path, "float32", "cpu"), "int4")
    assert torch.equal(head.panels, quantized.lm_head.qweight) and torch.equal(head.scale, quantized.lm_head.scale)
    assert type(plain.lm_head) is nn.Linear  # the user's model is unchanged
