"""Keep freed memory in the training process, so each step's activations do not page-fault anew (glibc, CPU).

torch allocates CPU tensors with `malloc`. glibc serves large blocks (above a threshold that adapts up to 32 MB) with
fresh `mmap`s and gives them back to the kernel on free, and trims the top of the heap whenever more than twice that
threshold is free. A training step allocates and frees the same few hundred MB of activations and gradients every
step, so without tuning every step touches new pages, which the kernel zero-fills on first write; with the
thresholds raised, the memory freed in one step is what the next reuses, at the same peak RSS.

`tune_cpu_allocator()` raises the mmap and trim thresholds once per process (`mallopt`); elsewhere than glibc it
does nothing. `NOMOAT_MALLOC_TUNING=0` leaves the allocator as it is. The raised trim threshold would also keep what
a model load frees (quantizers' temporaries, a full-precision copy quantized afterwards): loading therefore trims
the heap explicitly (`malloc_trim`, in `models.checkpoint.load_model`), and what stays is only what steps reuse.
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
_MMAP_THRESHOLD = 512 << 20  # blocks up to this come from the heap and are reused; larger ones still use mmap
_FALLBACK_THRESHOLD = 32 << 20  # glibc's own ceiling for the adaptive threshold, accepted by every version
_done: dict[str, bool] = {}


def tune_cpu_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once); True when they are set.

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
    for threshold in (_MMAP_THRESHOLD, _FALLBACK_THRESHOLD):
        if mallopt(_M_MMAP_THRESHOLD, threshold) == 1:
            # Trim only when far more is free than any step reuses (the default is twice the mmap threshold).
            mallopt(_M_TRIM_THRESHOLD, 2 * threshold)
            logger.debug("malloc: mmap threshold %d MiB, trim threshold %d MiB", threshold >> 20, threshold >> 19)
            _done["result"] = True
            break
    return _done["result"]
