"""The one-call decode stack (`inference/stack.py`) of a `DecodeModel` against its layer loop and transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nomoat import kernels
from nomoat.generate.engine import Engine
from nomoat.generate.sampling import SamplingParams
from nomoat.inference import DecodeConfig, DecodeModel, PanelLinear, prepare
from nomoat.kernels import build
from nomoat.lora import LoRAConfig, inject_lora, lora_parameters, unload_lora
from nomoat.models.checkpoint import load_model
from nomoat.models.packed import pack_model
from nomoat.models.quantize import quantize_model
from nomoat.tokenizer import Tokenizer

from hf_models import save_word_tokenizer
from stack_helpers import bank_logits, decode_logits, make_model, rel, threads_and_spin
from train_utils import random_adapter

# name -> (family in hf_models, config overrides). The base tiny models have 32-wide k/v projections (not whole
# 64-channel panels, so q/k/v run as three matrices); "wide" shapes make every projection whole panels (fused).
MODELS = {
    "llama": ("llama3", {}),
    "llama_wide": ("llama3", dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                                  intermediate_size=256)),
    "qwen2": ("qwen2", {}),  # q/k/v biases
    "qwen2_wide": ("qwen2", dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1)),
    "mistral": ("mistral", {}),  # sliding window 8
    "llama_o_bias": ("llama3", dict(attention_bias=True)),  # q/k/v and o biases
}  # fmt: skip


def _make(name: str, path: Path, seed: int = 0):
    """A random tiny transformers model saved to `path` (norms randomised too); returns it (fp32, eval, eager)."""
    return make_model(*MODELS[name], path, seed)


def _layers(model, quantize=None) -> DecodeModel:
    """The reference: the same decode model running its layers one by one (the same panel kernels)."""
    dm = prepare(model, DecodeConfig(quantize=quantize, stack=False))
    assert dm.plan is None
    return dm


@pytest.fixture
def int8_codes():
    """int8 layers in the int8-activation mode where the build has it (else the exact one), restored after: the
    stack and the layer loop then round the same activations alike but for one now and then (1e-5 holds). Under
    16-bit codes (the default), fp32 differences cross a rounding boundary far more often, each crossing 1/257 the
    size: that mode is compared at 1e-4 in test_int8_dot_stack.py."""
    was = kernels.int8_dot()
    kernels.int8_dot(1)
    yield
    kernels.int8_dot(was)


def _check_stack_matches(model, prompts, steps, row0=0, quantize=None):
    dm = prepare(model, DecodeConfig(quantize=quantize, stack=True))
    assert dm.plan is not None
    ref = decode_logits(_layers(model, quantize), prompts, steps, row0)
    got = decode_logits(dm, prompts, steps, row0)
    one_token_prefills = sum(len(p) == 1 for p in prompts)  # a 1-token prefill is a decode-shaped step too
    assert dm.stack_steps == steps + one_token_prefills  # every decode step took the stack
    assert rel(got, ref) < 1e-5
    return got


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fp32_stack_matches_layers(built, name, tmp_path):
    _make(name, tmp_path)
    model = load_model(tmp_path, "float32", "cpu")
    pack_model(model)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, 512, (13,), generator=g).tolist()
    # 13 + 12 positions: past the mistral window of 8 while decoding.
    _check_stack_matches(model, [prompt], 12)


def test_packed_model_panels_are_shared(built, tmp_path):
    """A packed model's decode model streams the packed layers' own panels: no second copy of any weight."""
    _make("llama", tmp_path)
    model = load_model(tmp_path, "float32", "cpu")
    pack_model(model)
    dm = prepare(model)
    for name, layer in model.named_modules():
        if hasattr(layer, "panels"):
            twin = dm.net.get_submodule(name)
            assert type(twin) is PanelLinear and twin.panels is layer.panels
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "PackedLinear"  # the user's model unchanged


@pytest.mark.parametrize("name", ["llama", "qwen2_wide", "mistral"])
def test_rows_at_different_positions(built, name, tmp_path):
    _make(name, tmp_path)
    model = load_model(tmp_path, "float32", "cpu")
    pack_model(model)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (3, 11, 1, 17, 6)]
    batch = _check_stack_matches(model, prompts, 6, row0=2)  # cache rows 2..6 of 7
    # Each row alone (batch 1, row 0) gives the same logits as inside the batch.
    dm = prepare(model)
    for i, p in enumerate(prompts):
        alone = decode_logits(dm, [p], 6)
        assert rel(batch[:, i], alone[:, 0]) < 1e-5


@pytest.mark.parametrize("name", ["llama_wide", "mistral"])
def test_long_rows(built, name, tmp_path):
    """Rows past 64 keys (several vectors of attention scores, and a tail) at 64-wide heads and in a window."""
    _make(name, tmp_path)
    model = load_model(tmp_path, "float32", "cpu")
    pack_model(model)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (75, 40, 91)]
    _check_stack_matches(model, prompts, 5)


@pytest.mark.parametrize("n_rows", [8, 9, 17, 32, 33])
def test_any_number_of_rows(built, n_rows, tmp_path):
    """8 rows to 33 (blocks of 8 and a remainder inside each panel unit) all take the stack and agree."""
    _make("llama_wide", tmp_path)
    model = load_model(tmp_path, "float32", "cpu")
    pack_model(model)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 512, (2 + i % 9,), generator=g).tolist() for i in range(n_rows)]
    _check_stack_matches(model, prompts, 3)


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "llama_wide"])
def test_int8_stack_matches_int8_layers(built, int8_codes, name, tmp_path):
    _make(name, tmp_path)
    model = quantize_model(load_model(tmp_path, "float32", "cpu"), "int8")
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (12, 4)]
    _check_stack_matches(model, prompts, 10)


def test_int8_quantized_by_prepare(built, tmp_path):
    """`DecodeConfig(quantize="int8")` on a plain fp32 model gives the decode model of `quantize_model`'s."""
    _make("qwen2", tmp_path)
    plain = load_model(tmp_path, "float32", "cpu")
    prompts = [[5, 9, 33, 100, 7], [8, 1]]
    got = _check_stack_matches(plain, prompts, 4, quantize="int8")
    want = decode_logits(prepare(quantize_model(load_model(tmp_path, "float32", "cpu"), "int8")), prompts, 4)
    assert rel(got, want) < 1e-5
    assert all(type(m) is torch.nn.Linear for n, m in plain.named_modules() if n.endswith("proj"))  # unchanged


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral"])
def test_greedy_equals_transformers(built, name, tmp_path):
    hf = _make(name, tmp_path)
    model = load_model(tmp_path, "float32", "cpu")
    pack_model(model)
    prompt = torch.randint(3, 512, (1, 8), generator=torch.Generator().manual_seed(5))
    hf.generation_config.eos_token_id = None
    ref = hf.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)[0, 8:].tolist()
    engine = Engine(model, Tokenizer.from_dir(tmp_path), max_running=2, prefix_cache_bytes=0)
    out = engine.generate(prompt[0].tolist(), SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True))
    assert out.token_ids == ref
    assert engine.decode.stack_steps >= 19


