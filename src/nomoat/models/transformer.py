"""One config-driven decoder for every supported family (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3).

Module and parameter names follow Hugging Face (`model.layers.0.self_attn.q_proj.weight`, ...), unfused, so that a
checkpoint loads without renaming and a LoRA adapter saves under PEFT's key names. Numerics follow `transformers`
step by step (RMSNorm in fp32, rotary tables in fp32 cast to the activation dtype, softmax in fp32) so that logits
agree to fp32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nomoat.config.model import ModelConfig
from nomoat.models import fused_ops
from nomoat.models.families import rope_inv_freq
from nomoat.models.kv_cache import KVCache
from nomoat.models.segments import Segments, segment_attention

# What a cached forward hands each attention layer: the cache, the batch's cache rows, the positions of the new
# tokens (B, T), and how many cached positions to attend over.
CacheArgs = tuple[KVCache, "slice | torch.Tensor", torch.Tensor, int]


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32.

    Llama style scales the normalised input (cast back to the input dtype) by `weight`; Gemma style (`offset=True`)
    scales by `1 + weight` in fp32 and casts at the end, as the two families' reference code does.
    """

    def __init__(self, dim: int, eps: float, offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise over the last dimension."""
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return fused_ops.RMSNormFn.apply(x, self.weight, self.eps, self.offset)
        if not self.offset and x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # One fused op instead of six (bit-identical in fp32): 13 -> 10 us per call at decode, 61 calls a token.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (h * (1.0 + self.weight.float())).type_as(x)
        return self.weight * h.to(x.dtype)


def _act(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return F.silu(x)
    if name == "gelu":
        return F.gelu(x)
    return F.gelu(x, approximate="tanh")  # gelu_pytorch_tanh, gelu_new, gelu_fast


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class _RopeFn(torch.autograd.Function):
    """`apply_rope` through the compiled one-pass kernel; keeps only the tables for the backward pass."""

    @staticmethod
    def forward(ctx, x, cos, sin):  # noqa: ANN001, ANN205
        ctx.save_for_backward(cos, sin)
        return fused_ops.rope(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        cos, sin = ctx.saved_tensors
        return fused_ops.rope(grad.contiguous() if grad.stride(-1) != 1 else grad, cos, sin, backward=True), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `cos.shape[-1]` channels of `x` (B, H, T, hd) by positions; the rest pass through."""
    if x.stride(-1) == 1 and cos.dim() == 3 and x.dtype == torch.float32 and fused_ops.applicable(cos, sin):
        if not (torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad)):
            return fused_ops.rope(x, cos, sin)  # inference (prefill): one pass instead of five ops
        if x.requires_grad and torch.is_grad_enabled() and not cos.requires_grad:
            return _RopeFn.apply(x, cos, sin)  # training: one pass each way instead of five ops keeping two copies
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, rd)
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    rot, rest = x[..., :rd], x[..., rd:]
    return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)


