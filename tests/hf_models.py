"""Tiny random Hugging Face models, one per supported family, each with its special features switched on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

VOCAB = 512
BASE = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)  # fmt: skip

# name -> (config class name, overrides). Sequences in tests are 24 tokens, longer than every sliding window here.
FAMILY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    # Llama 3.1/3.2: llama3 rope scaling, GQA, untied head.
    "llama3": ("LlamaConfig", dict(tie_word_embeddings=False, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32))),
    # SmolLM2 / Llama 3.2 1B style: tied embeddings, MQA (one kv head).
    "llama_tied_mqa": ("LlamaConfig", dict(tie_word_embeddings=True, num_key_value_heads=1)),
    # Llama with attention and MLP biases and an explicit head_dim.
    "llama_bias": ("LlamaConfig", dict(attention_bias=True, mlp_bias=True, head_dim=32)),
    "mistral": ("MistralConfig", dict(sliding_window=8, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, rope_parameters=dict(rope_type="default",
                                                                                  rope_theta=1000000.0))),
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=True)),
    "gemma2": ("Gemma2Config", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
                                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    "gemma3_text": ("Gemma3TextConfig", dict(
        head_dim=16, query_pre_attn_scalar=24, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        final_logit_softcapping=30.0,
        rope_parameters={"sliding_attention": dict(rope_type="default", rope_theta=10000.0),
                         "full_attention": dict(rope_type="linear", factor=8.0, rope_theta=1000000.0)})),
    "phi3": ("Phi3Config", dict(sliding_window=8, tie_word_embeddings=False,
                                rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                     partial_rotary_factor=0.5))),
    # Phi-3.5 / Phi-4-mini style LongRoPE: 24-token tests exceed the original 16 positions, so long factors apply.
    "phi3_longrope": ("Phi3Config", dict(
        max_position_embeddings=64, original_max_position_embeddings=16,
        rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0 + 0.1 * i for i in range(8)],
                             long_factor=[1.5 + 0.2 * i for i in range(8)]))),
}  # fmt: skip

ALL = sorted(FAMILY_CONFIGS)


def hf_config(name: str, **overrides: Any):
    """The transformers config object for a named tiny model."""
    cls_name, extra = FAMILY_CONFIGS[name]
    kwargs = {**BASE, **extra, **overrides}
    return getattr(transformers, cls_name)(**kwargs)


def make_hf_model(name: str, path: Path, seed: int = 0, **save_kwargs: Any):
    """Build a random tiny model with transformers, save it with `save_pretrained`, return it (fp32, eval, eager)."""
    torch.manual_seed(seed)
    cfg = hf_config(name)
    cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    # Randomise the norms too (they start at one/zero) so that a norm-weight bug cannot hide.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    model.save_pretrained(path, **save_kwargs)
    return model


def load_hf(path: Path, dtype: torch.dtype = torch.float32):
    """Load a saved folder with transformers (eager attention: the plainest reference)."""
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=dtype).eval()


def padded_batch(T: int = 24, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows: full, right-padded (5 pads), left-padded (7 pads)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, T), generator=g)
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, -5:] = 0
    mask[2, :7] = 0
    ids[mask == 0] = 0
    return ids, mask


def save_word_tokenizer(path: Path, vocab: int = VOCAB, chat_template: str | None = None) -> None:
    """A word-level tokenizer covering the tiny models' vocabulary: <pad>=0, <s>=1, </s>=2, then w3..w{vocab-1}."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    tok.save(str(path / "tokenizer.json"))
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    if chat_template:
        cfg["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
