"""`n` choices over the API: seeded choices are reproducible and each equals a request of its own with seed+index
(the server's definition), while the engine prefills the shared prompt fewer times than once per choice."""

from __future__ import annotations

import torch
from fastapi.testclient import TestClient

from nomoat.generate.engine import Engine
from nomoat.models.checkpoint import load_model
from nomoat.serve.app import ServeSettings, create_app
from nomoat.tokenizer import Tokenizer
from structured_utils import make_structured_model


def test_n_choices_fork_one_prefill_and_equal_separate_requests(tmp_path):
    model_dir = make_structured_model(tmp_path / "tiny")
    engine = Engine(load_model(model_dir, dtype=torch.float32, device="cpu"), Tokenizer.from_dir(model_dir),
                    max_running=8, prefix_cache_bytes=0)  # fmt: skip
    app = create_app(engine, ServeSettings(model_name="tiny"))
    prompt = "several samples of one long prompt share its prefill " * 4
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 24, "temperature": 1.0, "seed": 21, "n": 4}
    with TestClient(app) as client:
        n_prompt = len(client.post("/tokenize", json={"prompt": prompt}).json()["tokens"])
        before = engine.prefill_tokens
        a = client.post("/v1/completions", json=body).json()
        forked = engine.prefill_tokens - before
        b = client.post("/v1/completions", json=body).json()
        alone = [client.post("/v1/completions", json={**body, "n": 1, "seed": 21 + i}).json() for i in range(4)]
    texts = [c["text"] for c in sorted(a["choices"], key=lambda c: c["index"])]
    assert texts == [c["text"] for c in sorted(b["choices"], key=lambda c: c["index"])]
    assert texts == [r["choices"][0]["text"] for r in alone]
    assert len(set(texts)) > 1
    assert a["usage"]["prompt_tokens"] == n_prompt
    assert n_prompt <= forked < 2 * n_prompt  # the prompt once (and the choices' last tokens), not four times