class Attention(nn.Module):
    """Multi-head attention with GQA/MQA, optional q/k norms, soft-capping and a sliding window (via the mask)."""

    # Set on LoRA-trained models by `inject_lora` (`lora.group.LoRAGroup`): q/k/v trained as one group (one adapter
    # product for the three); it returns None wherever it does not apply.
    _train_qkv = None

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, cfg.q_size, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, cfg.kv_size, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, cfg.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.q_size, d, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.norm_offset)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.norm_offset)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | Segments | None,
        cache: CacheArgs | None = None,
    ) -> torch.Tensor:
        """Attend over the sequence (and the cached positions before it).

        Args:
            x: Hidden states (B, T, D).
            cos: Rotary cosine table (B, T, rd) in the activation dtype.
            sin: Rotary sine table (B, T, rd) in the activation dtype.
            mask: Boolean (B, 1, T, S), True where a query may attend to a key; None means plain causal (S == T);
                `Segments` means causal attention within each packed example.
            cache: With a KV cache: `(cache, rows, positions, kv_len)`; keys and values are written, then read back.
        """
        cfg = self.cfg
        B, T, _ = x.shape
        qkv = None
        if self._train_qkv is not None:
            qkv = self._train_qkv(x, (self.q_proj, self.k_proj, self.v_proj))
        if qkv is None:
            qkv = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = qkv[0].view(B, T, cfg.num_heads, cfg.head_dim)
        k = qkv[1].view(B, T, cfg.num_kv_heads, cfg.head_dim)
        v = qkv[2].view(B, T, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            kv, rows, positions, kv_len = cache
            k, v = kv.update(self.layer_idx, k, v, rows, positions, kv_len)  # (B, n_kv, S, hd)
        if isinstance(mask, Segments):
            y = self._segment_attention(q, k, v, mask)  # (B, T, H, hd)
        else:
            y = self._attend(q, k, v, mask).transpose(1, 2)
        return self.o_proj(y.reshape(B, T, cfg.q_size))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention (B, H, T, hd) under a boolean mask, or causal when `mask` is None."""
        cfg = self.cfg
        if cfg.attn_logit_softcap is not None:
            return _softcapped_attention(q, k, v, mask, cfg.query_scale, cfg.attn_logit_softcap)
        if q.shape[2] == 1 and not q.requires_grad:
            return _decode_attention(q, k, v, mask, cfg.query_scale)
        gqa = cfg.num_kv_heads != cfg.num_heads
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=cfg.query_scale, enable_gqa=gqa
        )

    def _segment_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Segments) -> torch.Tensor:
        """Causal attention within each example of each row (and its shared prefix): (B, T, H, hd), zeros at padding."""
        cfg = self.cfg
        window = cfg.sliding_window if cfg.layer_types[self.layer_idx] == "sliding_attention" else None
        if seg.trivial and (window is None or seg.T <= window):
            return self._attend(q, k, v, None).transpose(1, 2)
        return segment_attention(q, k, v, seg, cfg.query_scale, window, self._attend,
                                 flash=cfg.attn_logit_softcap is None)  # fmt: skip


def _decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Attention of one query per row (decode): (B, H, 1, hd) over keys (B, n_kv, S, hd), softmax in fp32.

    Grouped heads share their keys through a view (no `repeat_interleave`), and two batched matmuls replace SDPA,
    whose CPU kernel costs about 60 us a call at this size (measured: 1.5 ms of a SmolLM2-135M token's 30 layers).
    """
    B, H, _, hd = q.shape
    n_kv = k.shape[1]
    scores = torch.matmul(q.reshape(B, n_kv, H // n_kv, hd), k.transpose(-2, -1)).mul_(scale)  # (B, n_kv, rep, S)
    if mask is not None:
        scores = scores.masked_fill_(~mask, float("-inf"))  # mask (B, 1, 1, S)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v).reshape(B, H, 1, hd)


def _softcapped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, cap: float
) -> torch.Tensor:
    """Gemma 2's attention: tanh soft-capping of the scores, which `scaled_dot_product_attention` cannot express."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.tanh((q @ k.transpose(-2, -1)) * scale / cap) * cap  # (B, H, T, S)
    if mask is None:
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return probs @ v


class MLP(nn.Module):
    """Gated MLP: `down(act(gate(x)) * up(x))` (SwiGLU or GeGLU)."""

    _train_gate_up = None  # gate/up as one LoRA group in training (see `Attention._train_qkv`)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.act = cfg.hidden_act
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the gated MLP."""
        grouped = None if self._train_gate_up is None else self._train_gate_up(x, (self.gate_proj, self.up_proj))
        gate, up = grouped if grouped is not None else (self.gate_proj(x), self.up_proj(x))
        if self.act == "silu" and torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
            # A LoRA `down_proj` can take the product's two factors and keep only them for backward.
            fused = getattr(self.down_proj, "swiglu_forward", None)
            y = fused(gate, up) if fused is not None else None
            return y if y is not None else self.down_proj(fused_ops.SwiGLUFn.apply(gate, up))
        if self.act == "silu" and fused_ops.applicable(gate, up):
            return self.down_proj(fused_ops.swiglu_forward(gate, up))  # no gradient: one pass instead of two ops
        return self.down_proj(_act(self.act, gate) * up)


class Block(nn.Module):
    """One decoder layer: pre-norm (Llama) or sandwich-norm (Gemma 2/3) attention and MLP with residuals."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_type = cfg.layer_types[layer_idx]
        self.sandwich = cfg.sandwich_norm
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)  # noqa: E731
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = norm()
        # In Llama-style blocks `post_attention_layernorm` is the norm before the MLP (the Hugging Face name).
        self.post_attention_layernorm = norm()
        if cfg.sandwich_norm:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: CacheArgs | None = None,
    ) -> torch.Tensor:
        """Run the layer on hidden states (B, T, D)."""
        if self.sandwich:
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The stack under the output head: embeddings, layers and final norm (Hugging Face's `model.` prefix)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)


class Transformer(nn.Module):
    """A decoder-only language model described by a `ModelConfig`.

    Example:
        >>> model = Transformer(cfg)
        >>> logits = model(input_ids, attention_mask=mask)  # (B, T, vocab)
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope_types = sorted(set(config.layer_types))
        self.gradient_checkpointing = False  # recompute each layer in backward (training memory for time)
        self.reset_rope()

    # ---- setup ------------------------------------------------------------------------------------------------

    def reset_rope(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the rotary inverse-frequency buffers, e.g. after the model was built on the meta device."""
        cfg = self.config
        for kind in self.rope_types:
            params = cfg.rope[kind]
            for long in (False, True) if params["rope_type"] == "longrope" else (False,):
                inv, scale = rope_inv_freq(params, cfg.head_dim, cfg.max_position_embeddings, long=long)
                name = f"_inv_freq_{kind}" + ("_long" if long else "")
                self.register_buffer(name, inv if device is None else inv.to(device), persistent=False)
                setattr(self, f"_rope_scale_{kind}", scale)

    def init_weights(self, std: float = 0.02, seed: int | None = None) -> None:
        """Random initialisation for training from scratch: normal(0, std) matrices, zero biases, unit norms."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                with torch.no_grad():
                    w = torch.empty(module.weight.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
                    module.weight.copy_(w)
                    if getattr(module, "bias", None) is not None:
                        module.bias.zero_()
            elif isinstance(module, RMSNorm):
                nn.init.zeros_(module.weight) if module.offset else nn.init.ones_(module.weight)

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the model's parameters."""
        return self.model.embed_tokens.weight.dtype

    # ---- forward ----------------------------------------------------------------------------------------------

    def rope_tables(self, kind: str, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary (cos, sin) tables (B, T, rd) in `dtype` for layers of type `kind` at `positions` (B, T)."""
        params = self.config.rope[kind]
        inv = getattr(self, f"_inv_freq_{kind}")
        if params["rope_type"] == "longrope" and int(positions.max()) + 1 > params["original_max_position_embeddings"]:
            inv = getattr(self, f"_inv_freq_{kind}_long")
        scale = getattr(self, f"_rope_scale_{kind}")
        freqs = positions[..., None].float() * inv.float()  # (B, T, rd/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)

    def _masks(
        self,
        attention_mask: torch.Tensor | None,
        T: int,
        device: torch.device,
    ) -> dict[str, torch.Tensor | None]:
        cfg = self.config
        window = cfg.sliding_window
        needs_window = window is not None and T > window
        if attention_mask is None and not needs_window:
            return {kind: None for kind in self.rope_types}  # plain causal: SDPA's fast path
        idx = torch.arange(T, device=device)
        causal = idx[None, :] <= idx[:, None]  # (T, S)
        keep = attention_mask.bool()[:, None, None, :] if attention_mask is not None else None  # (B, 1, 1, S)
        out: dict[str, torch.Tensor | None] = {}
        for kind in self.rope_types:
            allowed = causal
            if kind == "sliding_attention" and needs_window:
                allowed = allowed & (idx[None, :] > idx[:, None] - window)
            allowed = allowed[None, None] if keep is None else allowed[None, None] & keep  # (B|1, 1, T, S)
            # A query that may see nothing (a left-padding row) would make softmax NaN: let it see itself.
            empty = ~allowed.any(dim=-1, keepdim=True)
            out[kind] = allowed | (empty & torch.eye(T, dtype=torch.bool, device=device))
        return out

    def _cached_masks(self, positions: torch.Tensor, kv_len: int) -> dict[str, torch.Tensor]:
        """Masks over cached positions `[0, kv_len)`: a key is visible when written at or before the query."""
        key = torch.arange(kv_len, device=positions.device)[None, None, :]  # (1, 1, S)
        query = positions[:, :, None]  # (B, T, 1)
        causal = key <= query  # (B, T, S)
        out = {}
        for kind in self.rope_types:
            allowed = causal
            if kind == "sliding_attention":
                allowed = allowed & (key > query - self.config.sliding_window)
            out[kind] = allowed[:, None]  # (B, 1, T, S)
        return out

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        return_hidden: bool = False,
        cache: KVCache | None = None,
        rows: slice | torch.Tensor | None = None,
        kv_len: int | None = None,
        segment_ids: torch.Tensor | None = None,
        prefix_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Compute next-token logits.

        Args:
            input_ids: Token ids (B, T).
            attention_mask: 1 for real tokens, 0 for padding (B, T); left or right padding. None: no padding.
            position_ids: Rotary positions (B, T). Default: counted over real tokens only (so a left-padded row gets
                the positions it would have alone), i.e. `cumsum(attention_mask) - 1`.
            return_hidden: Return the final normed hidden states (B, T, D) instead of logits (for chunked losses).
            cache: A `KVCache`: the new tokens' keys and values are written at `position_ids` in `rows`, and attention
                covers every cached position up to the query's own. `position_ids` is then required and
                `attention_mask` is not used (rows of different lengths need no padding).
            rows: Cache rows of the batch (a slice or a tensor of indices). Default: rows `0..B-1`.
            kv_len: Cached positions to attend over. Default: `position_ids.max() + 1`.
            segment_ids: For packed rows (B, T): which example each token belongs to (1, 2, ...; 0 for padding).
                Attention is then block-diagonal (causal within an example, nothing across examples) and
                `attention_mask` is ignored. Pass `position_ids` restarting at 0 for each example.
            prefix_ids: With `segment_ids` (B, T): for each token, the segment id of an earlier example of its row
                that its own example continues (0: none); that example's queries also see all of it (a shared
                prompt computed once), and its `position_ids` continue the prefix's.

        Returns:
            Logits (B, T, vocab) in the model dtype, soft-capped where the family does it.
        """
        B, T = input_ids.shape
        device = input_ids.device
        if position_ids is None:
            if cache is not None:
                raise ValueError("a cached forward needs position_ids (where to write each token)")
            if attention_mask is None:
                position_ids = torch.arange(T, device=device).expand(B, T)
            else:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        h = self.model.embed_tokens(input_ids)
        if self.config.embed_scale is not None:
            h = h * torch.tensor(self.config.embed_scale, dtype=torch.float32).to(h.dtype)
        ropes = {kind: self.rope_tables(kind, position_ids, h.dtype) for kind in self.rope_types}
        cache_args: CacheArgs | None = None
        if cache is not None:
            kv_len = int(position_ids.max()) + 1 if kv_len is None else kv_len
            cache_args = (cache, slice(0, B) if rows is None else rows, position_ids, kv_len)
            masks = self._cached_masks(position_ids, kv_len)
        else:
            if segment_ids is not None:
                segments = Segments(segment_ids, prefix_ids)
                masks = {kind: segments for kind in self.rope_types}
            else:
                masks = self._masks(attention_mask, T, device)
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.model.layers:
            cos, sin = ropes[layer.layer_type]
            if checkpointing:
                # Keep only each layer's input; recompute its activations in the backward pass.
                h = checkpoint(layer, h, cos, sin, masks[layer.layer_type], cache_args, use_reentrant=False)
            else:
                h = layer(h, cos, sin, masks[layer.layer_type], cache_args)
        h = self.model.norm(h)
        if return_hidden:
            return h
        return self.logits(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Output head on final hidden states, with the family's logit soft-capping."""
        logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits
