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
import ctypes
from unittest import mock

import numpy as np
import pytest
import torch
import transformers

from gguf_cases import CASES, PROJECTIONS, QWEN2_REGEX, SPECIALS, build, save_with_adapter, split_bpe
from nomoat.export.gguf import export_gguf
from nomoat.export.gguf_lora import export_gguf_lora
from nomoat.lora.apply import merge_adapters
from nomoat.models import transformer
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


NOMOAT_ACT = transformer._act


def nomoat_logits(model_dir, adapters, ids: list[int], ggml_gelu: bool = False) -> np.ndarray:
    model = load_model(model_dir, dtype=torch.float32, device="cpu")
    merge_adapters(model, adapters)
    patch = mock.patch.object(transformer, "_act", ggml_cpu_act) if ggml_gelu else contextlib.nullcontext()
    with torch.no_grad(), patch:
        return model(torch.tensor([ids]))[0].numpy()


def ggml_cpu_act(name: str, x: torch.Tensor) -> torch.Tensor:
    """The tanh GELU as ggml's CPU backend computes it, other activations as nomoat does.

    ggml-cpu/vec.h, `ggml_vec_gelu_f32` and `ggml_vec_geglu_f32` under `GGML_GELU_FP16` (defined by default): x is
    rounded to f16 and indexes `ggml_table_gelu_f16`, the tanh GELU of every f16 value stored as f16; 0 at or below
    -10, x at or above 10.
    """
    if name != "gelu_pytorch_tanh":
        return NOMOAT_ACT(name, x)
    table = torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()
    return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, table)).to(x.dtype)


def assert_matches(case: str, got: np.ndarray, model_dir, adapters, ids: list[int]) -> None:
    """llama.cpp's logits equal nomoat's within 1e-4; for Gemma, nomoat's with ggml's own GELU (`ggml_cpu_act`).

    Gemma's GELU is where ggml approximates: its f16 table moves the logits of these models by 2-3e-4 from the exact
    tanh GELU, and with ggml's approximation computed in nomoat they agree within 1e-5. So Gemma gets 1e-4 against the
    approximation and 1e-3 against the exact GELU.
    """
    want = nomoat_logits(model_dir, adapters, ids)
    err = float(np.abs(got - want).max())
    print(f"{case}: max |llama.cpp - nomoat| = {err:.3g} (logit scale {np.abs(want).max():.3g})")
    if case.startswith("gemma"):
        ggml = nomoat_logits(model_dir, adapters, ids, ggml_gelu=True)
        err_ggml = float(np.abs(got - ggml).max())
        print(f"{case}: with ggml's GELU, max |llama.cpp - nomoat| = {err_ggml:.3g}")
        assert err_ggml < 1e-4, err_ggml
        assert np.abs(ggml - want).max() > 1e-5  # the approximation matters here, so the two checks differ
        assert err < 1e-3, err
    else:
        assert err < 1e-4, err


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


# ---- every family nomoat loads, and the metadata llama.cpp expects -------------------------------------------------

# case -> (hf_models config, overrides, tokenizer factory, peft target modules, positions compared). llama.cpp scales
# Gemma's queries by head_dim (so query_pre_attn_scalar = head_dim here); it runs Phi-3 without its sliding window, so
# the Phi-3 case compares the positions inside its window (the export leaves the window out and warns in Python).
FAMILY_CASES = {
    "qwen3": ("qwen3", {}, lambda: split_bpe(QWEN2_REGEX, nfc=True), PROJECTIONS, 24),
    "gemma2": ("gemma2", {"query_pre_attn_scalar": 16}, lambda: sentencepiece_bpe(legacy=True), PROJECTIONS, 24),
    "gemma3": ("gemma3_text", {"query_pre_attn_scalar": 16, "final_logit_softcapping": None},
               lambda: sentencepiece_bpe(legacy=True), PROJECTIONS, 8),
    "phi3": ("phi3", {"sliding_window": 24}, lambda: phi3_tokenizer(),
             ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], 24),
}  # fmt: skip


def phi3_tokenizer():
    """Phi-3's layout: SentencePiece-style BPE with Phi-3's chat tokens (llama.cpp looks some of them up by text)."""
    tok = sentencepiece_bpe(legacy=True)
    tok.add_special_tokens(["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"])
    return tok


