"""The generation engine against transformers and against itself: greedy parity with the cache, continuous
batching, seeded sampling, stop strings, streaming, cancellation, prefix caching, queue bounds, logprobs."""

from __future__ import annotations

import pytest
import torch

from nomoat.generate.engine import Completion, Delta, Engine, QueueFullError
from nomoat.generate.sampling import SamplingParams
from nomoat.models.checkpoint import load_model
from nomoat.tokenizer import Tokenizer

from hf_models import ALL, make_hf_model, save_word_tokenizer

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True)


def _setup(name, path):
    hf = make_hf_model(name, path)
    save_word_tokenizer(path)
    return hf, load_model(path, dtype=torch.float32, device="cpu"), Tokenizer.from_dir(path)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _setup("llama3", tmp_path_factory.mktemp("llama3"))


def _prompt(n, seed):
    return torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("name", [n for n in ALL if n != "phi3_longrope"])
def test_greedy_equals_transformers_with_cache(name, tmp_path):
    hf, model, tok = _setup(name, tmp_path)
    prompt = _prompt(9, 3)
    hf.generation_config.eos_token_id = None
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, pad_token_id=0)[0, 9:].tolist()
    out = Engine(model, tok, max_running=2).generate(prompt, SamplingParams(temperature=0, max_new_tokens=32,
                                                                            ignore_eos=True))
    assert out.token_ids == ref
    assert out.finish_reason == "length" and out.completion_tokens == 32 and out.prompt_tokens == 9


def _alone(model, tok, prompt, params=GREEDY):
    return Engine(model, tok, max_running=1, prefix_cache_bytes=0).generate(prompt, params)


def test_batch_of_different_lengths_equals_alone(llama):
    _, model, tok = llama
    prompts = [_prompt(n, i) for i, n in enumerate((5, 23, 11, 2))]
    engine = Engine(model, tok, max_running=4, prefix_cache_bytes=0)
    handles = [engine.submit(p, GREEDY) for p in prompts]
    results = [h.result() for h in handles]
    for p, r in zip(prompts, results):
        assert r.token_ids == _alone(model, tok, p).token_ids


def test_requests_admitted_together_prefill_in_one_forward(llama, monkeypatch):
    """Waiting requests are prefilled as right-padded rows of one forward, with the tokens transformers gives."""
    import nomoat.generate.engine as engine_mod

    hf, model, tok = llama
    calls = []
    real = engine_mod.prefill_rows
    monkeypatch.setattr(engine_mod, "prefill_rows", lambda m, c, r, ps: calls.append(len(ps)) or real(m, c, r, ps))
    prompts = [_prompt(n, 10 + i) for i, n in enumerate((7, 19, 3))]
    engine = Engine(model, tok, max_running=4, prefix_cache_bytes=0)
    handles = [engine.submit(p, GREEDY) for p in prompts]
    while engine.step():  # no background loop: all three are waiting when the first step admits them
        pass
    assert calls == [3]
    hf.generation_config.eos_token_id = None
    for p, h in zip(prompts, handles):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, pad_token_id=0)[0, len(p) :]
        assert h.result().token_ids == ref.tolist()


def test_requests_join_and_leave_midway(llama):
    _, model, tok = llama
    engine = Engine(model, tok, max_running=3, prefix_cache_bytes=0)
    a = engine.submit(_prompt(7, 10), SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True))
    b = engine.submit(_prompt(12, 11), GREEDY)
    for _ in range(4):
        engine.step()
    c = engine.submit(_prompt(4, 12), GREEDY)  # joins while a and b run
    for _ in range(3):
        engine.step()
    d = engine.submit(_prompt(9, 13), GREEDY)  # joins after a left (its row was refilled by a move)
    outs = [h.result() for h in (a, b, c, d)]
    for h, p, out in zip((a, b, c, d), (_prompt(7, 10), _prompt(12, 11), _prompt(4, 12), _prompt(9, 13)), outs):
        params = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True) if h is a else GREEDY
        assert out.token_ids == _alone(model, tok, p, params).token_ids


