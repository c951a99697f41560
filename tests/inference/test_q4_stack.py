"""The decode stack over 4-bit layers (Q4_0 / Q4_1 panels) against the same decode model's layer loop."""

from __future__ import annotations

import pytest
import torch
import transformers

from nomoat import kernels
from nomoat.inference import DecodeConfig, DecodeModel, prepare
from nomoat.inference.panel_linear import Q4PanelLinear
from nomoat.lora.bank import AdapterBank, group_rows
from nomoat.models.checkpoint import load_model
from nomoat.models.kv_cache import KVCache
from nomoat.models.quantize import QuantizedLinear

from hf_models import hf_config, save_word_tokenizer
from train_utils import random_adapter

# name -> (family, config overrides). "llama_mha": one query head per key/value head of 16 channels, so an attention
# unit's output (16 channels) is not whole blocks of 32: the output projection's input is quantized per thread.
MODELS = {
    "llama": ("llama3", {}),
    "qwen2": ("qwen2", {}),  # q/k/v biases
    "mistral": ("mistral", {}),  # sliding window
    "llama_mha": ("llama3", dict(num_key_value_heads=4)),
}


@pytest.fixture(scope="module")
def built() -> None:
    """The kernels must build here: a failure must not hide as a skip."""
    assert kernels.available(), "nomoat's kernels did not build: see the log for the compiler error"


def _make(name: str, path, seed: int = 0) -> None:
    family, overrides = MODELS[name]
    torch.manual_seed(seed)
    cfg = hf_config(family, **overrides)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n or "bias" in n:
                p.add_(torch.randn_like(p) * 0.1)
    hf.eval().save_pretrained(path)
    save_word_tokenizer(path)


def _q4_model(path, fmt: str, dtype=torch.float32):
    """The model with every block projection a 4-bit `QuantizedLinear` in `fmt` (the head stays as loaded)."""
    model = load_model(path, dtype, "cpu")
    for name, m in list(model.named_modules()):
        if name.endswith("_proj") and type(m) is torch.nn.Linear:
            model.set_submodule(name, QuantizedLinear.from_linear(m, "int4", int4_format=fmt))
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _decode_logits(dm: DecodeModel, prompts: list[list[int]], steps: int, during=None) -> torch.Tensor:
    """Prefill each prompt into its cache row, then `steps` greedy steps of all rows at once; (steps, B, V)."""
    cache = KVCache(dm.config, len(prompts), 64, dm.net.model.embed_tokens.weight.dtype, "cpu")
    out = []
    with torch.inference_mode():
        toks = []
        for i, p in enumerate(prompts):
            logits = dm(torch.tensor([p]), torch.arange(len(p))[None], cache, rows=slice(i, i + 1))
            toks.append(int(logits[0, -1].argmax()))
        lengths = [len(p) for p in prompts]
        for _ in range(steps):
            ids, pos = torch.tensor(toks)[:, None], torch.tensor(lengths)[:, None]
            if during is None:
                logits = dm(ids, pos, cache, rows=slice(0, len(prompts)))[:, -1]
            else:
                with during():
                    logits = dm(ids, pos, cache, rows=slice(0, len(prompts)))[:, -1]
            out.append(logits.float())
            toks = logits.argmax(-1).tolist()
            lengths = [n + 1 for n in lengths]
    return torch.stack(out)


def _prompts(n: int) -> list[list[int]]:
    return [[(11 * i + 7 * j) % 250 + 3 for j in range(2 + i % 5)] for i in range(n)]


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
    got = _decode_logits(dm, _prompts(rows), steps)
    assert dm.stack_steps == steps  # every decode step took the stack
    ref_dm = prepare(model, DecodeConfig(stack=False))
    assert ref_dm.plan is None
    ref = _decode_logits(ref_dm, _prompts(rows), steps)
    assert _rel(got, ref) < 1e-4
    fp32 = _decode_logits(prepare(load_model(tmp_path, torch.float32, "cpu"), DecodeConfig(stack=False)),
                          _prompts(rows), steps)  # fmt: skip
    assert _rel(got, fp32) > 1e-3  # the 4-bit weights change the logits: the comparison above can fail


def test_q4_stack_bf16_rest(built, tmp_path):
    """A bf16 model with 4-bit projections (bf16 norms and KV cache) decodes in the stack, close to its layer loop
    (which rounds each layer's activations to bf16; the stack keeps them fp32)."""
    _make("llama", tmp_path)
    model = _q4_model(tmp_path, "q4_0", torch.bfloat16)
    dm = prepare(model, DecodeConfig(stack=True))
    assert dm.plan is not None
    got = _decode_logits(dm, _prompts(3), 4)
    assert dm.stack_steps == 4
    ref = _decode_logits(prepare(model, DecodeConfig(stack=False)), _prompts(3), 4)
    assert _rel(got, ref) < 5e-2


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
    out = {}
    for stack in (True, False):
        dm = prepare(model, DecodeConfig(stack=stack))
        bank = AdapterBank(dm.net)
        for name, folder in folders.items():
            bank.add(name, folder)
        dm.rebuild_plan()
        assert (dm.plan is not None) == stack
        plan = group_rows(selections, torch.device("cpu"))
        out[stack] = _decode_logits(dm, _prompts(rows), 3, during=lambda b=bank, p=plan: b.plan(p))
        assert dm.stack_steps == (3 if stack else 0)
    plain = _decode_logits(prepare(model, DecodeConfig(stack=True)), _prompts(rows), 3)
    if rows > 1 or selections[0]:
        assert _rel(out[True], plain) > 1e-3  # the adapters change the logits
    assert _rel(out[True], out[False]) < 1e-4


@pytest.mark.parametrize("threads, spin", [(1, 20000), (3, 0), (3, -1)])
def test_q4_stack_threads_and_helping(built, threads, spin, tmp_path):
    """Units run twice (helping, and every unit again in the test mode) write what they wrote the first time: the
    shared quantized inputs of the output and down projections included."""
    _make("qwen2", tmp_path)
    model = _q4_model(tmp_path, "q4_0")
    ref = _decode_logits(prepare(model, DecodeConfig(stack=False)), _prompts(3), 6)
    dm = prepare(model)
    native = dm.plan.native
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        native.set_spin(spin, 0 if spin <= 0 else 2)
        got = _decode_logits(dm, _prompts(3), 6)
    finally:
        torch.set_num_threads(saved)
        native.set_spin(20000, 2)
    assert dm.stack_steps == 6
    assert _rel(got, ref) < 1e-4
