"""A static, preallocated key/value cache written by position (gpt-fast's shape, one row per sequence).

Every layer owns `k` and `v` buffers of shape (max_batch, n_kv_heads, max_seq_len, head_dim). A forward pass writes
the keys and values of its tokens at their absolute positions in their rows, then attends over positions
`[0, kv_len)` of those rows with a mask `key_pos <= query_pos` (and the sliding window). Because a position is always
written before any query can see it, stale entries beyond a row's length are never read: rows of different lengths
share one batch without padding, and a row is reused by simply writing from position 0 again.
"""

from __future__ import annotations

import os

import torch

from nomoat.config.model import ModelConfig
from nomoat.kernels import hugepages


class KVCache:
    """Preallocated keys and values for `max_batch` sequences of up to `max_seq_len` tokens.

    Args:
        cfg: The model's config (layers, kv heads, head size).
        max_batch: Rows (concurrent sequences).
        max_seq_len: Positions per row.
        dtype: Storage dtype (the model's activation dtype).
        device: Where the buffers live.
    """

    def __init__(
        self, cfg: ModelConfig, max_batch: int, max_seq_len: int, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        shape = (max_batch, cfg.num_kv_heads, max_seq_len, cfg.head_dim)
        self.k = [_zeros(shape, dtype, device) for _ in range(cfg.num_layers)]
        self.v = [_zeros(shape, dtype, device) for _ in range(cfg.num_layers)]
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len

    def update(
        self,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        rows: slice | torch.Tensor,
        positions: torch.Tensor,
        kv_len: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new keys/values at their positions and return the cached ones to attend over.

        Args:
            layer: Layer index.
            k: New keys (B, n_kv, T, hd), already rotated.
            v: New values (B, n_kv, T, hd).
            rows: The B cache rows of the batch: a slice (a view, no copy) or a tensor of row indices.
            positions: Absolute positions (B, T) of the new tokens.
            kv_len: How many positions to return (at least `positions.max() + 1`).

        Returns:
            Keys and values (B, n_kv, kv_len, hd).
        """
        kc, vc = self.k[layer], self.v[layer]
        if isinstance(rows, slice):
            kc, vc = kc[rows], vc[rows]  # views: writes below land in the cache
            rows = torch.arange(kc.shape[0], device=k.device)
            # Advanced indices on dims 0 and 2 around a slice: the indexed shape is (B, T, n_kv, hd).
            kc[rows[:, None], :, positions] = k.transpose(1, 2)
            vc[rows[:, None], :, positions] = v.transpose(1, 2)
            return kc[:, :, :kv_len], vc[:, :, :kv_len]
        kc[rows[:, None], :, positions] = k.transpose(1, 2)
        vc[rows[:, None], :, positions] = v.transpose(1, 2)
        return kc[rows, :, :kv_len], vc[rows, :, :kv_len]


def bytes_per_row(cfg: ModelConfig, max_seq_len: int, dtype: torch.dtype) -> int:
    """Bytes of keys and values one cache row of `max_seq_len` positions holds, over all layers."""
    per_position = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim  # a key and a value per layer and kv head
    return per_position * max_seq_len * torch.empty((), dtype=dtype).element_size()


def rows_for_memory(
    cfg: ModelConfig, max_seq_len: int, dtype: torch.dtype, device: torch.device | str, share: float = 0.25,
    most: int = 64,
) -> int:
    """How many cache rows fit in `share` of the memory free now (at least 1, at most `most`).

    Free memory is the kernel's MemAvailable on the CPU and the free device memory on a GPU; the rows are what a
    server decodes together, so more rows means shorter waits for a first token under many concurrent clients.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = _available_cpu_bytes()
    return max(1, min(most, int(free * share) // max(1, bytes_per_row(cfg, max_seq_len, dtype))))


def _available_cpu_bytes() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Zeros; on the CPU in huge pages where possible (decode attention streams the cache every token)."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    return hugepages.empty(shape, dtype).zero_()
