"""The C heap settings of the training process (glibc, CPU): freed activations reused, large blocks never kept.

torch allocates CPU tensors with `malloc`. glibc serves large blocks (above a threshold that adapts up to 32 MB) with
fresh `mmap`s and gives them back to the kernel on free, and trims the top of the heap whenever more than twice that
threshold is free. A training step allocates and frees the same activations and gradients every step. Two things
decide its memory and speed:

- small and middle-sized blocks (hidden states, attention tensors, gradients of a few MB) should come from the
  heap and be reused step after step, instead of being zero-filled anew by the kernel on their first write;
- large blocks (a model's MLP activations, logits chunks) should never sit in the heap: kept and freed in a
  different order each step, they leave holes that smaller blocks split, so later large blocks extend the heap and
  the process grows step after step by hundreds of MB.

`tune_cpu_allocator()` therefore pins the mmap threshold at `MMAP_THRESHOLD` (below it: the heap, reused; from it
on: a mapping of its own, returned on free) and raises the trim threshold so the heap keeps what the next step
reuses (`mallopt`, once per process); elsewhere than glibc it does nothing. `NOMOAT_MALLOC_TUNING=0` leaves the
allocator as it is. Loading trims the heap explicitly (`malloc_trim`, in `models.checkpoint.load_model`), so what a
load frees is not kept either.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 8 << 20  # blocks of this size and more get a mapping of their own, returned on free
_TRIM_THRESHOLD = 1 << 30  # the top of the heap is trimmed only when far more is free than any step reuses
_done: dict[str, bool] = {}


def tune_cpu_allocator() -> bool:
    """Pin glibc's mmap threshold and raise its trim threshold for this process (once); True when they are set.

    Returns False (and changes nothing) off Linux/glibc, when `NOMOAT_MALLOC_TUNING=0`, or when `mallopt` refuses.
    """
    if "result" in _done:
        return _done["result"]
    _done["result"] = False
    if os.environ.get("NOMOAT_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs without mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1:
        logger.debug(
            "malloc: mmap threshold %d MiB, trim threshold %d MiB", MMAP_THRESHOLD >> 20, _TRIM_THRESHOLD >> 20
        )
        _done["result"] = True
    return _done["result"]