def test_lora_injection_is_followed(built, tmp_path):
    """An adapter injected into the user's model replaces its layers: the decode model follows (the stack over the
    int8 bases with the live adapter, outputs right), and once the adapter is unloaded the stack runs without it."""
    _make("llama", tmp_path)
    model = quantize_model(load_model(tmp_path, "float32", "cpu"), "int8")
    prompt = [5, 9, 33, 100, 7]
    dm = prepare(model)
    before = decode_logits(dm, [prompt], 4)
    assert dm.stack_steps == 4 and not dm.stale()
    inject_lora(model, LoRAConfig(r=4, alpha=8))  # B starts at zero: same function, different modules
    assert dm.stale() and dm.refresh() and dm.plan is not None
    with torch.no_grad():
        lora = decode_logits(dm, [prompt], 4)
    assert dm.stack_steps == 8
    assert rel(lora, before) < 1e-5
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    changed = decode_logits(dm, [prompt], 4)
    assert rel(changed, before) > 1e-3  # the adapter really applies (the stack reads it live)
    assert dm.stack_steps == 12
    unload_lora(model)
    assert dm.refresh() and dm.plan is not None
    again = decode_logits(dm, [prompt], 4)
    assert dm.stack_steps == 16
    assert rel(again, before) < 1e-5


