"""The decode model's attention where the compiled kernels run: one op call per layer and decode step.

The call (`torch.ops.nomoat.decode_attention`, the same attention code as the decode stack's) does the step's rope,
cache write and attention.

`prepare` gives this class to the twin's attention modules (fp32 models on the CPU, no logit soft-capping); it is the
layer loop's decode attention for models the one-call stack does not take (q/k norms, sandwich norms, GeGLU).
Prefill, and rows given as an index tensor, run `Attention.forward` (scaled_dot_product_attention).
"""

from __future__ import annotations

import torch

from nomoat import kernels
from nomoat.models.segments import Segments
from nomoat.models.transformer import Attention, CacheArgs


class KernelAttention(Attention):
    """`Attention` whose decode steps (one token per row, rows a slice of the cache) run as one kernel call."""

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | Segments | None,
        cache: CacheArgs | None = None,
    ) -> torch.Tensor:
        """Attend as `Attention.forward` does; x (B, T, D) -> (B, T, D)."""
        if cache is None or x.shape[1] != 1 or isinstance(cache[1], torch.Tensor):
            return super().forward(x, cos, sin, mask, cache)
        cfg = self.cfg
        B = x.shape[0]
        q = self.q_proj(x).view(B, 1, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).view(B, 1, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).view(B, 1, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        kv, rows, positions, kv_len = cache
        window = cfg.sliding_window if cfg.layer_types[self.layer_idx] == "sliding_attention" else 0
        y = kernels.decode_attention(q, k, v, cos, sin, kv.k[self.layer_idx], kv.v[self.layer_idx], rows.start or 0,
                                     positions, kv_len, window or 0, cfg.query_scale)  # fmt: skip  # (B, 1, H * hd)
        return self.o_proj(y)
