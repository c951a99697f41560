"""Tiny random models with real tokenizer layouts and PEFT adapters, shared by the GGUF tests."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import peft
import torch
import transformers
from tokenizers import Regex, normalizers, pre_tokenizers

from hf_models import hf_config
from tokenizer_utils import _train_bpe, byte_level_bpe, sentencepiece_bpe, write_folder

# tokenizer.json regexes of real models (Llama 3, Qwen2), written out here independently of the exporter's table.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")  # fmt: skip
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")  # fmt: skip
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "chat_template": TEMPLATE}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TT = gguf.TokenType


def split_bpe(regex: str, nfc: bool = False):
    """A byte-level BPE with a Split(regex) + ByteLevel(use_regex=False) pre-tokenizer (Llama 3 / Qwen2 layout)."""
    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])  # fmt: skip
    tok = byte_level_bpe()
    trained = _train_bpe(pre, 700, None, pre_tokenizers.ByteLevel.alphabet())
    data = json.loads(tok.to_str())
    data["model"], data["pre_tokenizer"] = json.loads(trained.to_str())["model"], json.loads(pre.__getstate__())
    if nfc:
        data["normalizer"] = json.loads(normalizers.NFC().__getstate__())
    return type(tok).from_str(json.dumps(data))


def smollm_bpe():
    """SmolLM2's layout: single digits, then the GPT-2 byte-level regex."""
    pre = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])  # fmt: skip
    tok = byte_level_bpe()
    data = json.loads(tok.to_str())
    trained = _train_bpe(pre, 700, None, pre_tokenizers.ByteLevel.alphabet())
    data["model"], data["pre_tokenizer"] = json.loads(trained.to_str())["model"], json.loads(pre.__getstate__())
    return type(tok).from_str(json.dumps(data))


# case -> (tiny model config in hf_models, tokenizer factory, expected arch, tokenizer.ggml.model, tokenizer.ggml.pre)
CASES = {
    "llama3": ("llama3", lambda: split_bpe(LLAMA3_REGEX), "llama", "gpt2", "llama-bpe"),
    "llama_tied": ("llama_tied_mqa", smollm_bpe, "llama", "gpt2", "smollm"),
    "llama_bias": ("llama_bias", byte_level_bpe, "llama", "gpt2", "gpt-2"),
    "qwen2": ("qwen2", lambda: split_bpe(QWEN2_REGEX, nfc=True), "qwen2", "gpt2", "qwen2"),
    # Llama 2 / sentencepiece layout (Prepend normalizer); the Metaspace one is in e2e/test_gguf_llamacpp.py.
    "mistral": ("mistral", lambda: sentencepiece_bpe(legacy=True), "llama", "llama", "default"),
}


def build(root: Path, case: str, seed: int = 0) -> tuple[Path, Path]:
    """A tiny random model of `case` with its tokenizer, and a peft LoRA adapter on every projection (B non-zero)."""
    family, make_tok, *_ = CASES[case]
    tok = make_tok()
    # The SentencePiece-style tokenizer has no <pad>: naming one would add a token that tokenizer.json lacks.
    has_pad = tok.token_to_id("<pad>") is not None
    return save_with_adapter(root / case, root / f"{case}-lora", family, tok, PROJECTIONS, seed, has_pad)


def save_with_adapter(model_dir: Path, adapter_dir: Path, family: str, tok, targets: list[str], seed: int,  # noqa: ANN001
                      name_pad: bool, **overrides) -> tuple[Path, Path]:  # noqa: ANN003  # fmt: skip
    """A tiny random `family` model (hf_models' config with `overrides`; norms and biases randomised) saved to
    `model_dir` with the tokenizer `tok` and `SPECIALS` (less <pad> unless `name_pad`), and a peft LoRA adapter on
    `targets` (B non-zero) saved to `adapter_dir`."""
    torch.manual_seed(seed)
    # A vocabulary a bit larger than the tokenizer's, as real checkpoints pad it (checks the [PAD] filler tokens).
    cfg = hf_config(family, vocab_size=-(-tok.get_vocab_size() // 64) * 64 + 64, bos_token_id=None,
                    eos_token_id=None, pad_token_id=None, **overrides)  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(model_dir)
    write_folder(model_dir, tok, config={k: v for k, v in SPECIALS.items() if name_pad or k != "pad_token"})
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    lora.save_pretrained(adapter_dir)
    return model_dir, adapter_dir
