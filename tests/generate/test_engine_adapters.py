"""Many adapters in one batch: each request decodes what transformers + peft decode with its own adapter."""

from __future__ import annotations

import peft
import pytest
import torch

from nomoat.generate.engine import Engine
from nomoat.generate.sampling import SamplingParams
from nomoat.lora import AdapterError, lora_parameters, merge_lora, unload_lora
from nomoat.lora.peft_format import load_adapter
from nomoat.models.checkpoint import load_model
from nomoat.tokenizer import Tokenizer

from hf_models import load_hf, make_hf_model, save_word_tokenizer
from train_utils import random_adapter

PROMPT = [5, 17, 99, 3, 250, 8, 41, 77, 12, 6, 300, 9, 14, 201, 33, 7, 18, 90, 4, 66]  # > one 16-token block
N = 10


@pytest.fixture(scope="module", params=["llama3", "phi3"])
def setup(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model_dir = root / "model"
    make_hf_model(request.param, model_dir)
    save_word_tokenizer(model_dir)
    random_adapter(model_dir, root / "a", seed=1)
    random_adapter(model_dir, root / "b", seed=2, target_modules=["q_proj", "v_proj", "down_proj"])
    return model_dir, root


def _peft_greedy(model_dir, adapter_dir) -> list[int]:
    hf = load_hf(model_dir)
    model = peft.PeftModel.from_pretrained(hf, adapter_dir).eval() if adapter_dir else hf
    out = model.generate(input_ids=torch.tensor([PROMPT]), max_new_tokens=N, do_sample=False, pad_token_id=0,
                         eos_token_id=None)  # fmt: skip
    return out[0, len(PROMPT) :].tolist()


def _merged_greedy(model_dir, stack) -> list[int]:
    """The reference for a weighted stack: the adapters merged into the base weights one after another."""
    model = load_model(model_dir, dtype=torch.float32, device="cpu")
    for folder, weight in stack:
        load_adapter(model, folder)
        with torch.no_grad():
            for name, p in lora_parameters(model).items():
                if name.endswith("lora_B.weight"):
                    p.mul_(weight)
        merge_lora(model)
        unload_lora(model)
    engine = Engine(model, Tokenizer.from_dir(model_dir), max_running=1, prefix_cache_bytes=0)
    return engine.generate(PROMPT, SamplingParams(max_new_tokens=N, ignore_eos=True, temperature=0)).token_ids


def test_rows_with_different_adapters_in_one_batch(setup):
    model_dir, root = setup
    model = load_model(model_dir, dtype=torch.float32, device="cpu")
    engine = Engine(model, Tokenizer.from_dir(model_dir), max_running=4, adapters={"a": root / "a", "b": root / "b"})
    assert engine.adapters == ["a", "b"]
    params = SamplingParams(max_new_tokens=N, ignore_eos=True, temperature=0)
    selections = [(), (("a", 1.0),), (("b", 1.0),), (("a", 1.0), ("b", 0.5))]
    handles = [engine.submit(PROMPT, params, adapter=sel) for sel in selections]  # same prompt: prefix cache shared?
    while engine.step():
        pass
    got = [h.result().token_ids for h in handles]
    assert got[0] == _peft_greedy(model_dir, None)
    assert got[1] == _peft_greedy(model_dir, root / "a")
    assert got[2] == _peft_greedy(model_dir, root / "b")
    assert got[3] == _merged_greedy(model_dir, [(root / "a", 1.0), (root / "b", 0.5)])
    assert len({tuple(g) for g in got}) == 4  # the adapters really change the outputs
    # A request alone later (prefix cache warm for every selection) decodes the same.
    again = engine.generate(PROMPT, params, adapter=(("b", 1.0),))
    assert again.token_ids == got[2]


def test_bad_selections_and_adapters(setup, tmp_path):
    model_dir, root = setup
    model = load_model(model_dir, dtype=torch.float32, device="cpu")
    engine = Engine(model, Tokenizer.from_dir(model_dir), max_running=2)
    with pytest.raises(ValueError, match="no adapter is loaded"):
        engine.submit(PROMPT, adapter=(("a", 1.0),))
    engine.add_adapter("a", root / "a")
    with pytest.raises(ValueError, match="unknown adapter 'zz'.*loaded: a"):
        engine.submit(PROMPT, adapter=(("zz", 1.0),))
    with pytest.raises(AdapterError, match="already loaded"):
        engine.add_adapter("a", root / "a")
    random_adapter(model_dir, tmp_path / "dora", seed=3, use_dora=True)
    with pytest.raises(AdapterError, match="DoRA"):
        engine.add_adapter("d", tmp_path / "dora")


def test_non_contiguous_rows_share_an_adapter(setup):
    """Rows 0 and 2 use the same adapter (an index-tensor group), row 1 the base, with different prompts."""
    model_dir, root = setup
    model = load_model(model_dir, dtype=torch.float32, device="cpu")
    engine = Engine(model, Tokenizer.from_dir(model_dir), max_running=3, adapters={"a": root / "a"})
    params = SamplingParams(max_new_tokens=N, ignore_eos=True, temperature=0)
    other = PROMPT[:7]
    handles = [engine.submit(PROMPT, params, adapter=(("a", 1.0),)), engine.submit(PROMPT, params),
               engine.submit(other, params, adapter=(("a", 1.0),))]  # fmt: skip
    while engine.step():
        pass
    got = [h.result().token_ids for h in handles]
    assert got[0] == _peft_greedy(model_dir, root / "a")
    assert got[1] == _peft_greedy(model_dir, None)
    alone = Engine(load_model(model_dir, dtype=torch.float32, device="cpu"), Tokenizer.from_dir(model_dir),
                   max_running=1, adapters={"a": root / "a"})  # fmt: skip
    assert got[2] == alone.generate(other, params, adapter=(("a", 1.0),)).token_ids


def test_grouped_matmul_path_equals_loop_and_merged(setup, tmp_path, monkeypatch):
    """Several row groups (slice, index rows, a weighted stack, adapters of different ranks and targets), over
    several tokens per row: the grouped-matmul path equals the per-group loop and each row's merged model."""
    from nomoat.lora import bank as bank_mod
    from nomoat.lora.apply import merge_adapters

    model_dir, root = setup
    random_adapter(model_dir, tmp_path / "c", seed=3, r=8, alpha=4)  # another rank: stacks are zero-padded
    folders = {"a": root / "a", "b": root / "b", "c": tmp_path / "c"}
    model = load_model(model_dir, dtype=torch.float32, device="cpu").eval()
    bank = bank_mod.AdapterBank(model)
    for name, folder in folders.items():
        bank.add(name, folder)
    selections = [(("a", 1.0),), (("c", 0.7),), (), (("a", 1.0),), (("b", 0.5), ("c", -1.0)), (("c", 0.7),)]
    ids = torch.randint(3, 500, (len(selections), 7), generator=torch.Generator().manual_seed(0))
    plan = bank_mod.group_rows(selections, torch.device("cpu"))
    assert bank_mod.GROUPED_MM  # torch >= 2.8 on CPU: the grouped path is what runs here
    with torch.no_grad(), bank.plan(plan):
        grouped = model(ids)
    monkeypatch.setattr(bank_mod, "GROUPED_MM", False)
    with torch.no_grad(), bank.plan(plan):
        loop = model(ids)
    torch.testing.assert_close(grouped, loop, rtol=1e-5, atol=1e-5)
    for row, sel in enumerate(selections):
        merged = load_model(model_dir, dtype=torch.float32, device="cpu").eval()
        merge_adapters(merged, [(folders[name], weight) for name, weight in sel])
        with torch.no_grad():
            ref = merged(ids[row : row + 1])
        torch.testing.assert_close(grouped[row : row + 1], ref, rtol=1e-4, atol=1e-4)
    bank.remove("a")  # the stacks are rebuilt without it; the others still apply
    plan = bank_mod.group_rows(selections[1:3] + selections[4:], torch.device("cpu"))
    monkeypatch.setattr(bank_mod, "GROUPED_MM", True)
    with torch.no_grad(), bank.plan(plan):
        after = model(torch.cat([ids[1:3], ids[4:]]))
    torch.testing.assert_close(after, torch.cat([grouped[1:3], grouped[4:]]), rtol=1e-5, atol=1e-5)


def test_requests_take_parsed_selections(setup):
    """A selection parsed from the one grammar goes to `submit` as it is, and decodes as its `(name, weight)` pairs."""
    from nomoat.lora.selection import SelectionError, parse_selection

    model_dir, root = setup
    model = load_model(model_dir, dtype=torch.float32, device="cpu")
    engine = Engine(model, Tokenizer.from_dir(model_dir), max_running=2, adapters={"a": root / "a", "b": root / "b"})
    params = SamplingParams(max_new_tokens=N, ignore_eos=True, temperature=0)
    parsed = engine.generate(PROMPT, params, adapter=parse_selection("a+b:0.5")).token_ids
    assert parsed == engine.generate(PROMPT, params, adapter=(("a", 1.0), ("b", 0.5))).token_ids
    assert parsed == _merged_greedy(model_dir, [(root / "a", 1.0), (root / "b", 0.5)])
    assert engine.generate(PROMPT, params, adapter=parse_selection("none")).token_ids == _peft_greedy(model_dir, None)
    with pytest.raises(SelectionError, match="unknown adapter 'c'"):
        engine.submit(PROMPT, params, adapter=parse_selection("a+c"))


@pytest.mark.parametrize("chunk_tokens", [1024, 40])
def test_admitted_together_with_adapters_prefix_hits_and_chunks_equal_alone(setup, monkeypatch, chunk_tokens):
    """Requests admitted at once: different adapters and lengths share padded prefill forwards (in chunks of at
    most `chunk_tokens`), one continues from a cached prefix alone (so the others' rows are not contiguous)."""
    import nomoat.generate.engine as engine_module

    monkeypatch.setattr(engine_module, "PREFILL_CHUNK_TOKENS", chunk_tokens)
    model_dir, root = setup
    model = load_model(model_dir, dtype=torch.float32, device="cpu")
    adapters = {"a": root / "a", "b": root / "b"}
    params = SamplingParams(max_new_tokens=N, ignore_eos=True, temperature=0)
    engine = Engine(model, Tokenizer.from_dir(model_dir), max_running=8, adapters=adapters)
    engine.generate(PROMPT, params, adapter=(("a", 1.0),))  # fills the prefix cache under adapter a
    requests = [(PROMPT[:13], ()), (PROMPT + [21, 22], (("a", 1.0),)), (PROMPT[:7], (("b", 1.0),)),
                (PROMPT[:17], (("a", 1.0), ("b", 0.5))), (PROMPT[:3], (("b", 1.0),))]  # fmt: skip
    handles = [engine.submit(p, params, adapter=sel) for p, sel in requests]
    got = [h.result() for h in handles]
    assert got[1].cached_prompt_tokens > 0 and all(c.cached_prompt_tokens == 0 for c in got[:1] + got[2:])
    alone = Engine(model, Tokenizer.from_dir(model_dir), max_running=1, prefix_cache_bytes=0, adapters=adapters)
    assert [c.token_ids for c in got] == [alone.generate(p, params, adapter=sel).token_ids for p, sel in requests]
