"""Plain PyTorch references of nomoat's ops: what runs where the C++ kernels cannot be built, and the tests' oracle.

Each function takes the arguments of the op of the same name in `ops.py` and returns (or writes in place) the same
values, within fp32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nomoat.kernels.layout import Q4_BLOCK, dequantize_int8, dequantize_q4, unpack, unpack_bf16


def linear_fp32(x: torch.Tensor, panels: torch.Tensor, n: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ W.T + bias` for x (M, K) and fp32 panels of W (n, K); returns (M, n)."""
    return F.linear(x, unpack(panels, n), bias)


def linear_bf16(x: torch.Tensor, panels: torch.Tensor, n: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ W.T + bias` in fp32 for x (M, K) fp32 and bf16 panels of W (n, K); returns (M, n)."""
    return F.linear(x, unpack_bf16(panels, n, x.shape[1]).float(), bias)


def linear_bf16_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ W.T + bias` in fp32 for x (M, K) fp32 and a bf16 weight W (N, K); returns (M, N)."""
    return F.linear(x, weight.float(), bias)


def linear_int8(
    x: torch.Tensor, panels: torch.Tensor, scale: torch.Tensor, n: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`x @ W.T + bias` for x (M, K) and int8 panels of W (n, K) with their fp16 block scales `scale`; (M, n).

    `W[i, k] = d[i, k // 32] * q[i, k]` (`layout.dequantize_int8`, GGUF Q8_0's blocks).
    """
    return F.linear(x, dequantize_int8(panels, scale, n), bias)


Q16_MAX = 32639  # the largest 16-bit activation code (two int8 digits, 256 hi + lo: csrc/q4_rows.h)


def quantize_activations(x: torch.Tensor, codes16: bool = False) -> torch.Tensor:
    """Activations (M, K) as the kernels round them per block of 32, in fp32.

    To int8 (scale absmax / 127), as `linear_q4` and `linear_int8` in mode 1 round them; with `codes16`, to 16-bit
    codes (scale absmax / 32639), as `linear_int8` in mode 2.
    """
    blocks = x.float().reshape(x.shape[0], -1, Q4_BLOCK)  # (M, b, 32)
    d = blocks.abs().amax(dim=2, keepdim=True) / (float(Q16_MAX) if codes16 else 127.0)
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    return (torch.round(blocks * inv) * d).reshape(x.shape)


def linear_int8_dot(
    x: torch.Tensor, panels: torch.Tensor, scale: torch.Tensor, n: int, bias: torch.Tensor | None = None, mode: int = 2
) -> torch.Tensor:
    """`linear_int8` over x (M, K) rounded per block of 32 (`quantize_activations`); returns (M, n).

    What the compiled op computes in its integer dot-product modes (`ops.int8_dot`): the activations rounded to int8
    in mode 1, to 16-bit codes in mode 2.
    """
    return linear_int8(quantize_activations(x, codes16=mode == 2), panels, scale, n, bias)


def linear_q4(x: torch.Tensor, panels: torch.Tensor, n: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ W.T + bias` for x (M, K) fp32 and 4-bit panels of W (n, K), activations rounded to int8 per block."""
    return F.linear(quantize_activations(x), dequantize_q4(panels, n), bias)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding of the first `cos.shape[-1]` channels of x (..., hd); cos/sin broadcast."""
    rd = cos.shape[-1]
    rot, rest = x[..., :rd], x[..., rd:]
    x1, x2 = rot[..., : rd // 2], rot[..., rd // 2 :]
    return torch.cat((rot * cos + torch.cat((-x2, x1), dim=-1) * sin, rest), dim=-1)


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    row0: int,
    positions: torch.Tensor,
    kv_len: int,
    window: int,
    scale: float,
) -> torch.Tensor:
    """One decode step of attention: rotate, write rows `row0..` of the caches, attend; returns (B, 1, H * hd)."""
    B, _, H, hd = q.shape
    nkv = k.shape[2]
    rows = torch.arange(row0, row0 + B)
    pos = positions.reshape(B)
    c, s = cos[:, 0, None], sin[:, 0, None]  # (B, 1, rd): one table per row, broadcast over heads
    k_cache[rows, :, pos] = rotate(k[:, 0], c, s)
    v_cache[rows, :, pos] = v[:, 0]
    keys = torch.arange(kv_len)[None, :]  # (1, S)
    allowed = keys <= pos[:, None]  # (B, S)
    if window:
        allowed &= keys > pos[:, None] - window
    qr = rotate(q[:, 0], c, s)[:, :, None]  # (B, H, 1, hd)
    kk = k_cache[row0 : row0 + B, :, :kv_len].repeat_interleave(H // nkv, dim=1)  # (B, H, S, hd)
    vv = v_cache[row0 : row0 + B, :, :kv_len].repeat_interleave(H // nkv, dim=1)
    out = F.scaled_dot_product_attention(qr, kk, vv, attn_mask=allowed[:, None, None], scale=scale)
    return out.transpose(1, 2).reshape(B, 1, H * hd)


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up`."""
    return F.silu(gate) * up


def swiglu_backward(
    gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor, p_out: torch.Tensor | None = None
) -> torch.Tensor:
    """Gradients of `silu(gate) * up`: writes dL/dgate into `grad` (and the product into `p_out`); returns dL/dup."""
    sig = torch.sigmoid(gate)
    act = gate * sig
    grad_up = grad * act
    if p_out is not None:
        p_out.copy_(act * up)
    grad.mul_(up * sig * (1.0 + gate * (1.0 - sig)))
    return grad_up


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool = False) -> torch.Tensor:
    """Rotary embedding of x (B, H, T, hd) by cos/sin (B, T, rd), or its gradient; laid out as (B, T, H, hd)."""
    c, s = cos[:, None], sin[:, None]  # (B, 1, T, rd)
    y = _rope_transposed(x, c, s) if backward else rotate(x, c, s)
    out = torch.empty(x.shape[0], x.shape[2], x.shape[1], x.shape[3], dtype=x.dtype).transpose(1, 2)
    return out.copy_(y)


def _rope_transposed(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The transposed rotation (the gradient of `rotate`): `y1 = x1 c1 + x2 s2`, `y2 = x2 c2 - x1 s1`."""
    rd = c.shape[-1]
    half = rd // 2
    x1, x2 = x[..., :half], x[..., half:rd]
    y = torch.cat((x1 * c[..., :half] + x2 * s[..., half:], x2 * c[..., half:] - x1 * s[..., :half]), dim=-1)
    return torch.cat((y, x[..., rd:]), dim=-1)


def softmax_xent_(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row `logsumexp(row) - row[target]` (c,); `logits` (c, V) becomes `softmax - onehot(target)` in place."""
    lse = torch.logsumexp(logits, dim=-1)
    loss = lse - logits.gather(1, targets[:, None]).squeeze(1)
    logits.sub_(lse[:, None]).exp_()
    logits[torch.arange(logits.shape[0]), targets] -= 1.0
    return loss


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row's argmax (B,): the first maximum, a NaN the largest (torch's own rule)."""
    return x.argmax(dim=-1)


def lora_rows_(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    bt: torch.Tensor,
    rows: torch.Tensor,
    which: torch.Tensor,
    coef: torch.Tensor,
) -> None:
    """`y[rows[e]] += coef[e] * (x[rows[e]] a[which[e]]^T) bt[which[e]]` for every entry e, one adapter at a time.

    Factors may be fp32 or bf16; they are widened to fp32, as the kernel does.
    """
    for g in which.unique().tolist():
        sel = which == g
        r = rows[sel]
        xa = (x[r] @ a[g].float().t()) * coef[sel, None]  # (n, r)
        y.index_add_(0, r, xa @ bt[g].float())  # (n, out)


# ---- NF4 (QLoRA's frozen base) ------------------------------------------------------------------------------------

# The 16 NF4 values (QLoRA paper, appendix E), lowest code first; `nomoat.lora.nf4.NF4_CODEBOOK` holds the same.
_NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


def nf4_decode_bf16(qweight: torch.Tensor, absmax: torch.Tensor, block: int) -> torch.Tensor:
    """bf16 tile (R, C) of NF4 codes `qweight` uint8 (R, C / 2) (high nibble first), `absmax` fp32 (R, C / block).

    Each value is `bf16(bf16(codebook[code]) * bf16(absmax))`.
    """
    book = torch.tensor(_NF4_VALUES, dtype=torch.float32, device=qweight.device).to(torch.bfloat16)
    q = qweight.long()
    codes = torch.stack([q >> 4, q & 15], dim=-1).reshape(q.shape[0], -1)  # (R, C)
    values = book[codes].view(q.shape[0], -1, block)  # (R, C / block, block)
    return (values * absmax.to(torch.bfloat16)[:, :, None]).reshape(q.shape[0], -1)