def test_seeded_sampling_reproducible_and_batch_independent(llama):
    _, model, tok = llama
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_new_tokens=20, ignore_eos=True)
    first = _alone(model, tok, _prompt(6, 1), params).token_ids
    assert _alone(model, tok, _prompt(6, 1), params).token_ids == first
    engine = Engine(model, tok, max_running=3)
    others = [engine.submit(_prompt(8, 2), SamplingParams(temperature=1.2, max_new_tokens=20, seed=7)),
              engine.submit(_prompt(6, 1), params),
              engine.submit(_prompt(3, 3), GREEDY)]
    assert others[1].result().token_ids == first
    unseeded = SamplingParams(temperature=1.0, max_new_tokens=20, ignore_eos=True)
    runs = [_alone(model, tok, _prompt(6, 1), unseeded).token_ids for _ in range(2)]
    assert runs[0] != runs[1]


def test_stop_strings_straddling_tokens_and_streaming(llama):
    _, model, tok = llama
    full = _alone(model, tok, _prompt(5, 4))
    words = full.text.split(" ")
    stop = words[3][1:] + " " + words[4][:2]  # straddles the 4th and 5th tokens
    params = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True, stop=[stop])
    engine = Engine(model, tok, max_running=1)
    deltas, final = [], None
    for event in engine.stream(_prompt(5, 4), params):
        if isinstance(event, Delta):
            deltas.append(event.text)
        else:
            final = event
    assert final.finish_reason == "stop"
    # Emitted text is never taken back, so this also shows no part of the stop string was ever streamed.
    assert "".join(deltas) == final.text == full.text[: full.text.index(stop)]


def test_streamed_text_equals_final_text_and_decode(llama):
    _, model, tok = llama
    engine = Engine(model, tok)
    events = list(engine.stream(_prompt(5, 5), GREEDY))
    final = events[-1]
    assert isinstance(final, Completion)
    assert "".join(e.text for e in events[:-1]) == final.text == tok.decode(final.token_ids, skip_special_tokens=True)
    assert final.time_to_first_token_s > 0 and final.decode_tokens_per_s > 0


def test_eos_stops_and_is_not_in_the_text(llama):
    _, model, tok = llama
    out = _alone(model, tok, _prompt(5, 6))
    eos = out.token_ids[5]  # pretend the sixth generated token is an end token
    stopped = _alone(model, tok, _prompt(5, 6), SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True,
                                                                stop_token_ids=[eos]))
    assert stopped.finish_reason == "stop" and stopped.token_ids == out.token_ids[:5]
    assert stopped.completion_tokens == 5  # the tokens of the text, as OpenAI counts: not the stop token


def test_cancellation_frees_the_slot(llama):
    _, model, tok = llama
    engine = Engine(model, tok, max_running=1)
    a = engine.submit(_prompt(5, 7), SamplingParams(temperature=0, max_new_tokens=500, ignore_eos=True))
    b = engine.submit(_prompt(5, 8), GREEDY)
    engine.step()
    engine.step()
    assert engine.num_running == 1 and engine.num_waiting == 1
    a.cancel()
    assert engine.num_running == 0
    # The first step prefilled (one token) and decoded (a second), the second step decoded a third.
    assert a.result().finish_reason == "cancelled" and a.result().completion_tokens == 3
    assert b.result().token_ids == _alone(model, tok, _prompt(5, 8)).token_ids


def test_submit_and_cancel_never_wait_for_a_step(llama):
    """A server submits and cancels from its event loop: neither may wait for a running step to end."""
    import threading

    _, model, tok = llama
    engine = Engine(model, tok, max_running=2)
    a = engine.submit(_prompt(5, 7), SamplingParams(temperature=0, max_new_tokens=500, ignore_eos=True))
    engine.step()
    calls: dict = {}

    def client():
        calls["b"] = engine.submit(_prompt(5, 8), GREEDY)
        a.cancel()
        calls["done"] = True

    with engine.lock:  # a step is running
        t = threading.Thread(target=client, daemon=True)
        t.start()
        t.join(timeout=60)
        assert calls.get("done"), "submit or cancel waited for the step"
        assert engine.num_waiting == 1 and engine.num_running == 1  # marked, not yet freed
    engine.step()  # the cancelled row is freed before the step; b is admitted in its place
    assert a.result().finish_reason == "cancelled"
    assert engine.num_running == 1
    while engine.step():
        pass
    assert calls["b"].result().token_ids == _alone(model, tok, _prompt(5, 8)).token_ids


