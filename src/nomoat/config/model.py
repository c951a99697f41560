"""The one model configuration: every decoder nomoat runs is described by a `ModelConfig`.

It is plain data (numbers, strings, lists, dicts): it serializes to JSON, holds no class objects, and derives
nothing that `__post_init__` cannot recompute. Family-specific parsing of Hugging Face `config.json` files lives in
`nomoat.models.families`; this class only knows the knobs of the one config-driven decoder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

LayerType = Literal["full_attention", "sliding_attention"]


@dataclass
class ModelConfig:
    """Architecture of one decoder-only transformer.

    Attributes:
        family: The Hugging Face `model_type` this config came from (`llama`, `qwen2`, `gemma2`, ...).
        vocab_size: Rows of the embedding matrix.
        hidden_size: Width of the residual stream.
        intermediate_size: Width of the MLP.
        num_layers: Number of decoder blocks.
        num_heads: Query heads.
        num_kv_heads: Key/value heads (GQA when fewer than `num_heads`, MQA when 1).
        head_dim: Width of one head; `hidden_size // num_heads` when None.
        max_position_embeddings: Context length the model was trained for.
        rms_norm_eps: Epsilon of every RMSNorm.
        norm_offset: Gemma-style RMSNorm that scales by `1 + weight` and multiplies in fp32.
        hidden_act: MLP activation: `silu`, `gelu_pytorch_tanh` or `gelu`.
        qkv_bias: Bias on the q/k/v projections.
        o_bias: Bias on the output projection.
        mlp_bias: Bias on the MLP projections.
        qk_norm: RMSNorm over each head of q and k before rotary embedding (Qwen3, Gemma 3).
        sandwich_norm: Gemma 2/3 blocks: norms after attention and around the MLP as well as before.
        embed_scale: Multiplier applied to token embeddings (`sqrt(hidden_size)` for Gemma), or None.
        tie_word_embeddings: The output head shares the embedding matrix.
        query_scale: Attention scale; `head_dim ** -0.5` when None.
        attn_logit_softcap: Gemma 2 tanh soft-capping of attention scores, or None.
        final_logit_softcap: Gemma 2 tanh soft-capping of output logits, or None.
        sliding_window: Window of the layers whose type is `sliding_attention`.
        layer_types: One of `full_attention` / `sliding_attention` per layer.
        rope: Rotary parameters per layer type: `{"full_attention": {"rope_type": ..., "rope_theta": ...}, ...}`.
        fused_qkv: The checkpoint stores `qkv_proj` and `gate_up_proj` fused (Phi-3); split at load, fused at save.
        hf_config: The original `config.json`, kept so that saving writes it back unchanged.
    """

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    norm_offset: bool = False
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sandwich_norm: bool = False
    embed_scale: float | None = None
    tie_word_embeddings: bool = False
    query_scale: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: list[str] = field(default_factory=list)
    rope: dict[str, dict[str, Any]] = field(default_factory=dict)
    fused_qkv: bool = False
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if not self.layer_types:
            self.layer_types = ["full_attention"] * self.num_layers
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        bad = set(self.layer_types) - {"full_attention", "sliding_attention"}
        if bad:
            raise ValueError(f"unsupported layer types {sorted(bad)}: expected full_attention or sliding_attention")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ValueError("sliding_attention layers need a sliding_window")
        if self.query_scale is None:
            self.query_scale = self.head_dim**-0.5

    @property
    def q_size(self) -> int:
        """Width of the query projection's output."""
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of the key (or value) projection's output."""
        return self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        """Return the config as JSON-serializable data."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build a config from `to_dict` output, ignoring unknown keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
