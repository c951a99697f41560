"""The public API: `nomoat.load(path) -> (model, tokenizer)`."""

from __future__ import annotations

import json

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

import nomoat

from hf_models import make_hf_model


def test_load_returns_model_and_tokenizer(tmp_path):
    hf = make_hf_model("llama_tied_mqa", tmp_path)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate("hello world how are you".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    model, tokenizer = nomoat.load(tmp_path, dtype="float32", device="cpu")
    assert tokenizer.eos_token_ids == [2] and tokenizer.bos_token_id == 1
    ids = torch.tensor([tokenizer.encode("hello world how are you")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)
    assert not model.training and model.dtype == torch.float32
