"""The decode stack over 4-bit layers (Q4_0 / Q4_1 panels) against the same decode model's layer loop."""

from __future__ import annotations

import pytest
import torch

from nomoat.inference import DecodeConfig, prepare
from nomoat.inference.panel_linear import Q4PanelLinear
from nomoat.models.checkpoint import load_model
from nomoat.models.quantize import QuantizedLinear

from stack_helpers import bank_logits, decode_logits, fixed_prompts, make_model, rel, threads_and_spin
from train_utils import random_adapter

# name -> (family, config overrides). "llama_mha": one query head per key/value head of 16 channels, so an attention
# unit's output (16 channels) is not whole blocks of 32: the output projection's input is quantized per thread.
MODELS = {
    "llama": ("llama3", {}),
    "qwen2": ("qwen2", {}),  # q/k/v biases
    "mistral": ("mistral", {}),  # sliding window
    "llama_mha": ("llama3", dict(num_key_value_heads=4)),
}


def _make(name: str, path) -> None:
    make_model(*MODELS[name], path)


def _q4_model(path, fmt: str, dtype=torch.float32):
    """The model with every block projection a 4-bit `QuantizedLinear` in `fmt` (the head stays as loaded)."""
    model = load_model(path, dtype, "cpu")
    for name, m in list(model.named_modules()):
        if name.endswith("_proj") and type(m) is torch.nn.Linear:
            model.set_submodule(name, QuantizedLinear.from_linear(m, "int4", int4_format=fmt))
    return model


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1"])
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("rows", [1, 3, 11])
def test_q4_stack_matches_layers(built, name, fmt, rows, tmp_path):
    """Every decode step of a 4-bit model runs in the stack (no fallback to the layer loop), and its logits equal
    the layer loop's (the same `linear_q4` panels and activation rounding), for 1, 3 and 11 rows (two row blocks)."""
    _make(name, tmp_path)
    model = _q4_model(tmp_path, fmt)
    dm = prepare(model, DecodeConfig(stack=True))
    assert dm.plan is not None
    assert all(type(m) is Q4PanelLinear for n, m in dm.net.named_modules() if n.endswith("_proj"))
    steps = 4
    got = decode_logits(dm, fixed_prompts(rows), steps)
    assert dm.stack_steps == steps  # every decode step took the stack
    ref_dm = prepare(model, DecodeConfig(stack=False))
    assert ref_dm.plan is None
    ref = decode_logits(ref_dm, fixed_prompts(rows), steps)
    assert rel(got, ref) < 1e-4
    fp32 = decode_logits(prepare(load_model(tmp_path, torch.float32, "cpu"), DecodeConfig(stack=False)),
                          fixed_prompts(rows), steps)  # fmt: skip
    assert rel(got, fp32) > 1e-3  # the 4-bit weights change the logits: the comparison above can fail


def test_q4_stack_bf16_rest(built, tmp_path):
    """A bf16 model with 4-bit projections (bf16 norms and KV cache) decodes in the stack, close to its layer loop
    (which rounds each layer's activations to bf16; the stack keeps them fp32)."""
    _make("llama", tmp_path)
    model = _q4_model(tmp_path, "q4_0", torch.bfloat16)
    dm = prepare(model, DecodeConfig(stack=True))
    assert dm.plan is not None
    got = decode_logits(dm, fixed_prompts(3), 4, cache_dtype=torch.bfloat16)
    assert dm.stack_steps == 4
    ref = decode_logits(prepare(model, DecodeConfig(stack=False)), fixed_prompts(3), 4, cache_dtype=torch.bfloat16)
    assert rel(got, ref) < 5e-2


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1"])
@pytest.mark.parametrize("rows", [1, 3, 11])
def test_q4_stack_with_adapters(built, fmt, rows, tmp_path):
    """Rows with one adapter, a weighted pair or none over 4-bit layers: the stack's LoRA terms equal the bank's
    own layer path."""
    model_dir = tmp_path / "model"
    _make("llama", model_dir)
    folders = {n: random_adapter(model_dir, tmp_path / n, 30 + i, r=r, alpha=2 * r)
               for i, (n, r) in enumerate([("a", 4), ("b", 8)])}  # fmt: skip
    selections = [((("a", 1.0),), (("a", 0.6), ("b", -0.4)), ())[i % 3] for i in range(rows)]
    model = _q4_model(model_dir, fmt)
    out = bank_logits(model, folders, selections, fixed_prompts(rows), 3)
    plain = decode_logits(prepare(model, DecodeConfig(stack=True)), fixed_prompts(rows), 3)
    if rows > 1 or selections[0]:
        assert rel(out[True], plain) > 1e-3  # the adapters change the logits
    assert rel(out[True], out[False]) < 1e-4


@pytest.mark.parametrize("threads, spin", [(1, 20000), (3, 0), (3, -1)])
def test_q4_stack_threads_and_helping(built, threads, spin, tmp_path):
    """Units run twice (helping, and every unit again in the test mode) write what they wrote the first time: the
    shared quantized inputs of the output and down projections included."""
    _make("qwen2", tmp_path)
    model = _q4_model(tmp_path, "q4_0")
    ref = decode_logits(prepare(model, DecodeConfig(stack=False)), fixed_prompts(3), 6)
    dm = prepare(model)
    with threads_and_spin(dm, threads, spin):
        got = decode_logits(dm, fixed_prompts(3), 6)
    assert dm.stack_steps == 6
    assert rel(got, ref) < 1e-4