def test_prefix_cache_on_equals_off(llama):
    _, model, tok = llama
    system = _prompt(40, 20)  # a long shared "system prompt"
    prompts = [system + _prompt(n, 30 + n) for n in (3, 7, 12)]
    cached = Engine(model, tok, max_running=2, prefix_block=8)
    first = cached.generate(prompts[0], GREEDY)
    assert first.cached_prompt_tokens == 0
    for p in prompts[1:]:
        out = cached.generate(p, GREEDY)
        assert out.cached_prompt_tokens == 40
        assert out.token_ids == _alone(model, tok, p).token_ids
    # Concurrent requests sharing the prefix, too.
    handles = [cached.submit(p, GREEDY) for p in prompts]
    for h, p in zip(handles, prompts):
        assert h.result().token_ids == _alone(model, tok, p).token_ids


def test_queue_bound_and_bad_prompts(llama):
    _, model, tok = llama
    engine = Engine(model, tok, max_running=1, max_queue=2, max_seq_len=64)
    engine.submit(_prompt(3, 1), GREEDY)
    engine.submit(_prompt(3, 2), GREEDY)
    with pytest.raises(QueueFullError):
        engine.submit(_prompt(3, 3), GREEDY)
    with pytest.raises(ValueError, match="at most 63"):
        engine.submit(_prompt(64, 3), GREEDY)
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], GREEDY)


def test_length_limit_of_the_cache_row(llama):
    _, model, tok = llama
    out = Engine(model, tok, max_running=1, max_seq_len=20).generate(_prompt(15, 1), GREEDY)
    assert out.finish_reason == "length" and out.prompt_tokens + out.completion_tokens == 20


def test_logprobs_are_the_models(llama):
    hf, model, tok = llama
    prompt = _prompt(6, 9)
    params = SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True, logprobs=True, top_logprobs=3)
    out = _alone(model, tok, prompt, params)
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0, -1].float(), -1)
    first = out.logprobs[0]
    assert first.token_id == out.token_ids[0] == int(ref.argmax())
    assert first.logprob == pytest.approx(float(ref.max()), abs=1e-5)
    assert [t for t, _ in first.top] == ref.topk(3).indices.tolist()


def test_background_loop(llama):
    _, model, tok = llama
    engine = Engine(model, tok, max_running=2)
    engine.start()
    try:
        handles = [engine.submit(_prompt(4, i), GREEDY) for i in range(3)]
        outs = [h.result() for h in handles]
    finally:
        engine.stop()
    for i, out in enumerate(outs):
        assert out.token_ids == _alone(model, tok, _prompt(4, i)).token_ids


def test_a_failing_step_ends_requests_with_error_and_the_loop_goes_on(llama):
    """A step that raises (e.g. out of memory) ends the requests in flight with finish_reason "error" instead of
    leaving their clients waiting on a dead thread; later requests are served normally."""
    _, model, tok = llama
    engine = Engine(model, tok, max_running=2, prefix_cache_bytes=0)
    calls = {"n": 0}
    forward = engine._forward

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated failure")
        return forward(*args, **kwargs)

    engine._forward = flaky
    failed = [engine.submit(_prompt(4, i), GREEDY) for i in range(3)]  # all queued before the loop's first step
    engine.start()
    try:
        outs = [h.result() for h in failed]
        assert {o.finish_reason for o in outs} == {"error"}
        assert engine.num_running == 0 and engine.num_waiting == 0
        again = engine.submit(_prompt(4, 0), GREEDY).result()
    finally:
        engine.stop()
    assert again.finish_reason == "length" and again.token_ids == _alone(model, tok, _prompt(4, 0)).token_ids


def test_compiled_decode_equals_eager(llama):
    _, model, tok = llama
    compiled = Engine(model, tok, max_running=2, compile=True)
    prompts = [_prompt(5, 40), _prompt(9, 41)]
    handles = [compiled.submit(p, GREEDY) for p in prompts]
    for h, p in zip(handles, prompts):
        assert h.result().token_ids == _alone(model, tok, p).token_ids