WARN, ERROR, CONT = 3, 4, 5  # ggml_log_level (NONE, DEBUG, INFO, WARN, ERROR, CONT); CONT continues the line before


def build_family(root, case: str, seed: int = 3):
    """A tiny random model of a family with its tokenizer, and a peft LoRA adapter (B non-zero) on it."""
    family, overrides, make_tok, targets, _ = FAMILY_CASES[case]
    return save_with_adapter(root / case, root / f"{case}-lora", family, make_tok(), targets, seed, False,
                             max_position_embeddings=256, **overrides)  # fmt: skip


@contextlib.contextmanager
def llamacpp_log():
    """llama.cpp's log lines as (level, text) while the block runs."""
    lines: list[tuple[int, str]] = []

    @llama_cpp.llama_log_callback
    def record(level, text, user_data):  # noqa: ANN001, ANN202
        level = lines[-1][0] if level == CONT and lines else level
        lines.append((level, text.decode("utf-8", "replace")))

    llama_cpp.llama_log_set(record, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        from llama_cpp import _logger

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {case: build_family(root, case) for case in FAMILY_CASES}


@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_every_family_loads_without_warning_and_matches(family_models, tmp_path, case):
    model_dir, adapter_dir = family_models[case]
    n = FAMILY_CASES[case][4]
    ids = prompt(model_dir, n)
    adapters = [(adapter_dir, 1.0)]
    with pytest.warns(UserWarning, match="sliding window") if case == "phi3" else contextlib.nullcontext():
        out = export_gguf(model_dir, adapters, tmp_path / "m.gguf", outtype="f32")
    # The context as trained (n_ctx=0) and a SWA cache of the window's size: llama.cpp warns about anything else.
    with llamacpp_log() as log:
        llm = llama_cpp.Llama(model_path=str(out), n_ctx=0, n_batch=64, logits_all=True, n_threads=2, verbose=True,
                              type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, swa_full=False)  # fmt: skip
    try:
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()
    warnings_ = [text.strip() for level, text in log if level in (WARN, ERROR) and text.strip()]
    assert not warnings_, warnings_
    assert_matches(f"{case} f32", got, model_dir, adapters, ids)


@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_every_family_gguf_lora_equals_merged(family_models, tmp_path, case):
    model_dir, adapter_dir = family_models[case]
    ids = prompt(model_dir, FAMILY_CASES[case][4])
    with pytest.warns(UserWarning, match="sliding window") if case == "phi3" else contextlib.nullcontext():
        base = export_gguf(model_dir, [], tmp_path / "base.gguf", outtype="f32")
    lora = export_gguf_lora(model_dir, adapter_dir, tmp_path / "lora.gguf", outtype="f32")
    got = llamacpp_logits(base, ids, lora=lora)
    want = nomoat_logits(model_dir, [(adapter_dir, 1.0)], ids)
    assert np.abs(want - nomoat_logits(model_dir, [], ids)).max() > 100 * BOUNDS["f32"]  # the adapter matters
    assert_matches(f"{case} base+LoRA vs merged", got, model_dir, [(adapter_dir, 1.0)], ids)


def test_metadata_llamacpp_expects(tmp_path):
    """general.* keys, SmolLM2's pre-tokenizer and its special tokens typed CONTROL (token 0 is also `unk`)."""
    from gguf import GGUFReader, TokenType

    from nomoat.util.hub import demo_dir

    out = export_gguf("demo", [], tmp_path / "demo.gguf", outtype="f32")
    meta = {k: f.contents() for k, f in GGUFReader(out).fields.items() if not k.startswith("GGUF.")}
    assert meta["general.architecture"] == "llama" and meta["general.name"] == "demo"
    assert meta["general.basename"] == "demo" and meta["general.size_label"] == "5.1M"
    assert meta["general.file_type"] == 0 and meta["general.quantization_version"] == 2
    tok = Tokenizer.from_dir(demo_dir())
    types = meta["tokenizer.ggml.token_type"]
    for token_id in tok.backend.get_added_tokens_decoder():
        assert types[token_id] == TokenType.CONTROL, token_id
    with llamacpp_log() as log:
        llm = llama_cpp.Llama(model_path=str(out), n_ctx=0, n_threads=2, verbose=True)
        llm.close()
    assert not [t for level, t in log if level in (WARN, ERROR) and t.strip()]
