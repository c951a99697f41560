"""Exported GGUF files run in llama.cpp (through llama-cpp-python) and give nomoat's logits and tokens.

llama-cpp-python is a development extra that compiles llama.cpp (about 9 minutes on 2 cores), so CI without it
skips this module; everything else about the files is checked in test_gguf.py.

Measured (llama-cpp-python 0.3.36, these tiny models, logits up to about 1 in size), max |llama.cpp - nomoat| over
all positions and the vocabulary: 2-5e-7 for f32 files, 3-7e-4 for f16 files, 2-3e-7 for a base f32 file with the GGUF
LoRA applied (`lora_path`) against nomoat's merged model. The bounds leave a margin: f32 1e-5 (float32 summation
order), f16 5e-3 (weights rounded to 11 significant bits).
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import transformers

from gguf_cases import CASES, SPECIALS, build
from nomoat.export.gguf import export_gguf
from nomoat.export.gguf_lora import export_gguf_lora
from nomoat.lora.apply import merge_adapters
from nomoat.models.checkpoint import load_model
from nomoat.tokenizer import Tokenizer

from hf_models import hf_config
from tokenizer_utils import CORPUS, TEXTS, sentencepiece_bpe, write_folder

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python (a development extra that compiles llama.cpp) is not installed"
)

BOUNDS = {"f32": 1e-5, "f16": 5e-3}
GGML_TYPE_F32 = 0  # the KV cache in f32 too, so that f32 files compare at f32 precision


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamacpp")
    return {case: build(root, case, seed=3) for case in CASES}


def llamacpp_logits(path, ids: list[int], lora=None) -> np.ndarray:
    f32_cache = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32}
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, n_threads=2, verbose=False,
                          lora_path=str(lora) if lora else None, **f32_cache)  # fmt: skip
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def nomoat_logits(model_dir, adapters, ids: list[int]) -> np.ndarray:
    model = load_model(model_dir, dtype=torch.float32, device="cpu")
    merge_adapters(model, adapters)
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].numpy()


def prompt(model_dir, n: int) -> list[int]:
    """`n` token ids of real text (no special tokens), so that every id is one the tokenizer makes."""
    return Tokenizer.from_dir(model_dir).encode(" ".join(CORPUS), add_special_tokens=False)[:n]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_llamacpp_logits_equal_nomoat(models, tmp_path, case, outtype):
    model_dir, adapter_dir = models[case]
    # Mistral's sliding window (8 here) is not applied by llama.cpp: compare within it.
    ids = prompt(model_dir, 8 if case == "mistral" else 24)
    adapters = [(adapter_dir, 1.0)]
    with pytest.warns(UserWarning) if case == "mistral" else contextlib.nullcontext():
        out = export_gguf(model_dir, adapters, tmp_path / "m.gguf", outtype=outtype)
    got = llamacpp_logits(out, ids)
    want = nomoat_logits(model_dir, adapters, ids)
    err = float(np.abs(got - want).max())
    print(f"{case} {outtype}: max |llama.cpp - nomoat| = {err:.3g} (logit scale {np.abs(want).max():.3g})")
    assert err < BOUNDS[outtype], err


@pytest.mark.parametrize("case", ["llama3", "qwen2", "llama_bias"])
def test_llamacpp_lora_adapter_equals_merged(models, tmp_path, case):
    model_dir, adapter_dir = models[case]
    ids = prompt(model_dir, 24)
    base = export_gguf(model_dir, [], tmp_path / "base.gguf", outtype="f32")
    lora = export_gguf_lora(model_dir, adapter_dir, tmp_path / "lora.gguf", outtype="f32")
    got = llamacpp_logits(base, ids, lora=lora)
    want = nomoat_logits(model_dir, [(adapter_dir, 1.0)], ids)
    without = nomoat_logits(model_dir, [], ids)
    err = float(np.abs(got - want).max())
    print(f"{case} LoRA: max |llama.cpp base+lora - nomoat merged| = {err:.3g}; "
          f"the adapter moves logits by {np.abs(want - without).max():.3g}")  # fmt: skip
    assert np.abs(want - without).max() > 100 * BOUNDS["f32"]  # the adapter matters, so the check means something
    assert err < BOUNDS["f32"], err


@pytest.mark.parametrize("case", list(CASES))
def test_llamacpp_tokenizes_like_tokenizer_json(models, tmp_path, case):
    model_dir, _ = models[case]
    with pytest.warns(UserWarning) if case == "mistral" else contextlib.nullcontext():
        out = export_gguf(model_dir, [], tmp_path / "t.gguf", outtype="f16")
    tok = Tokenizer.from_dir(model_dir)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, vocab_only=True, verbose=False)
    try:
        for text in [t for t in TEXTS if t] + CORPUS:
            # special=True: like tokenizers, llama.cpp then matches added tokens written in the text.
            got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            assert got == tok.encode(text, add_special_tokens=False), text
        assert llm.tokenize(b"Hello", add_bos=True, special=False)[0] == tok.bos_token_id
    finally:
        llm.close()


def test_llamacpp_metaspace_tokenizer_differs_only_at_leading_spaces(tmp_path):
    """A known llama.cpp limitation, pinned down: with a `Metaspace(prepend_scheme="first")` tokenizer (Mistral v0.3's
    tokenizer.json layout) llama.cpp always prepends a space, also to text that starts with whitespace and to text
    right after a special token, where tokenizers does not. Every other text tokenizes the same."""

    tok = sentencepiece_bpe(legacy=False)
    folder = tmp_path / "metaspace"
    transformers.AutoModelForCausalLM.from_config(hf_config("llama3", vocab_size=768)).save_pretrained(folder)
    write_folder(folder, tok, config={k: v for k, v in SPECIALS.items() if k != "pad_token"})
    out = export_gguf(folder, [], tmp_path / "m.gguf", outtype="f16")
    nomoat_tok = Tokenizer.from_dir(folder)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, vocab_only=True, verbose=False)
    space = tok.token_to_id("\u2581")
    try:
        for text in [t for t in TEXTS if t] + CORPUS:
            got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            want = nomoat_tok.encode(text, add_special_tokens=False)
            if text[0].isspace():
                assert got[0] == space and got[1:] == want, text  # one extra leading "▁"
            elif not text.startswith("<s>"):
                assert got == want, text
    finally:
        llm.close()