def test_repetition_penalty_in_a_changing_batch_equals_transformers(llama):
    """Penalised greedy rows read their own history (prompt and output) while rows without penalties join, leave
    and move theirs: each request equals transformers' `generate` with the same repetition penalty."""
    hf, model, tok = llama
    hf.generation_config.eos_token_id = None

    def ref(prompt, n, penalty):
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                          repetition_penalty=penalty)  # fmt: skip
        return out[0, len(prompt) :].tolist()

    engine = Engine(model, tok, max_running=3, prefix_cache_bytes=0)
    short = SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True)
    pen = SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True, repetition_penalty=1.8)
    a = engine.submit(_prompt(6, 20), short)  # leaves early: the penalised row behind it moves into its row
    b = engine.submit(_prompt(11, 21), pen)
    for _ in range(7):
        engine.step()
    assert [r.handle for r in engine.running] == [b]  # a left; b moved into row 0
    c = engine.submit(_prompt(8, 22), GREEDY)  # joins mid-way without penalties, into the row b left
    assert a.result().token_ids == ref(_prompt(6, 20), 5, 1.0)
    penalised = b.result().token_ids
    assert penalised == ref(_prompt(11, 21), 20, 1.8)
    assert penalised != ref(_prompt(11, 21), 20, 1.0)  # the penalty changes this output
    assert c.result().token_ids == ref(_prompt(8, 22), 24, 1.0)


def test_per_row_logits_hooks(llama):
    """Each row's logits pass through its own hook before sampling: a hook that allows one token per step forces
    that sequence, an in-place bias hook shifts the choice, rows without a hook decode as alone; 12 rows (more than
    8) in one batch."""
    _, model, tok = llama
    forced = [7, 300, 7, 41, 99, 12]
    seen: list[tuple[int, ...]] = []

    def only(step_tokens: list[int]):
        state = {"i": 0}

        def hook(logits: torch.Tensor) -> torch.Tensor:
            seen.append(tuple(logits.shape))
            masked = torch.full_like(logits, float("-inf"))
            masked[step_tokens[state["i"]]] = 0.0
            state["i"] += 1
            return masked

        return hook

    def ban_argmax(logits: torch.Tensor) -> None:
        logits[logits.argmax()] = float("-inf")  # in place: the second most likely token wins

    params = SamplingParams(temperature=0, max_new_tokens=len(forced), ignore_eos=True)
    prompts = [_prompt(4 + i, 40 + i) for i in range(12)]
    engine = Engine(model, tok, max_running=12, prefix_cache_bytes=0)
    hooks = [only(forced), ban_argmax] + [None] * 10
    handles = [engine.submit(p, params, logits_hook=h) for p, h in zip(prompts, hooks)]
    results = [h.result().token_ids for h in handles]
    assert results[0] == forced
    assert set(seen) == {(model.config.vocab_size,)}
    alone = _alone(model, tok, prompts[1], params).token_ids
    assert results[1][0] != alone[0]
    logits = model(torch.tensor([prompts[1]]))[0, -1]
    assert results[1][0] == int(logits.topk(2).indices[1])  # the runner-up of the unhooked logits
    for p, r in zip(prompts[2:], results[2:]):
        assert r == _alone(model, tok, p, params).token_ids


def test_rows_chosen_from_memory(llama, monkeypatch):
    """max_running=None sizes the batch from free memory (the server's default); the rows all decode together."""
    from nomoat.models import kv_cache

    _, model, tok = llama
    row = kv_cache.bytes_per_row(model.config, 64, model.dtype)
    monkeypatch.setattr(kv_cache, "_available_cpu_bytes", lambda: 4 * 12 * row)  # a quarter holds 12 rows
    engine = Engine(model, tok, max_running=None, max_seq_len=64, prefix_cache_bytes=0)
    assert engine.max_running == 12 and engine.cache.max_batch == 12
    params = SamplingParams(temperature=0, max_new_tokens=4)
    handles = [engine.submit(_prompt(5, seed), params) for seed in range(12)]
    engine.step()  # admits every request at once
    assert len(engine.running) == 12
    solo = [Engine(model, tok, max_running=1, prefix_cache_bytes=0).generate(_prompt(5, s), params) for s in (0, 11)]
    assert [handles[0].result().token_ids, handles[11].result().token_ids] == [c.token_ids for c in solo]
