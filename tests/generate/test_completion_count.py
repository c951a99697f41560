"""`completion_tokens` counts the tokens of the returned text, as OpenAI does: a stop token that ends it is not one."""

from __future__ import annotations

import nomoat
from nomoat.generate.engine import Engine
from nomoat.generate.sampling import SamplingParams


def test_completion_tokens_agree_with_token_ids_when_a_stop_token_ends_the_text():
    model, tok = nomoat.load("demo", device="cpu")
    engine = Engine(model, tok, max_running=2, max_seq_len=64, prefix_cache_bytes=0)
    try:
        free = engine.generate("What is 27 + 35?", SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True))
        assert free.completion_tokens == len(free.token_ids) == 6
        # Stop on the first greedy token not seen before it: the text ends after k tokens, and the stop token is
        # generated (k + 1 tokens decoded) but not part of the text.
        k = next(i for i in range(1, 6) if free.token_ids[i] not in free.token_ids[:i])
        params = SamplingParams(max_new_tokens=8, temperature=0.0, stop_token_ids=[free.token_ids[k]], ignore_eos=True)
        done = engine.generate("What is 27 + 35?", params)
        assert done.finish_reason == "stop"
        assert done.token_ids == free.token_ids[:k]
        assert done.completion_tokens == len(done.token_ids) == k
    finally:
        engine.stop()