@pytest.mark.parametrize("mode", ["fp32", "int8"])
def test_adapter_bank_rows_run_in_the_stack(built, mode, tmp_path):
    """An engine with adapters wraps its decode model's layers in the bank's layers (never the user's); the stack
    sees through them and adds each row's LoRA terms (one adapter, a weighted stack of two of different ranks, or
    none) in the same call. Tokens equal an engine whose layers run one by one (the bank's own grouped path), alone
    and in mixed batches."""
    model_dir = tmp_path / "model"
    _make("llama", model_dir)
    adapters = {"a": _adapter(model_dir, tmp_path / "a", 7, 4), "b": _adapter(model_dir, tmp_path / "b", 8, 8)}
    params = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    prompts = [[5, 17, 99, 3, 250, 8], [9, 4, 4, 120], [77, 3, 19, 200, 41, 6, 2]]
    selections = [(("a", 1.0),), (("a", 0.7), ("b", -0.5)), ()]

    def engine(stack: bool):
        model = load_model(model_dir, "float32", "cpu")
        quantize_model(model, "int8") if mode == "int8" else pack_model(model)
        return model, Engine(model, Tokenizer.from_dir(model_dir), max_running=3, adapters=adapters,
                             prefix_cache_bytes=0, decode_config=DecodeConfig(stack=stack))  # fmt: skip

    _, ref = engine(stack=False)  # the layer loop with the bank's layers
    alone = [ref.generate(p, params, adapter=sel).token_ids for p, sel in zip(prompts, selections)]
    assert len({tuple(t) for t in alone}) == 3
    assert alone[0] != ref.generate(prompts[0], params).token_ids  # the adapter changes the output
    model, eng = engine(stack=True)
    assert not any("MultiLoRA" in type(m).__name__ for m in model.modules())  # the user's model is not wrapped
    for p, sel, want in zip(prompts, selections, alone):
        assert eng.generate(p, params, adapter=sel).token_ids == want
    assert eng.decode.stack_steps == 21  # 7 decode steps each, all in the stack
    handles = [eng.submit(p, params, adapter=sel) for p, sel in zip(prompts, selections)]
    assert [h.result().token_ids for h in handles] == alone  # one batch mixing the three
    assert eng.decode.stack_steps == 28


@pytest.mark.parametrize("mode", ["fp32", "int8"])
def test_many_rows_and_adapters_in_the_stack(built, mode, tmp_path):
    """19 rows (three row blocks of the panel kernels) over six adapters of different ranks: each row one adapter,
    a weighted stack of two, or none. The stack's LoRA terms (each row's low-rank product made once per projection,
    then added panel by panel) equal the layer loop with the bank's own (torch) LoRA path. int8 runs the exact
    (fp32-activation) kernels; their int8-activation mode is tested in test_int8_dot_stack.py."""
    was = kernels.int8_dot()
    kernels.int8_dot(0)
    try:
        _many_rows_and_adapters(mode, tmp_path)
    finally:
        kernels.int8_dot(was)


