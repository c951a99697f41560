"""Constrained decoding in the engine: outputs follow their JSON schema (checked with `jsonschema`), regex (checked
with `re`) or grammar, row by row in batches that mix constrained and free rows and different adapters."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from nomoat.generate.constraints import Constraint, ConstraintError, Grammars, HookChain, LogitBias
from nomoat.generate.engine import Engine
from nomoat.generate.sampling import SamplingParams
from nomoat.models.checkpoint import load_model
from nomoat.tokenizer import Tokenizer
from structured_utils import SCHEMAS, make_random_adapter, make_structured_model

pytest.importorskip("llguidance")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("constraints")
    model_dir = make_structured_model(root / "model")
    make_random_adapter(model_dir, root / "ad", seed=3)
    model = load_model(model_dir, dtype=torch.float32, device="cpu")
    eng = Engine(model, Tokenizer.from_dir(model_dir), max_running=8, adapters={"ad": root / "ad"})
    return eng


def _params(seed: int, max_new: int = 160) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_new_tokens=max_new)


def test_schemas_regex_and_grammar_in_one_mixed_batch(engine):
    """Every row of batches mixing schemas, a regex, a grammar, free rows, base and adapter rows obeys its own."""
    grammars = Grammars.of(engine.tokenizer, engine.model.config.vocab_size)
    regex = r"[a-c]{2,4}-[0-9]{2}"  # (llguidance's \d is Unicode 16's digits, Python's re knows older ones)
    lark = 'start: "yes" | "no" " " NUM\nNUM: /[0-9]{1,3}/\n'
    kinds = [("person", Constraint("json_schema", SCHEMAS["person"])),
             ("points", Constraint("json_schema", SCHEMAS["points"])), ("regex", Constraint("regex", regex)),
             ("grammar", Constraint("grammar", lark)), ("free", None)]  # fmt: skip
    checked = {k: 0 for k, _ in kinds}
    finished = 0
    for wave in range(3):
        handles = []
        for i in range(8):
            kind, constraint = kinds[(wave * 8 + i) % len(kinds)]
            hook = grammars.row(constraint) if constraint else None
            adapter = (("ad", 1.0),) if i % 2 else ()
            handles.append((kind, engine.submit("a b", _params(wave * 8 + i), adapter=adapter, logits_hook=hook)))
        for kind, handle in handles:
            done = handle.result()
            if kind == "free" or done.finish_reason == "length":
                continue
            assert done.finish_reason == "stop"
            finished += 1
            checked[kind] += 1
            if kind in SCHEMAS:
                jsonschema.validate(json.loads(done.text), SCHEMAS[kind])
            elif kind == "regex":
                assert re.fullmatch(regex, done.text), done.text
            else:
                assert re.fullmatch(r"yes|no \d{1,3}", done.text), done.text
    assert all(checked[k] >= 2 for k in ("person", "points", "regex", "grammar")), checked


def test_length_inside_a_constraint(engine):
    """A row that runs out of tokens inside its JSON ends with "length" and a prefix of a valid output."""
    grammars = Grammars.of(engine.tokenizer, engine.model.config.vocab_size)
    done = engine.generate("a", _params(1, max_new=10), logits_hook=grammars.row(Constraint("json_schema",
                                                                                           SCHEMAS["person"])))
    assert done.finish_reason == "length" and done.text.startswith('{"name":')
    with pytest.raises(json.JSONDecodeError):
        json.loads(done.text)


def test_constraint_errors_and_cache(engine):
    grammars = Grammars.of(engine.tokenizer, engine.model.config.vocab_size)
    assert Grammars.of(engine.tokenizer, engine.model.config.vocab_size) is grammars
    with pytest.raises(ConstraintError):
        grammars.row(Constraint("regex", "(unclosed"))
    with pytest.raises(ConstraintError):
        grammars.row(Constraint("grammar", "start: missing_rule\n"))
    c = Constraint("json_schema", SCHEMAS["points"])
    assert grammars.grammar(c) is grammars.grammar(Constraint("json_schema", json.loads(json.dumps(SCHEMAS["points"]))))


def test_gbnf_grammar(engine):
    grammars = Grammars.of(engine.tokenizer, engine.model.config.vocab_size)
    gbnf = 'root ::= "x" [0-9] [0-9]?\n'
    for seed in range(4):
        done = engine.generate("a", _params(seed, 20), logits_hook=grammars.row(Constraint("grammar", gbnf)))
        assert re.fullmatch(r"x\d\d?", done.text), done.text


def test_logit_bias_bans_a_token_and_chains_with_a_grammar(engine):
    """-100 on the greedy token changes the greedy choice; chained before a regex mask the regex still holds."""
    free = engine.generate("a b", SamplingParams(temperature=0, max_new_tokens=1))
    banned = free.token_ids[0]
    vocab = engine.model.config.vocab_size
    again = engine.generate("a b", SamplingParams(temperature=0, max_new_tokens=1),
                            logits_hook=LogitBias({banned: -100.0}, vocab))  # fmt: skip
    assert again.token_ids[0] != banned
    grammars = Grammars.of(engine.tokenizer, vocab)
    digit_ids = [engine.tokenizer.token_to_id(d) for d in "0123456789"]
    hook = HookChain([LogitBias({t: -100.0 for t in digit_ids[:9]}, vocab), grammars.row(Constraint("regex", "[0-9]"))])
    done = engine.generate("a b", SamplingParams(temperature=0, max_new_tokens=5), logits_hook=hook)
    assert done.text == "9"
