"""The weight layout of the decode kernels ("panels"), to and from the (N, K) matrices of `nn.Linear`.

An (N, K) matrix is cut into panels of `PANEL` (64) consecutive output channels, each stored k-major:
`panels[p, k, j] = W[p * 64 + j, k]`, N zero-padded to a multiple of 64 (see `csrc/gemv.h`). Panels are streamed from
memory every decode step, so they are allocated in huge pages. `unpack` gives the matrix back exactly (a permutation),
so a model holding only panels can still hand out its weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nomoat.kernels import hugepages

PANEL = 64  # output channels per panel (4 AVX-512 vectors / 8 AVX2 vectors / 16 NEON vectors of fp32)
MAX_ROWS = 8  # rows one kernel sweep holds in registers; more rows run in blocks of 8 over each panel


def panels_of(w_t: torch.Tensor) -> torch.Tensor:
    """(K, N) k-major weights -> (P, K, PANEL) panels, N zero-padded to a multiple of PANEL."""
    k, n = w_t.shape
    pad = -n % PANEL
    if pad:
        w_t = F.pad(w_t, (0, pad))
    return hugepages.copy(w_t.reshape(k, -1, PANEL).permute(1, 0, 2))  # streamed every token: huge pages


def pack_fp32(weight: torch.Tensor) -> torch.Tensor:
    """Panels (P, K, 64) fp32 of an (N, K) weight, for `linear_fp32`."""
    return panels_of(weight.detach().float().t())


def pack_int8(q_t: torch.Tensor) -> torch.Tensor:
    """Panels (P, K, 64) int8 of (K, N) int8 codes (the transposed weight), for `linear_int8`."""
    return panels_of(q_t.to(torch.int8))


def unpack(panels: torch.Tensor, n: int) -> torch.Tensor:
    """The (n, K) matrix that panels (P, K, 64) hold (a new contiguous tensor; codes stay int8 for int8 panels)."""
    p, k, _ = panels.shape
    return panels.permute(0, 2, 1).reshape(p * PANEL, k)[:n].contiguous()
