"""The weight layout of the decode kernels ("panels"), to and from the (N, K) matrices of `nn.Linear`.

An (N, K) matrix is cut into panels of `PANEL` (64) consecutive output channels, each stored k-major:
`panels[p, k, j] = W[p * 64 + j, k]`, N zero-padded to a multiple of 64 (see `csrc/gemv.h`). Panels are streamed from
memory every decode step, so they are allocated in huge pages. `unpack` gives the matrix back exactly (a permutation),
so a model holding only panels can still hand out its weights. bf16 panels interleave pairs of input channels
(`panels[p, k // 2, 2 * j + k % 2] = W[p * 64 + j, k]`, K padded to even): one 32-bit word holds two channels of one
output, which the kernels widen to fp32 with a shift and a mask. int8 panels hold codes `q` beside fp16 scales per block
of 32 input channels per output channel (GGUF Q8_0's blocks: `W[n, k] = d[n, k // 32] * q[n, k]`), the scales
(P, ceil(K / 32), 64) in the order the integer dot kernel accumulates the channels (`I8_SCALE_ORDER`,
`csrc/int8_dot.h`): `scales[p, b, I8_SCALE_ORDER[j]] = d[p * 64 + j, b]`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nomoat.kernels import hugepages

PANEL = 64  # output channels per panel (4 AVX-512 vectors / 8 AVX2 vectors / 16 NEON vectors of fp32)
MAX_ROWS = 8  # rows one kernel sweep holds in registers; more rows run in blocks of 8 over each panel
Q4_BLOCK = 32  # input channels per 4-bit block (GGUF's QK4_0 / QK4_1)
Q4_CODE_BYTES = PANEL * Q4_BLOCK // 2  # codes of one block of a panel
I8_BLOCK = 32  # input channels per int8 block scale (GGUF's QK8_0)
# Where int8 block scales keep channel j of a panel: 16 i + 4 L + q for j = 16 L + 4 i + q (an involution).
I8_SCALE_ORDER = torch.tensor([16 * ((j >> 2) & 3) + 4 * (j >> 4) + (j & 3) for j in range(PANEL)])


def panels_of(w_t: torch.Tensor, arena: bool = True) -> torch.Tensor:
    """(K, N) k-major weights -> (P, K, PANEL) panels, N zero-padded to a multiple of PANEL.

    In the huge-page arena (streamed every token), unless `arena` is False: a temporary that a loader copies on.
    """
    k, n = w_t.shape
    pad = -n % PANEL
    if pad:
        w_t = F.pad(w_t, (0, pad))
    t = w_t.reshape(k, -1, PANEL).permute(1, 0, 2)
    return hugepages.arena_copy(t) if arena else t.contiguous()


def pack_fp32(weight: torch.Tensor) -> torch.Tensor:
    """Panels (P, K, 64) fp32 of an (N, K) weight, for `linear_fp32`."""
    return panels_of(weight.detach().float().t())


def pack_int8(q: torch.Tensor, d: torch.Tensor, arena: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Panels of (N, K) int8 codes and their (N, ceil(K / 32)) fp16 block scales, for `linear_int8`.

    In the huge-page arena unless `arena` is False (`panels_of`).

    Returns:
        `panels` (P, K, 64) int8 and `scales` (P, ceil(K / 32), 64) fp16 (channels in `I8_SCALE_ORDER`), N
        zero-padded to a multiple of 64.
    """
    n, k = q.shape
    nb = -(-k // I8_BLOCK)
    if tuple(d.shape) != (n, nb):
        raise ValueError(f"pack_int8: scales {tuple(d.shape)} for codes {tuple(q.shape)}; expected ({n}, {nb})")
    t = F.pad(d.to(torch.float16), (0, 0, 0, -n % PANEL)).view(-1, PANEL, nb).transpose(1, 2)  # (P, nb, 64)
    scales = torch.empty_like(t)
    scales[:, :, I8_SCALE_ORDER] = t
    return panels_of(q.to(torch.int8).t(), arena), hugepages.arena_copy(scales) if arena else scales


def unpack_int8(panels: torch.Tensor, scales: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (n, K) int8 codes and (n, ceil(K / 32)) fp16 block scales that int8 panels and their scales hold."""
    p, nb, _ = scales.shape
    d = scales[:, :, I8_SCALE_ORDER.to(scales.device)].transpose(1, 2).reshape(p * PANEL, nb)[:n].contiguous()
    return unpack(panels, n), d


def dequantize_int8(
    panels: torch.Tensor, scales: torch.Tensor, n: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The (n, K) matrix int8 panels stand for: `d * q` in fp32 (exact: an fp16 scale times a code), then `dtype`."""
    q, d = unpack_int8(panels, scales, n)
    return (q.float() * d.float().repeat_interleave(I8_BLOCK, dim=1)[:, : q.shape[1]]).to(dtype)


def unpack(panels: torch.Tensor, n: int) -> torch.Tensor:
    """The (n, K) matrix that panels (P, K, 64) hold (a new contiguous tensor; codes stay int8 for int8 panels)."""
    p, k, _ = panels.shape
    return panels.permute(0, 2, 1).reshape(p * PANEL, k)[:n].contiguous()


def pack_bf16(weight: torch.Tensor) -> torch.Tensor:
    """Panels (P, ceil(K / 2), 128) bf16 of an (N, K) weight (input channels in pairs), for `linear_bf16`."""
    w = weight.detach().to(torch.bfloat16)
    n, k = w.shape
    w = F.pad(w, (0, k % 2, 0, -n % PANEL))  # (P * 64, K2 * 2)
    pairs = w.view(-1, PANEL, (k + 1) // 2, 2).permute(0, 2, 1, 3)  # (P, K2, 64, 2)
    return hugepages.arena_copy(pairs.reshape(pairs.shape[0], pairs.shape[1], 2 * PANEL))


def unpack_bf16(panels: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The (n, k) bf16 matrix that bf16 panels (P, ceil(k / 2), 128) hold (a new contiguous tensor)."""
    p, k2, _ = panels.shape
    w = panels.view(p, k2, PANEL, 2).permute(0, 2, 1, 3).reshape(p * PANEL, 2 * k2)
    return w[:n, :k].contiguous()


def pack_q4(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None) -> torch.Tensor:
    """4-bit panels (P, K / 32, BB) uint8 of (N, K) codes in [0, 15] with fp16 block scales (and minimums).

    Args:
        codes: (N, K) uint8 codes, K a multiple of 32: `w = d * (code - 8)` (Q4_0), or `d * code + m` (Q4_1).
        d: (N, K / 32) fp16 scales.
        m: (N, K / 32) fp16 minimums (Q4_1), or None (Q4_0).

    Returns:
        Panels with BB = 1152 (Q4_0) or 1280 (Q4_1) bytes per block, N zero-padded to a multiple of 64.
    """
    n, k = codes.shape
    nb, pad = k // Q4_BLOCK, -n % PANEL
    p = (n + pad) // PANEL
    c = F.pad(codes.to(torch.uint8), (0, 0, 0, pad)).view(p, PANEL, nb, 4, 2, 4)  # (P, o, b, kk, half, j)
    byte = (c[..., 0, :] | (c[..., 1, :] << 4)).permute(0, 2, 3, 1, 4)  # (P, b, kk, o, j)
    parts = [byte.reshape(p, nb, Q4_CODE_BYTES)]
    for t in (d, m) if m is not None else (d,):
        t = F.pad(t.to(torch.float16), (0, 0, 0, pad)).view(p, PANEL, nb).transpose(1, 2)  # (P, b, o)
        parts.append(t.contiguous().view(torch.uint8))  # (P, b, 128)
    out = hugepages.arena_empty((p, nb, sum(x.shape[2] for x in parts)), torch.uint8)
    a = 0
    for x in parts:
        out[:, :, a : a + x.shape[2]] = x
        a += x.shape[2]
    return out


def unpack_q4(panels: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The (n, K) uint8 codes, (n, K / 32) fp16 scales and minimums (None for Q4_0) that 4-bit panels hold."""
    p, nb, bb = panels.shape
    byte = panels[:, :, :Q4_CODE_BYTES].reshape(p, nb, 4, PANEL, 4).permute(0, 3, 1, 2, 4)  # (P, o, b, kk, j)
    codes = torch.stack((byte & 15, byte >> 4), dim=4).reshape(p * PANEL, nb * Q4_BLOCK)[:n]  # (.., kk, half, j)

    def halves(a: int) -> torch.Tensor:
        t = panels[:, :, a : a + 2 * PANEL].contiguous().view(torch.float16)  # (P, b, o)
        return t.transpose(1, 2).reshape(p * PANEL, nb)[:n].contiguous()

    m = halves(Q4_CODE_BYTES + 2 * PANEL) if bb > Q4_CODE_BYTES + 2 * PANEL else None
    return codes.contiguous(), halves(Q4_CODE_BYTES), m


def dequantize_q4(panels: torch.Tensor, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (n, K) matrix 4-bit panels stand for (fp32 arithmetic as GGUF's own dequantization, then `dtype`)."""
    codes, d, m = unpack_q4(panels, n)
    q = codes.view(n, -1, Q4_BLOCK).float()  # (n, b, 32)
    w = d.float()[:, :, None] * q + m.float()[:, :, None] if m is not None else d.float()[:, :, None] * (q - 8)
    return w.reshape(n, -1).to(dtype)