def _many_rows_and_adapters(mode: str, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    _make("llama", model_dir)
    names = [f"a{i}" for i in range(6)]
    ranks = [2, 4, 8, 4, 12, 6]
    folders = {n: _adapter(model_dir, tmp_path / n, 20 + i, r) for i, (n, r) in enumerate(zip(names, ranks))}
    selections = []
    for row in range(19):
        if row % 7 == 3:
            selections.append(())
        elif row % 5 == 1:
            selections.append(((names[row % 6], 0.6), (names[(row + 2) % 6], -0.4)))
        else:
            selections.append(((names[row % 6], 1.0),))
    prompts = [[(7 * i + j) % 200 + 3 for j in range(2 + i % 5)] for i in range(19)]
    model = load_model(model_dir, "float32", "cpu")
    quantize_model(model, "int8") if mode == "int8" else pack_model(model)
    out = bank_logits(model, folders, selections, prompts, 3)
    plain = decode_logits(prepare(model, DecodeConfig(stack=True)), prompts, 3)
    assert rel(out[True], plain) > 1e-3  # the adapters change the logits
    assert rel(out[True], out[False]) < 1e-5


@pytest.mark.parametrize("threads, spin", [(2, 20000), (3, -1)])
def test_many_distinct_adapters_in_one_step(built, threads, spin, tmp_path):
    """27 rows over 12 adapters in one step: 11 rows share one adapter (two blocks of the adapter phase's units),
    ten rows each their own (ranks 1 to 16; some adapt only the attention or only the MLP projections), weighted
    stacks, a row without adapter. Equals the layer loop with the bank's own LoRA path, also when every unit runs
    again once complete (spin -1: the adapter products are stored whole, never accumulated)."""
    model_dir = tmp_path / "model"
    _make("llama_wide", model_dir)
    names = [f"a{i}" for i in range(12)]
    ranks = [8, 1, 16, 4, 3, 12, 2, 8, 5, 16, 6, 7]
    targets = [None, ["q_proj", "v_proj", "o_proj"], None, ["gate_proj", "up_proj", "down_proj"], None, ["k_proj"],
               None, ["down_proj", "q_proj"], None, None, ["o_proj", "up_proj"], None]  # fmt: skip
    folders = {n: _adapter(model_dir, tmp_path / n, 40 + i, r, t)
               for i, (n, r, t) in enumerate(zip(names, ranks, targets))}  # fmt: skip
    selections = [(("a0", 1.0),)] * 11 + [((names[1 + i], 1.0),) for i in range(10)]
    selections += [(), (("a0", 0.5), ("a3", -0.7)), (("a11", 1.0), ("a1", 0.3)), (("a11", 1.0),),
                   (("a2", 0.25), ("a7", 1.5), ("a10", 0.5)), (("a0", 1.0),)]  # fmt: skip
    prompts = [[(11 * i + j) % 200 + 3 for j in range(2 + i % 4)] for i in range(len(selections))]
    model = load_model(model_dir, "float32", "cpu")
    pack_model(model)
    out = bank_logits(model, folders, selections, prompts, 3, threads, spin)
    plain = decode_logits(prepare(model, DecodeConfig(stack=True)), prompts, 3)
    assert rel(out[True][:, 21], plain[:, 21]) < 1e-5  # the row without adapter
    assert rel(out[True], plain) > 1e-3  # the adapters change the logits
    assert rel(out[True], out[False]) < 1e-5


def test_ineligible_families_have_no_plan(built, tmp_path):
    """Gemma 2 (sandwich norms, soft-capping, norm offset) keeps the layer loop: no stack plan is built."""
    from hf_models import make_hf_model

    make_hf_model("gemma2", tmp_path)
    model = load_model(tmp_path, "float32", "cpu")
    pack_model(model)
    assert prepare(model).plan is None


def test_disabled_with_kernels(monkeypatch, tmp_path):
    """NOMOAT_KERNELS=0: no plan, and the decode model decodes with the user's own layers (nothing packed)."""
    _make("llama", tmp_path)
    model = load_model(tmp_path, "float32", "cpu")
    monkeypatch.setenv("NOMOAT_KERNELS", "0")
    monkeypatch.setattr(build, "_state", {})
    dm = prepare(model)
    assert dm.plan is None
    assert dm.net.model.layers[0].self_attn.q_proj is model.model.layers[0].self_attn.q_proj


@pytest.mark.parametrize("threads, spin", [(1, 20000), (3, 0), (3, -1)])
def test_thread_counts_and_helping(built, int8_codes, threads, spin, tmp_path):
    """One thread; more threads than cores that run the units they wait for themselves at once (spin 0); and every
    unit run again by every thread once complete (spin -1, a test mode). A unit run twice, even concurrently, must
    write what it wrote the first time, so the logits stay those of the layer loop."""
    _make("qwen2", tmp_path)
    model = quantize_model(load_model(tmp_path, "float32", "cpu"), "int8")
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (9, 4, 14)]
    ref = decode_logits(_layers(model), prompts, 8)
    dm = prepare(model)
    native = dm.plan.native
    helped = native.helped()
    with threads_and_spin(dm, threads, spin):
        got = decode_logits(dm, prompts, 8)
    assert rel(got, ref) < 1e-5
    if threads == 1:
        assert native.helped() == helped  # nobody to wait for
    if spin < 0:
        assert native.helped() > helped


