"""Random checkpoints of realistic proportions written straight with safetensors (no transformers model built)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_random_llama(path: Path, hidden: int, inter: int, layers: int, vocab: int, heads: int = 8, kv: int = 2,
                       tied: bool = True, dtype: torch.dtype = torch.bfloat16) -> None:  # fmt: skip
    """A random Llama checkpoint written straight with safetensors (as the Hub ships them: bf16)."""
    path.mkdir(parents=True, exist_ok=True)
    hd = hidden // heads
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=hidden, intermediate_size=inter,
               num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
               max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tied,
               torch_dtype=str(dtype).removeprefix("torch."), hidden_act="silu", head_dim=hd)  # fmt: skip
    (path / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.02).to(dtype)  # noqa: E731
    ones = lambda: torch.ones(hidden, dtype=dtype)  # noqa: E731
    t = {"model.embed_tokens.weight": r(vocab, hidden), "model.norm.weight": ones()}
    if not tied:
        t["lm_head.weight"] = r(vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        t |= {p + "self_attn.q_proj.weight": r(heads * hd, hidden), p + "self_attn.k_proj.weight": r(kv * hd, hidden),
              p + "self_attn.v_proj.weight": r(kv * hd, hidden), p + "self_attn.o_proj.weight": r(hidden, heads * hd),
              p + "mlp.gate_proj.weight": r(inter, hidden), p + "mlp.up_proj.weight": r(inter, hidden),
              p + "mlp.down_proj.weight": r(hidden, inter), p + "input_layernorm.weight": ones(),
              p + "post_attention_layernorm.weight": ones()}  # fmt: skip
    save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})
