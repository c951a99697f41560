"""A bf16 model's one-call decode stack: against its own layer loop, transformers in bf16, and the weights it shares.

A bf16 model's decode model reads the user's bf16 weights in place (`Bf16Linear`, and the stack through the same
tensors): no weight exists twice, a tied head reads the embedding.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nomoat.generate.engine import Engine
from nomoat.generate.sampling import SamplingParams
from nomoat.inference import DecodeConfig, DecodeModel, prepare
from nomoat.inference.bf16_linear import Bf16Linear
from nomoat.models.checkpoint import load_model
from nomoat.models.kv_cache import KVCache
from nomoat.tokenizer import Tokenizer

from stack_helpers import make_model, rel

MODELS = {
    "llama": ("llama3", {}),
    "llama_wide": ("llama3", dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                                  intermediate_size=256)),
    "qwen2": ("qwen2", {}),  # q/k/v biases
    "mistral": ("mistral", {}),  # sliding window 8
}  # fmt: skip


def _make(name: str, path: Path, seed: int = 0):
    """A random tiny transformers model saved in bf16 to `path` (norms and biases randomised); returns it in bf16."""
    return make_model(*MODELS[name], path, seed, torch.bfloat16)


def _min_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), dim=-1).min().item()


def _decode(dm: DecodeModel, prompts: torch.Tensor, steps: int, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Prefill `prompts` (B, T) into rows 0..B-1, then feed `steps` further given tokens (B, steps) one at a time
    (teacher forcing: the same tokens for every decode model; default random); returns the decode steps' logits
    (B, steps, V) fp32 and the tokens."""
    B, T = prompts.shape
    cache = KVCache(dm.config, B, 64, torch.bfloat16, "cpu")
    if tokens is None:
        tokens = torch.randint(3, 200, (B, steps), generator=torch.Generator().manual_seed(9))
    out = []
    with torch.inference_mode():
        dm(prompts, torch.arange(T).expand(B, T), cache, rows=slice(0, B))
        for t in range(steps):
            out.append(dm(tokens[:, t : t + 1], torch.full((B, 1), T + t), cache, rows=slice(0, B))[:, -1])
    return torch.stack(out, dim=1).float(), tokens


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bf16_stack_matches_layers_and_transformers(built, name, tmp_path):
    """Decode steps through the stack against the same decode model's layer loop and transformers' bf16 forward over
    the whole sequence (positions past the mistral window of 8)."""
    hf = _make(name, tmp_path)
    model = load_model(tmp_path, "bfloat16", "cpu")
    prompts = torch.randint(3, 200, (3, 7), generator=torch.Generator().manual_seed(1))
    stack = prepare(model, DecodeConfig(stack=True))
    layers = prepare(model, DecodeConfig(stack=False))
    assert stack.plan is not None and stack.plan.head and layers.plan is None  # the head in the step's call too
    got, tokens = _decode(stack, prompts, 10)
    assert stack.stack_steps == 10
    ref, _ = _decode(layers, prompts, 10)
    with torch.inference_mode():
        want = hf(torch.cat([prompts, tokens], dim=1)).logits[:, 7:].float()  # (B, 10, V)
    for other in (ref, want):  # the tolerances of tests/inference/test_bf16_decode.py
        assert rel(got, other) < 3e-2
        assert _min_cos(got, other) > 0.999


@pytest.mark.parametrize("rows", [1, 9, 17])
def test_bf16_stack_any_number_of_rows(built, rows, tmp_path):
    """Row blocks of the kernels (4 and 8 rows) and remainders, against the layer loop and the last row alone."""
    _make("llama_wide", tmp_path)
    model = load_model(tmp_path, "bfloat16", "cpu")
    dm = prepare(model)
    prompts = torch.randint(3, 200, (rows, 5), generator=torch.Generator().manual_seed(2))
    batch, tokens = _decode(dm, prompts, 4)
    assert dm.stack_steps == 4
    ref, _ = _decode(prepare(model, DecodeConfig(stack=False)), prompts, 4)
    alone, _ = _decode(dm, prompts[-1:], 4, tokens[-1:])
    for want, got in ((ref, batch), (alone, batch[-1:])):
        assert rel(got, want) < 3e-2 and _min_cos(got, want) > 0.999


def test_bf16_decode_model_shares_every_weight(built, tmp_path):
    """Every bf16 weight the decode model reads is the user's tensor (same storage), the tied head reads the
    embedding, and the decode model holds no other weight bytes beyond fp32 copies of the (small) biases."""
    _make("qwen2", tmp_path)
    model = load_model(tmp_path, "bfloat16", "cpu")
    assert model.config.tie_word_embeddings
    dm = prepare(model)
    assert dm.plan is not None
    users = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    shared = 0
    for name, layer in dm.net.named_modules():
        if type(layer) is Bf16Linear:
            source = model.get_submodule(name).weight
            assert layer.bf16_weight.data_ptr() == source.data_ptr()
            shared += 1
    assert shared == 7 * len(model.model.layers) + 1
    assert dm.net.lm_head.bf16_weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    own = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
           for t in list(dm.net.parameters()) + list(dm.net.buffers())
           if t.untyped_storage().data_ptr() not in users}  # fmt: skip
    biases = sum(m.bias.numel() * 4 for m in dm.net.modules() if type(m) is Bf16Linear and m.bias is not None)
    assert sum(own.values()) <= biases


def test_bf16_engine_greedy_equals_layer_loop(built, tmp_path):
    """The engine's greedy tokens through the stack are the layer loop's (the path bf16 models took before) greedy
    choices, step by step on the same context: each token is the loop's argmax, or within the bf16 tolerance of it
    (a near-tie that one bf16 rounding decides); most steps are exact, and batched rows equal rows alone."""
    _make("llama", tmp_path)
    params = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
    prompts = [[5, 17, 99, 3, 250, 8], [9, 4, 4, 120], [77, 3, 19, 200, 41, 6, 2]]
    model = load_model(tmp_path, "bfloat16", "cpu")
    eng = Engine(model, Tokenizer.from_dir(tmp_path), max_running=3, prefix_cache_bytes=0)
    outs = [eng.generate(p, params).token_ids for p in prompts]
    assert eng.decode.stack_steps == 3 * 15
    handles = [eng.submit(p, params) for p in prompts]
    assert [h.result().token_ids for h in handles] == outs  # batched as alone
    layers = prepare(model, DecodeConfig(stack=False))
    exact = 0
    for prompt, out in zip(prompts, outs):
        ids = torch.tensor([prompt + out[:-1]])
        ref, _ = _decode(layers, ids[:, : len(prompt)], len(out) - 1, ids[:, len(prompt) :])  # (1, 15, V)
        cache = KVCache(layers.config, 1, 64, torch.bfloat16, "cpu")
        with torch.inference_mode():
            first = layers(ids[:, : len(prompt)], torch.arange(len(prompt))[None], cache, rows=slice(0, 1))
        first = first[:, -1:].float()
        ref = torch.cat([first, ref], dim=1)[0]  # (16, V): the loop's logits before each token
        for logits, tok in zip(ref, out):
            assert logits[tok] >= logits.max() - 3e-2 * logits.abs().max()
            exact += int(logits.argmax()) == tok
    assert exact >= 0.75 * sum(map(len, outs))
