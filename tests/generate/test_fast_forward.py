"""Tokens a grammar forces are taken without a decode step each, and `n` samples of one prompt share its prefill.

Fast-forward: a schema with long fixed keys gives the same greedy output with and without it (the byte-level test
tokenizer spells the keys the same way either way), in fewer engine steps, with every token streamed and counted.
Forking: n rows with one prompt prefill it once (counted in prompt tokens run through the model), and each gives what
the same request alone gives.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from nomoat.generate.constraints import Constraint, Grammars
from nomoat.generate.engine import Completion, Delta, Engine
from nomoat.generate.sampling import SamplingParams
from nomoat.models.checkpoint import load_model
from nomoat.tokenizer import Tokenizer
from structured_utils import make_random_adapter, make_structured_model

pytest.importorskip("llguidance")

SCHEMA = {
    "type": "object",
    "properties": {
        "temperature_reading_in_degrees_celsius": {"type": "integer", "minimum": 0, "maximum": 99},
        "is_the_measurement_station_operational": {"type": "boolean"},
        "name_of_the_weather_station_reporting": {"enum": ["north", "south"]},
    },
    "required": ["temperature_reading_in_degrees_celsius", "is_the_measurement_station_operational",
                 "name_of_the_weather_station_reporting"],
    "additionalProperties": False,
}  # fmt: skip


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast-forward")
    model_dir = make_structured_model(root / "model")
    make_random_adapter(model_dir, root / "ad", seed=5)
    model = load_model(model_dir, dtype=torch.float32, device="cpu")
    return Engine(model, Tokenizer.from_dir(model_dir), max_running=8, adapters={"ad": root / "ad"})


def _run(engine: Engine, handles: list) -> tuple[list[Completion], list[list[int]], int]:
    """Step the engine until every handle is done; the completions, the streamed tokens, and the steps taken."""
    done: dict[int, Completion] = {}
    streamed: list[list[int]] = [[] for _ in handles]
    steps = 0
    while len(done) < len(handles):
        assert engine.step(), "the engine ran out of work before the requests finished"
        steps += 1
        for i, h in enumerate(handles):
            while not h.events.empty():
                event = h.events.get_nowait()
                if isinstance(event, Delta):
                    streamed[i] += event.token_ids
                else:
                    done[i] = event
    return [done[i] for i in range(len(handles))], streamed, steps


@pytest.mark.parametrize("adapter", [(), (("ad", 1.0),)])
def test_forced_tokens_give_the_same_output_in_fewer_steps(engine, adapter):
    grammars = Grammars.of(engine.tokenizer, engine.model.config.vocab_size)
    prompts = ["a b", "weather report:", "x"]
    results = {}
    for ff in (False, True):
        engine.fast_forward = ff
        params = SamplingParams(temperature=0, max_new_tokens=200)
        constraint = Constraint("json_schema", SCHEMA)
        handles = [engine.submit(p, params, adapter=adapter, logits_hook=grammars.row(constraint)) for p in prompts]
        results[ff] = _run(engine, handles)
    engine.fast_forward = False
    (plain, _, plain_steps), (fast, fast_streamed, fast_steps) = results[False], results[True]
    for a, b, streamed in zip(plain, fast, fast_streamed):
        assert b.finish_reason == a.finish_reason == "stop"
        jsonschema.validate(json.loads(b.text), SCHEMA)
        assert b.text == a.text and b.token_ids == a.token_ids
        assert streamed == b.token_ids and b.completion_tokens == len(b.token_ids)
    longest = max(len(c.token_ids) for c in plain)
    assert plain_steps >= longest  # one step per token without fast-forward
    assert fast_steps < plain_steps // 2, (fast_steps, plain_steps)


def test_forced_tokens_respect_max_tokens(engine):
    grammars = Grammars.of(engine.tokenizer, engine.model.config.vocab_size)
    params = SamplingParams(temperature=0, max_new_tokens=7)
    engine.fast_forward = True
    try:
        (done,), (streamed,), steps = _run(engine, [engine.submit("a b", params, logits_hook=grammars.row(
            Constraint("json_schema", SCHEMA)))])  # fmt: skip
    finally:
        engine.fast_forward = False
    assert done.finish_reason == "length" and len(done.token_ids) == 7 == done.completion_tokens
    assert streamed == done.token_ids and '{"temperature_reading'.startswith(done.text) and len(done.text) >= 7
    assert steps == 1  # the first key is forced: the prefill's step takes all seven tokens


@pytest.mark.parametrize("adapter", [(), (("ad", 1.0),)])
def test_n_samples_prefill_their_prompt_once(engine, adapter):
    prompt = engine.tokenizer.encode("the n samples of one prompt share its keys and values " * 3)
    seeds = [11, 12, 13, 14]
    cache, engine.prefix_cache = engine.prefix_cache, None  # every prompt token counted: none restored
    try:
        before = engine.prefill_tokens
        handles = [engine.submit(prompt, SamplingParams(temperature=1.0, seed=s, max_new_tokens=12), adapter=adapter)
                   for s in seeds]  # fmt: skip
        forked, _, _ = _run(engine, handles)
        assert engine.prefill_tokens - before == len(prompt) + len(seeds) - 1  # the prompt once, then one token each
        assert [c.cached_prompt_tokens for c in forked] == [0] + [len(prompt) - 1] * 3
        again, _, _ = _run(engine, [engine.submit(prompt, SamplingParams(temperature=1.0, seed=s, max_new_tokens=12),
                                                  adapter=adapter) for s in seeds])  # fmt: skip
        alone = []
        for s in seeds:  # each request on its own, prefilled in full
            before = engine.prefill_tokens
            (c,), _, _ = _run(engine, [engine.submit(prompt, SamplingParams(temperature=1.0, seed=s, max_new_tokens=12),
                                                     adapter=adapter)])  # fmt: skip
            assert engine.prefill_tokens - before == len(prompt)
            alone.append(c)
    finally:
        engine.prefix_cache = cache
    assert [c.token_ids for c in forked] == [c.token_ids for c in again] == [c.token_ids for c in alone]
    assert len({tuple(c.token_ids) for c in forked}) > 1  # different seeds: different samples


def test_a_fork_follows_a_row_that_is_already_decoding(engine):
    prompt = engine.tokenizer.encode("a prompt that a later request repeats")
    first = engine.submit(prompt, SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True))
    engine.step()
    engine.step()  # the first row has decoded a token past its prompt
    before = engine.prefill_tokens
    second = engine.submit(prompt, SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True))
    (a, b), _, _ = _run(engine, [first, second])
    assert engine.prefill_tokens - before == 1 and b.cached_prompt_tokens == len(prompt) - 1
    assert a.token_ids == b.token_ids
