"""What bench_sizes.py and bench_train.py share: the machine line of their JSON summaries, and their ratios."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def describe(threads: int) -> str:
    """The machine, its CPU model, cores and memory, torch's version and the `threads` it ran with, and the OpenMP
    wait policy, in one line."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    except OSError:
        mem = float("nan")
    return (
        f"{platform.machine()} {cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, torch {torch.__version__}, "
        f"torch threads {threads}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}"
    )


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b to 3 decimals; None where either is missing (or zero)."""
    return round(a / b, 3) if a and b else None