@pytest.mark.parametrize("threads, spin", [(2, 20000), (3, 0), (3, 20000)])
def test_row_blocks_shared_between_threads_change_no_bit(built, threads, spin, tmp_path):
    """27 rows: four row blocks per panel unit, which a thread that reaches a phase's end claims from the units
    still running (and, at spin 0, also runs again whole). Whichever thread runs a block, its rows' sums are the
    same, so the logits equal one thread's bit for bit."""
    _make("llama_wide", tmp_path)
    model = load_model(tmp_path, "float32", "cpu")
    pack_model(model)
    prompts = [[(13 * i + 5 * j) % 300 + 3 for j in range(2 + i % 6)] for i in range(27)]
    dm = prepare(model)
    with threads_and_spin(dm, 1, 20000):
        one = decode_logits(dm, prompts, 6)
    for _ in range(3):
        with threads_and_spin(dm, threads, spin):
            assert torch.equal(decode_logits(dm, prompts, 6), one)
    assert rel(one, decode_logits(_layers(model), prompts, 6)) < 1e-5


def test_weight_changes_are_seen(built, tmp_path):
    """Norm weights changed in place are read by the stack at once; swapped (`p.data = ...`) and int8 codes reloaded
    in place (`load_state_dict`) make the decode model stale, and `refresh` makes it compute with the new weights, as
    the layer loop does."""
    _make("qwen2", tmp_path)
    other = tmp_path / "other"
    _make("qwen2", other, seed=1)
    model = quantize_model(load_model(tmp_path, "float32", "cpu"), "int8")
    donor = quantize_model(load_model(other, "float32", "cpu"), "int8")
    prompts = [[5, 9, 33, 100, 7], [8, 1]]
    dm = prepare(model)

    def check() -> torch.Tensor:
        got = decode_logits(dm, prompts, 3)
        assert rel(got, decode_logits(_layers(model), prompts, 3)) < 1e-5
        return got

    first = check()
    norm = model.model.layers[1].post_attention_layernorm
    with torch.no_grad():
        norm.weight.mul_(1.5)  # in place: the plan reads the same storage
    assert not dm.stale()
    check()
    norm.weight.data = norm.weight.data * 0.5  # new storage under the same parameter
    assert dm.stale() and dm.refresh()
    check()
    model.load_state_dict(donor.state_dict())  # every weight copied in place, int8 codes included
    assert dm.stale() and dm.refresh() and not dm.stale()
    last = check()
    assert rel(last, first) > 1e-2


