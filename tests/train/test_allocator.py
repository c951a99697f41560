"""`tune_cpu_allocator`: freed activations are reused instead of page-faulted anew (glibc only)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = """
import resource, torch
from nomoat.train.allocator import tune_cpu_allocator
tuned = tune_cpu_allocator()
x = torch.randn(1024, 1536)
def step():  # like a training step's activations: several 6 MB blocks live at once, then all freed
    ys = [x * float(i) for i in range(6)]
    return sum(float(y[0, 0]) for y in ys)
for _ in range(3):  # warm up: the first blocks are always new pages
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(int(tuned), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _run(env_value: str) -> tuple[bool, int]:
    env = {**os.environ, "NOMOAT_MALLOC_TUNING": env_value}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    tuned, faults = out.stdout.split()
    return tuned == "1", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_tuned_allocator_reuses_freed_blocks() -> None:
    runs = {value: [_run(value) for _ in range(5)] for value in ("1", "0")}
    assert all(tuned for tuned, _ in runs["1"]) and not any(tuned for tuned, _ in runs["0"])
    faults, faults_default = [f for _, f in runs["1"]], [f for _, f in runs["0"]]
    # 20 steps x 6 blocks x 6 MB write 184,320 pages. The tuned heap keeps and reuses the blocks: every run stays far
    # below that (measured 0 to 4,608 faults, the heap's layout differing from run to run). glibc's default depends on
    # its adaptive thresholds and the process's history: it trimmed and re-faulted every block in one environment
    # (183,680 faults), about 6% of them in another (10,688), and now and then reused them as well (1,536). So each
    # setting is judged by its best of five runs: the tuned heap's is never worse than the default's.
    assert max(faults) < 20_000, faults
    assert min(faults) <= min(faults_default), (faults, faults_default)


BIG = """
import torch
from nomoat.train.allocator import MMAP_THRESHOLD, tune_cpu_allocator

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))

tuned = tune_cpu_allocator()
small = [torch.ones(1 << 16) for _ in range(8)]  # 256 KB blocks from the heap, before and after the large block
big = torch.ones(64 * MMAP_THRESHOLD // 4)  # 16 x the threshold, written
small += [torch.ones(1 << 16) for _ in range(8)]
before = rss()
del big
print(int(tuned), before - rss(), 64 * MMAP_THRESHOLD)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_tuned_allocator_returns_large_blocks_on_free() -> None:
    """A block above the mmap threshold is not kept in the heap once freed, whatever lies around it."""
    out = subprocess.run([sys.executable, "-c", BIG], env={**os.environ, "NOMOAT_MALLOC_TUNING": "1"},
                         capture_output=True, text=True, check=True)  # fmt: skip
    tuned, released, size = (int(v) for v in out.stdout.split())
    assert tuned
    assert released >= 0.95 * size, (released, size)
