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

`arena_empty(shape, dtype)` (and `arena_copy`) is for weights: tensors carved one after another out of shared huge-page
chunks, so that a matrix under 2 MiB (a small model's attention projections) and the tail of a larger one (the last
partial 2 MiB of a 3.5 MB MLP matrix) lie in huge pages too, where `empty` would leave them in 4 KiB pages. Measured
on that VM (SmolLM2-135M shapes, fp32 decode at 2 threads): with `empty`, 302 of the 538 MB of panels were in huge
pages and the q/k/v and o panels streamed at 14 GB/s per thread against 19-20 for the MLP's; all in the arena, every
projection streamed at 24-27 GB/s and a token took 14% less CPU time. A chunk is unmapped when its last tensor goes;
a tensor that goes before its neighbours gives back the whole huge pages inside it (`MADV_DONTNEED`), and the last
tensor made, freed before the next is made (a loader's temporary), gives its place back to the next one.

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
import threading
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


CHUNK = 16 * HUGE  # the arena's least chunk (a larger tensor gets a chunk of its own size, rounded up to 2 MiB)
_ALIGN = 64  # bytes: each arena tensor starts on a cache line
_MADV_DONTNEED = 4


class _Arena:
    """The current chunk (a weak reference: a chunk whose tensors are all gone is unmapped) and its next free byte."""

    def __init__(self) -> None:
        self.lock = threading.RLock()  # a finalizer (`_release`) may run while the lock is held
        self.chunk: weakref.ref[Any] | None = None
        self.used = 0


_ARENA = _Arena()


def _release(base: int, start: int, end: int) -> None:
    """Give back the whole huge pages inside [start, end) of the chunk at `base` (an arena tensor freed).

    The place itself goes back too where nothing was made after it (a temporary).
    """
    with _ARENA.lock:
        chunk = _ARENA.chunk() if _ARENA.chunk is not None else None
        if chunk is not None and ctypes.addressof(chunk) == base and _ARENA.used == _aligned(end - base):
            _ARENA.used = start - base
    a, b = -(-start // HUGE) * HUGE, end // HUGE * HUGE
    if b > a:
        _libc().madvise(a, b - a, _MADV_DONTNEED)


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def arena_empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor carved from the shared huge-page arena (see the module docstring).

    For weights that stream at decode: it starts on a cache line (not on a 2 MiB boundary as `empty`'s do), and
    shares its first and last huge page with the tensors made before and after it. Plain `torch.empty` where huge
    pages are off or unavailable.
    """
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0 or not enabled():
        return torch.empty(shape, dtype=dtype)
    with _ARENA.lock:
        chunk = _ARENA.chunk() if _ARENA.chunk is not None else None
        if chunk is None or len(chunk) - _ARENA.used < nbytes:
            mapped = _mapping(max(CHUNK, -(-nbytes // HUGE) * HUGE))
            if mapped is None:
                return torch.empty(shape, dtype=dtype)
            start, length = mapped
            new = (ctypes.c_char * length).from_address(start)
            release = weakref.finalize(new, _libc().munmap, start, length)
            release.atexit = False
            # the new chunk becomes the current one unless the old has more room left
            if chunk is None or length - nbytes >= len(chunk) - _ARENA.used:
                _ARENA.chunk, _ARENA.used = weakref.ref(new), 0
            chunk, used = new, 0
        else:
            used = _ARENA.used
        if _ARENA.chunk is not None and _ARENA.chunk() is chunk:
            _ARENA.used = _aligned(used + nbytes)
    piece = (ctypes.c_char * nbytes).from_buffer(chunk, used)  # keeps the chunk mapped while it lives
    base = ctypes.addressof(piece)
    weakref.finalize(piece, _release, ctypes.addressof(chunk), base, base + nbytes).atexit = False
    return torch.frombuffer(piece, dtype=dtype, count=math.prod(shape)).view(shape)


def arena_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of CPU tensor `t` made with `arena_empty`."""
    out = arena_empty(t.shape, t.dtype)
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
