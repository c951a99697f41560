"""GGUF Q8_0 blocks made by the `gguf` package (llama.cpp's own Python quantizer): the independent oracle of nomoat's
int8 codes and block scales, and their dequantization by plain torch arithmetic."""

from __future__ import annotations

import gguf
import numpy as np
import torch
import torch.nn.functional as F


def q8_0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) int8 codes and (out, ceil(in / 32)) fp16 scales of `w` as GGUF Q8_0 stores them (a last block of
    fewer than 32 channels: quantized as a block padded with zeros, the padding's codes dropped)."""
    n, k = w.shape
    padded = F.pad(w.detach().float(), (0, -k % 32)).numpy()
    raw = torch.from_numpy(np.ascontiguousarray(gguf.quants.quantize(padded, gguf.GGMLQuantizationType.Q8_0)))
    blocks = raw.reshape(-1, 34)  # an fp16 scale, then 32 int8 codes
    codes = blocks[:, 2:].contiguous().view(torch.int8).reshape(n, -1)[:, :k].contiguous()
    return codes, blocks[:, :2].contiguous().view(torch.float16).reshape(n, -1)


def dequantized(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The (out, in) fp32 matrix Q8_0 codes and block scales stand for: `d[n, k // 32] * q[n, k]`."""
    return q.float() * d.float().repeat_interleave(32, dim=1)[:, : q.shape[1]]
