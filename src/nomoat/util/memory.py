"""How much memory this process may still use, and the check that runs before a model is loaded.

`available_bytes()` is the smaller of the kernel's `MemAvailable` and what the process's cgroup (v2 or v1) still
allows; `check_fits(needed, what, remedy)` raises `InsufficientMemoryError` with the numbers and the remedy when
`needed` exceeds it, instead of letting the kernel kill the process half-way through a load.

Environment:
    NOMOAT_MEMORY_LIMIT: a ceiling in bytes (suffixes K, M, G, T, powers of 1024; e.g. `8G`) applied on top of
        what the system reports: to plan for a smaller machine, or to test the check.
    NOMOAT_SKIP_MEMORY_CHECK=1: never refuse (the check only warns in the log).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from nomoat.util.errors import ModelError

logger = logging.getLogger(__name__)

LIMIT_ENV = "NOMOAT_MEMORY_LIMIT"
SKIP_ENV = "NOMOAT_SKIP_MEMORY_CHECK"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
# cgroup v1 reports "no limit" as a huge number (PAGE_COUNTER_MAX pages); anything above this is no limit.
_NO_LIMIT = 1 << 60


class InsufficientMemoryError(ModelError):
    """A model (with its KV cache) that needs more memory than the machine has free."""


def parse_bytes(text: str) -> int:
    """`"8G"`, `"512M"`, `"1.5G"` or a plain number of bytes, as bytes (powers of 1024)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)I?B?\s*", text.upper())
    if not m:
        raise ValueError(f"not a size: {text!r} (expected bytes or a number with K, M, G or T)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _meminfo_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """`MemAvailable` (bytes): free memory plus what the kernel can reclaim (page cache), or None off Linux."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """What this process's cgroup still allows (limit minus usage), or None without a limit."""
    v2_limit = root / "memory.max"
    if v2_limit.is_file():
        limit, used = _read_int(v2_limit), _read_int(root / "memory.current")  # "max" reads as None
    else:
        limit = _read_int(root / "memory" / "memory.limit_in_bytes")
        used = _read_int(root / "memory" / "memory.usage_in_bytes")
    if limit is None or limit >= _NO_LIMIT:
        return None
    return max(0, limit - (used or 0))


def available_bytes() -> int | None:
    """Bytes this process can still allocate without swapping or being killed, or None where unknown.

    The smallest of `MemAvailable`, the cgroup's remaining room and `NOMOAT_MEMORY_LIMIT`.
    """
    candidates = [v for v in (_meminfo_available(), _cgroup_room()) if v is not None]
    limit = os.environ.get(LIMIT_ENV)
    if limit:
        candidates.append(parse_bytes(limit))
    return min(candidates) if candidates else None


def gb(n: float) -> str:
    """Bytes as decimal gigabytes with one decimal (`16.1 GB`), as memory is advertised."""
    return f"{n / 1e9:.1f} GB"


def check_fits(needed: int, what: str, remedy: str | None = None) -> None:
    """Raise `InsufficientMemoryError` when `needed` bytes exceed what is available.

    Args:
        needed: Bytes the operation will hold at its peak.
        what: What needs them, for the message ("this model in bfloat16 with a 4096-token KV cache").
        remedy: What the user can do instead (a smaller format, a shorter context); a generic hint when None.

    Raises:
        InsufficientMemoryError: not enough memory, unless `NOMOAT_SKIP_MEMORY_CHECK=1` (then it only logs).
    """
    free = available_bytes()
    if free is None or needed <= free:
        return
    message = f"{what} needs {gb(needed)}, {gb(free)} free"
    if os.environ.get(SKIP_ENV, "0") not in ("", "0"):
        logger.warning("%s; loading anyway (%s is set)", message, SKIP_ENV)
        return
    hint = (remedy + "; " if remedy else "") + f"or set {SKIP_ENV}=1 to load anyway"
    raise InsufficientMemoryError(f"{message}: {remedy}" if remedy else message, hint=hint)
