"""Tensors in transparent huge pages, for weights and caches that decode streams from memory every token.

Decode at batch 1 reads every weight once per token, so its speed is the memory bandwidth the cores reach. With 4 KiB
pages a stream of 500 MB crosses 120,000 pages, and in a virtual machine every TLB miss walks two page tables (the
guest's and the host's). With 2 MiB pages the walks all but disappear. Measured on the 2-core AMD EPYC VM nomoat is
tuned on (`linear_fp32` over a 226 MB matrix, best of 6 interleaved passes): one thread 23-24 -> 28-29 GB/s,
two threads 28-30 -> 31-33 GB/s.

`empty(shape, dtype)` maps anonymous memory aligned to 2 MiB, trims the mapping to the tensor's size (so nothing
beyond it is ever backed by a page) and asks the kernel for huge pages (`madvise(MADV_HUGEPAGE)`, honoured where
`/sys/kernel/mm/transparent_hugepage/enabled` is `madvise` or `always`) before any page is touched, so that the
first write faults huge pages in directly. The mapping is unmapped when the tensor's storage is freed. Tensors under
2 MiB, platforms other than Linux, `NOMOAT_HUGE_PAGES=0` and any failure get plain `torch.empty`.

`advise(t)` moves a tensor that already exists (a weight decode reads in place) into huge pages where it lies: the
kernel copies each whole 2 MiB stretch inside it into a huge page (`MADV_COLLAPSE`, Linux 6.1+; one stretch at a time,
so memory never grows by more than a page); elsewhere it is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import math
import mmap
import os
import sys
import weakref
from typing import Any

import torch

logger = logging.getLogger(__name__)

HUGE = 2 << 20  # bytes of an x86-64 / arm64 transparent huge page
_MADV_HUGEPAGE = 14
_MADV_COLLAPSE = 25
_PROT = mmap.PROT_READ | mmap.PROT_WRITE
_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
_FAILED = ctypes.c_void_p(-1).value


@functools.cache
def _libc() -> Any:
    """The C library with mmap, munmap and madvise typed, or None where unavailable."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]  # fmt: skip
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


def enabled() -> bool:
    """Whether `empty` may place tensors in huge pages here (Linux, libc found, `NOMOAT_HUGE_PAGES` not 0)."""
    return os.environ.get("NOMOAT_HUGE_PAGES", "1") != "0" and _libc() is not None


def _mapping(nbytes: int) -> tuple[int, int] | None:
    """A fresh anonymous mapping of `nbytes` (rounded up to pages), 2 MiB-aligned and advised for huge pages.

    Returns (address, length), or None on failure.
    """
    libc = _libc()
    length = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
    raw = libc.mmap(None, length + HUGE, _PROT, _FLAGS, -1, 0)
    if raw is None or raw == _FAILED:
        return None
    start = -(-raw // HUGE) * HUGE
    if start > raw:  # give back the slack before and after, so the mapping is exactly [start, start + length)
        libc.munmap(raw, start - raw)
    libc.munmap(start + length, raw + HUGE - start)
    if libc.madvise(start, length, _MADV_HUGEPAGE) != 0:
        logger.debug("madvise(MADV_HUGEPAGE) failed (errno %d); 4 KiB pages", ctypes.get_errno())
    return start, length


def empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor, in transparent huge pages where possible (see the module docstring).

    Args:
        shape: The tensor's shape.
        dtype: Its dtype.
    """
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes < HUGE or not enabled():
        return torch.empty(shape, dtype=dtype)
    mapped = _mapping(nbytes)
    if mapped is None:
        return torch.empty(shape, dtype=dtype)
    start, length = mapped
    buf = (ctypes.c_char * length).from_address(start)
    release = weakref.finalize(buf, _libc().munmap, start, length)  # the storage holds `buf`; freed with it
    release.atexit = False  # at exit the process's memory goes anyway; unmapping then could pull it from under a tensor
    return torch.frombuffer(buf, dtype=dtype, count=math.prod(shape)).view(shape)


def advise(t: torch.Tensor) -> bool:
    """Put the whole 2 MiB stretches of CPU tensor `t`'s memory in huge pages, in place (see the module docstring).

    Returns True where the kernel did; False for tensors without a whole aligned stretch, with huge pages disabled,
    off Linux, or where the kernel refuses (too old, file-backed memory): `t` is unchanged either way.
    """
    if t.device.type != "cpu" or not t.is_contiguous() or not enabled():
        return False
    start = t.data_ptr()  # the view's own first element
    first = -(-start // HUGE) * HUGE
    last = (start + t.numel() * t.element_size()) // HUGE * HUGE
    if last <= first:
        return False
    libc = _libc()
    libc.madvise(first, last - first, _MADV_HUGEPAGE)  # keep them huge (khugepaged, later faults)
    if libc.madvise(first, last - first, _MADV_COLLAPSE) != 0:
        logger.debug("madvise(MADV_COLLAPSE) failed (errno %d); 4 KiB pages stay", ctypes.get_errno())
        return False
    return True


def copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of CPU tensor `t` made with `empty` (huge pages where possible)."""
    out = empty(t.shape, t.dtype)
    out.copy_(t)
    return out


def release_freed_memory() -> None:
    """Give memory the C heap holds but no tensor uses back to the system (glibc's `malloc_trim`).

    Called after weights were copied into another layout: the freed originals (hundreds of MB) would otherwise stay
    in the process's resident memory, because glibc keeps large freed blocks in its heap once its mmap threshold has
    grown. A no-op where the C library has no `malloc_trim`.
    """
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
        trim(0)
