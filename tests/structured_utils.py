"""A tiny random chat model whose byte-level tokenizer can spell any text (JSON, tool calls), with Qwen 2.5's
chat template (tools included): the model for constrained decoding and tool-calling tests."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from hf_models import hf_config
from tokenizer_utils import byte_level_bpe, read_template, write_folder
from train_utils import random_adapter

VOCAB = 768  # the byte-level tokenizer has 706 tokens; the embedding is padded past them, as real models' are


def make_structured_model(path: Path, seed: int = 0) -> Path:
    """Save a tiny llama-shaped model (random weights) with a byte-level BPE tokenizer and Qwen 2.5's template."""
    torch.manual_seed(seed)
    cfg = hf_config("llama_tied_mqa", vocab_size=VOCAB, max_position_embeddings=2048, bos_token_id=701,
                    eos_token_id=705, pad_token_id=703)  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    model.eval().save_pretrained(path)
    tok = byte_level_bpe()
    assert tok.token_to_id("<|im_end|>") == 705 and tok.get_vocab_size() <= VOCAB
    write_folder(path, tok, config={"eos_token": "<|im_end|>", "pad_token": "<pad>", "bos_token": None,
                                    "chat_template": read_template("qwen2_5")})  # fmt: skip
    return path


def make_random_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    """A random PEFT adapter over `model_dir` (B != 0, so it changes the answers)."""
    return random_adapter(model_dir, out, seed)


# Schemas a random model can finish: bounded strings, enums, bounded numbers, short arrays, nested objects.
SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "role": {"enum": ["admin", "user", "guest"]},
            "score": {"type": "number", "minimum": -1, "maximum": 1},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
            "address": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                                                         "ok": {"type": "boolean"}},
                        "required": ["zip", "ok"], "additionalProperties": False},
        },
        "required": ["name", "age", "role", "score", "tags", "address"],
        "additionalProperties": False,
    },
    "points": {
        "type": "object",
        "properties": {"points": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "properties": {"x": {"type": "integer", "minimum": -5, "maximum": 5},
                                             "y": {"type": "integer", "minimum": -5, "maximum": 5}},
            "required": ["x", "y"], "additionalProperties": False}}},
        "required": ["points"],
        "additionalProperties": False,
    },
}  # fmt: skip
