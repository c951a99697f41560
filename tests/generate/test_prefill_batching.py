"""Requests admitted together are prefilled together, those that continue from a cached prompt prefix included."""

from __future__ import annotations

import pytest
import torch

from nomoat.generate.engine import Engine
from nomoat.generate.sampling import SamplingParams
from nomoat.models.checkpoint import load_model
from nomoat.tokenizer import Tokenizer

from hf_models import make_hf_model, save_word_tokenizer

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama3")
    make_hf_model("llama3", path)
    save_word_tokenizer(path)
    return load_model(path, dtype=torch.float32, device="cpu"), Tokenizer.from_dir(path)


def _prompt(n, seed):
    return torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_cached_prefix_requests_share_one_forward(llama, monkeypatch):
    """Requests whose prompts start with cached prefixes (of different lengths), admitted with a fresh one, run in
    one prefill forward from their own start positions, and generate what each generates alone."""
    import nomoat.generate.engine as engine_mod

    model, tok = llama
    engine = Engine(model, tok, max_running=4, prefix_block=8)
    warm = [_prompt(n, 20 + i) for i, n in enumerate((17, 26, 9))]
    for p in warm:
        engine.generate(p, GREEDY)
    calls = []
    real = engine_mod.prefill_rows

    def spy(m, c, r, ps, starts=None):  # noqa: ANN001, ANN202
        calls.append((len(ps), None if starts is None else list(starts)))
        return real(m, c, r, ps, starts)

    monkeypatch.setattr(engine_mod, "prefill_rows", spy)
    prompts = [warm[0] + [7, 8], warm[1][:20], warm[2] + [5], _prompt(6, 30)]
    handles = [engine.submit(p, GREEDY) for p in prompts]
    while engine.step():
        pass
    assert calls == [(4, [16, 16, 8, 0])]
    results = [h.result() for h in handles]
    assert [r.cached_prompt_tokens for r in results] == [16, 16, 8, 0]
    for p, r in zip(prompts, results):
        alone = Engine(model, tok, max_running=1, prefix_cache_bytes=0).generate(p, GREEDY)
        assert r.token_ids == alone.token_ids


def test_chunks_count_the_tokens_left_after_cached_prefixes(llama, monkeypatch):
    """A chunk's size is what its rows still have to run: long prompts served mostly from the cache fit one chunk."""
    import nomoat.generate.engine as engine_mod

    model, tok = llama
    engine = Engine(model, tok, max_running=4, prefix_block=8)
    warm = [_prompt(40, 40 + i) for i in range(3)]
    for p in warm:
        engine.generate(p, GREEDY)
    monkeypatch.setattr(engine_mod, "PREFILL_CHUNK_TOKENS", 40)  # 3 x 40 prompt tokens, 3 x 8 left to run
    calls = []
    real = engine_mod.prefill_rows
    monkeypatch.setattr(engine_mod, "prefill_rows",
                        lambda m, c, r, ps, starts=None: calls.append(len(ps)) or real(m, c, r, ps, starts))
    handles = [engine.submit(p, GREEDY) for p in warm]
    while engine.step():
        pass
    assert calls == [3]
    assert all(h.result().cached_prompt_tokens == 32 for h in handles)
