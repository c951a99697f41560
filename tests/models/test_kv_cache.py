"""The static KV cache: cached decoding equals the full forward; rows of different lengths share one batch."""

from __future__ import annotations

import pytest
import torch

from nomoat.models import kv_cache
from nomoat.models.checkpoint import load_model
from nomoat.models.kv_cache import KVCache

from hf_models import ALL, make_hf_model


@pytest.fixture(scope="module", params=[n for n in ALL if n != "phi3_longrope"])
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    make_hf_model(request.param, path)
    return load_model(path, dtype=torch.float32, device="cpu")


def test_prefill_then_decode_equals_full_forward(model):
    ids = torch.randint(3, 512, (1, 30), generator=torch.Generator().manual_seed(0))
    cache = KVCache(model.config, 1, 64, torch.float32, "cpu")
    with torch.no_grad():
        full = model(ids)
        got = [model(ids[:, :10], position_ids=torch.arange(10)[None], cache=cache)]
        for t in range(10, 30):
            got.append(model(ids[:, t : t + 1], position_ids=torch.tensor([[t]]), cache=cache))
    torch.testing.assert_close(torch.cat(got, dim=1), full, atol=1e-5, rtol=1e-5)


def test_rows_of_different_lengths(model):
    """Three prompts of lengths 5, 17, 11 decode together, each row at its own position, as each alone."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (n,), generator=g) for n in (5, 17, 11)]
    steps = 12
    cache = KVCache(model.config, 4, 64, torch.float32, "cpu")
    rows = torch.tensor([3, 0, 2])  # scattered rows, not 0..B-1
    nxt = []
    with torch.no_grad():
        for row, p in zip(rows, prompts):
            out = model(p[None], position_ids=torch.arange(len(p))[None], cache=cache, rows=row[None])
            nxt.append(out[0, -1].argmax())
        tokens = torch.stack(nxt)[:, None]
        lens = torch.tensor([len(p) for p in prompts])
        batched = [tokens]
        for s in range(steps - 1):
            out = model(tokens, position_ids=(lens + s)[:, None], cache=cache, rows=rows)
            tokens = out[:, -1].argmax(-1, keepdim=True)
            batched.append(tokens)
    batched = torch.cat(batched, dim=1)
    for i, p in enumerate(prompts):
        ids = p[None]
        with torch.no_grad():
            for _ in range(steps):
                ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert ids[0, len(p):].tolist() == batched[i].tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bytes_per_row_is_what_a_row_allocates(model, dtype):
    cache = KVCache(model.config, 3, 40, dtype, "cpu")
    allocated = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
    assert kv_cache.bytes_per_row(model.config, 40, dtype) * 3 == allocated


def test_rows_for_memory_takes_a_share_of_free_memory(model, monkeypatch):
    row = kv_cache.bytes_per_row(model.config, 512, torch.float32)
    monkeypatch.setattr(kv_cache, "_available_cpu_bytes", lambda: 40 * row)
    assert kv_cache.rows_for_memory(model.config, 512, torch.float32, "cpu") == 10  # a quarter of 40 rows
    assert kv_cache.rows_for_memory(model.config, 512, torch.float32, "cpu", share=1.0, most=32) == 32
    monkeypatch.setattr(kv_cache, "_available_cpu_bytes", lambda: row // 2)
    assert kv_cache.rows_for_memory(model.config, 512, torch.float32, "cpu") == 1  # never fewer than one row


def test_available_memory_is_read_from_the_kernel():
    meminfo = {line.split(":")[0]: int(line.split()[1]) for line in open("/proc/meminfo")}
    assert abs(kv_cache._available_cpu_bytes() - meminfo["MemAvailable"] * 1024) < 2**30  # moves while we read
