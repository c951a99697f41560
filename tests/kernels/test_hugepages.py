"""Huge-page tensors (`nomoat.kernels.hugepages`): alignment, contents, release, fallbacks, and real huge pages."""

from __future__ import annotations

import gc
import re
from pathlib import Path

import torch

from nomoat.kernels import hugepages


def _mapping_of(ptr: int) -> dict[str, int] | None:
    """The /proc/self/smaps fields (kB) of the mapping holding address `ptr`, or None."""
    fields: dict[str, int] | None = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            if fields is not None:
                return fields
            fields = {} if int(m.group(1), 16) <= ptr < int(m.group(2), 16) else None
        elif fields is not None and ":" in line:
            key, _, rest = line.partition(":")
            value = rest.split()
            if value and value[0].isdigit():
                fields[key] = int(value[0])
    return fields


def _thp_mode() -> str:
    text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    return re.search(r"\[(\w+)\]", text).group(1)


def test_empty_is_aligned_writable_and_sized() -> None:
    t = hugepages.empty((3, 1000, 777), torch.float32)
    assert t.shape == (3, 1000, 777) and t.dtype == torch.float32 and t.is_contiguous()
    assert t.data_ptr() % hugepages.HUGE == 0
    t.copy_(torch.arange(t.numel(), dtype=torch.float32).view(t.shape))
    assert t[2, 999, 776].item() == t.numel() - 1
    m = _mapping_of(t.data_ptr())
    assert m is not None and m["Size"] * 1024 == -(-t.numel() * 4 // 4096) * 4096  # trimmed to the tensor


def test_huge_pages_back_the_tensor_where_the_kernel_allows() -> None:
    t = hugepages.copy(torch.ones(4 << 20, dtype=torch.int8))  # 4 MiB: two whole huge pages
    m = _mapping_of(t.data_ptr())
    assert m is not None
    if _thp_mode() in ("madvise", "always"):
        assert m["AnonHugePages"] == 4096
    else:
        assert m["AnonHugePages"] == 0
    assert int(t.sum()) == 4 << 20


def test_advise_moves_an_existing_tensor_into_huge_pages_in_place() -> None:
    """A tensor in ordinary (4 KiB-page) memory keeps its address and contents; its whole 2 MiB stretches become huge
    pages where the kernel has MADV_COLLAPSE and allows huge pages; a tensor under 2 MiB is left alone."""
    t = torch.arange(3 << 20, dtype=torch.int32)  # 12 MiB: at least five whole aligned stretches
    before = (t.data_ptr(), t.clone())
    done = hugepages.advise(t)
    assert t.data_ptr() == before[0] and torch.equal(t, before[1])
    m = _mapping_of(-(-t.data_ptr() // hugepages.HUGE) * hugepages.HUGE)  # advised: its own mapping from there
    assert m is not None
    if done:
        assert m["AnonHugePages"] >= 5 * 2048
    else:
        assert _thp_mode() == "never" or m["AnonHugePages"] == 0
    assert not hugepages.advise(torch.ones(1000))
    assert not hugepages.advise(t.view(1024, -1)[:, :7])  # not contiguous


def test_memory_is_released_with_the_last_view() -> None:
    t = hugepages.empty((1 << 20,), torch.float32)
    ptr = t.data_ptr()
    view = t[10:20]
    del t
    gc.collect()
    assert _mapping_of(ptr) is not None  # a view keeps it
    del view
    gc.collect()
    assert _mapping_of(ptr) is None


def test_small_tensors_and_switch_off_use_plain_memory(monkeypatch) -> None:
    def no_mapping(nbytes: int) -> None:
        raise AssertionError(f"mapped {nbytes} bytes")

    monkeypatch.setattr(hugepages, "_mapping", no_mapping)
    small = hugepages.empty((100, 100), torch.float32)  # under 2 MiB
    assert small.shape == (100, 100)
    monkeypatch.setenv("NOMOAT_HUGE_PAGES", "0")
    assert not hugepages.enabled()
    big = hugepages.copy(torch.ones(1 << 20))
    assert big.sum().item() == 1 << 20


def test_packed_panels_and_kv_cache_use_huge_pages() -> None:
    from nomoat import kernels
    from nomoat.models.kv_cache import KVCache

    w = torch.randn(2048, 512)
    if kernels.available():
        panels = kernels.pack_fp32(w)
        assert panels.data_ptr() % hugepages.HUGE == 0
        x = torch.randn(3, 512)
        torch.testing.assert_close(kernels.linear_fp32(x, panels, 2048), x @ w.T, rtol=1e-5, atol=1e-4)
    cfg = type("Cfg", (), {"num_kv_heads": 4, "head_dim": 64, "num_layers": 2})()
    cache = KVCache(cfg, 4, 1024, torch.float32, "cpu")
    assert cache.k[0].data_ptr() % hugepages.HUGE == 0 and not cache.k[0].any() and not cache.v[1].any()


def test_arena_puts_small_tensors_and_tails_in_huge_pages() -> None:
    """Tensors under 2 MiB and the tails of larger ones share huge pages (where the kernel allows them); contents are
    each tensor's own; a tensor freed before its neighbours gives back the whole huge pages inside it, and the chunk
    is unmapped with its last tensor."""
    shapes = [(576, 576), (192, 576), (1536, 577), (3, 5)]
    src = [torch.randn(s) for s in shapes]
    ts = [hugepages.arena_copy(s) for s in src]
    for s, t in zip(src, ts):
        assert torch.equal(s, t) and t.is_contiguous() and t.data_ptr() % 64 == 0
    ends = sorted((t.data_ptr(), t.data_ptr() + t.numel() * 4) for t in ts)
    assert all(a[1] <= b[0] for a, b in zip(ends, ends[1:]))  # no overlap
    big = hugepages.arena_empty((3 << 20,), torch.float32)  # 12 MiB: whole huge pages inside it
    big.fill_(1.0)
    m = _mapping_of(ts[0].data_ptr())
    assert m is not None
    if _thp_mode() in ("madvise", "always"):
        first = ts[0].data_ptr() // hugepages.HUGE * hugepages.HUGE  # every page the small tensors touch is huge
        assert m["AnonHugePages"] * 1024 >= max(e for _, e in ends) - first - hugepages.HUGE
    mb = _mapping_of(big.data_ptr())
    huge_before = mb["AnonHugePages"]
    ptr = big.data_ptr()
    del big
    gc.collect()
    mb = _mapping_of(ptr)
    if mb is not None and _thp_mode() in ("madvise", "always"):
        assert mb["AnonHugePages"] <= huge_before - 4 * 2048  # its whole huge pages went back
    temp = hugepages.arena_empty((1000,), torch.float32)  # a temporary freed before the next tensor is made
    where = temp.data_ptr()
    del temp
    gc.collect()
    assert hugepages.arena_empty((10,), torch.float32).data_ptr() == where  # its place is the next one's
    alone = hugepages.arena_empty((hugepages.CHUNK // 4 + 1024,), torch.float32)  # over a chunk: one of its own
    ptr = alone.data_ptr()
    assert _mapping_of(ptr) is not None and hugepages._ARENA.chunk() is not None
    del alone
    gc.collect()
    assert _mapping_of(ptr) is None  # unmapped with its last tensor