def test_engine_batch_with_retiring_rows(built, tmp_path):
    """Continuous batching (rows finishing at different steps, the last row moving into a freed one): each request
    gets the tokens it gets alone through the layer loop."""
    _make("mistral", tmp_path)
    model = load_model(tmp_path, "float32", "cpu")
    pack_model(model)
    tok = Tokenizer.from_dir(tmp_path)
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (5, 12, 3, 9)]
    lengths = [6, 14, 3, 10]
    engine = Engine(model, tok, max_running=3, prefix_cache_bytes=0)
    handles = [engine.submit(p, SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True))
               for p, n in zip(prompts, lengths)]  # fmt: skip
    while engine.step():
        pass
    got = [h.result().token_ids for h in handles]
    assert engine.decode.stack_steps > 0
    alone = Engine(model, tok, max_running=1, prefix_cache_bytes=0, decode_config=DecodeConfig(stack=False))
    for p, n, tokens in zip(prompts, lengths, got):
        assert alone.generate(p, SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)).token_ids == tokens


def test_staleness_sees_every_change(built, tmp_path):
    """`stale()` is False until a layer is swapped, int8 codes are written in place or a parameter gets new
    storage (in-place writes to a norm are read by the stack directly); `refresh()` makes it current again."""
    _make("qwen2", tmp_path)
    model = quantize_model(load_model(tmp_path, "float32", "cpu"), "int8")
    dm = prepare(model)
    assert not dm.stale()
    attn = model.model.layers[1].self_attn
    attn.o_proj, saved = torch.nn.Identity(), attn.o_proj
    assert dm.stale()
    attn.o_proj = saved
    assert not dm.stale()  # the same module again
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.qweight.add_(0)  # an in-place write bumps the version
    assert dm.stale() and dm.refresh() and not dm.stale()
    norm = model.model.layers[1].input_layernorm
    with torch.no_grad():
        norm.weight.mul_(1.0)  # in place on a norm: the plan reads the same storage, still current
    assert not dm.stale()
    norm.weight.data = norm.weight.data.clone()
    assert dm.stale() and dm.refresh() and not dm.stale()
    model.model.layers[0].input_layernorm = torch.nn.Identity()  # a shared leaf replaced: followed too
    assert dm.stale() and dm.refresh() and not dm.stale()
    assert dm.net.model.layers[0].input_layernorm is model.model.layers[0].input_layernorm and dm.plan is None
    del model.model.layers[1].mlp._modules["up_proj"]  # a layer gone
    assert dm.stale()
    with pytest.raises(ValueError, match="up_proj"):
        dm.refresh()


@pytest.mark.parametrize("name", ["qwen3", "gemma3_text"])
def test_layer_loop_with_kernel_attention_equals_transformers(built, name, tmp_path):
    """Models the stack does not take (q/k norms; Gemma 3's sandwich norms and GeGLU) decode layer by layer, with one
    kernel attention call per layer: greedy tokens equal transformers', and equal the torch attention's."""
    from nomoat.inference.attention import KernelAttention

    from hf_models import make_hf_model

    hf = make_hf_model(name, tmp_path)
    save_word_tokenizer(tmp_path)
    model = load_model(tmp_path, "float32", "cpu")
    engine = Engine(model, Tokenizer.from_dir(tmp_path), max_running=2, prefix_cache_bytes=0)
    assert engine.decode.plan is None
    assert type(engine.decode.net.model.layers[0].self_attn) is KernelAttention
    assert type(model.model.layers[0].self_attn).__name__ == "Attention"  # the user's module keeps its class
    prompt = torch.randint(3, 512, (1, 9), generator=torch.Generator().manual_seed(12))
    hf.generation_config.eos_token_id = None
    ref = hf.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)[0, 9:].tolist()
    params = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
    assert engine.generate(prompt[0].tolist(), params).token_ids == ref
    ids = torch.randint(3, 512, (2, 7), generator=torch.Generator().manual_seed(13)).tolist()
    got = decode_logits(engine.decode, ids, 5)
    want = decode_logits(DecodeModel(model, model, {}, lambda m: m, stack=False), ids, 5)  # the user's layers
    assert rel(got, want) < 1e-5


def _adapter(model_dir, out, seed, r, targets=None):  # noqa: ANN001, ANN202
    extra = {} if targets is None else {"target_modules": targets}
    return random_adapter(model_dir, out, seed, r=r, alpha=2 * r, **extra)
