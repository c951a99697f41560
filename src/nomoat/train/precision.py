"""The precision a training run computes in (`bf16_autocast`).

`auto` follows the device, the CPU's bf16 support (found at run time) and the dtype the checkpoint was saved in.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

from nomoat.kernels.build import cpu_flags
from nomoat.models.checkpoint import read_hf_config, saved_dtype
from nomoat.util.errors import NomoatError

__all__ = ["bf16_autocast", "cpu_trains_bf16", "half_checkpoint"]


def cpu_trains_bf16() -> bool:
    """Whether this CPU has native bf16 dot products (AVX-512-BF16, AMX-BF16, Arm's BF16), found at run time.

    There bf16 matrix products run several times faster than fp32 ones; with AVX2 alone they are slower.
    `NOMOAT_CPU_BF16=0` (or 1) overrides the detection.
    """
    forced = os.environ.get("NOMOAT_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    flags = cpu_flags()
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "bf16" in flags
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def half_checkpoint(model: Any) -> bool:
    """Whether the checkpoint at `model` was saved in bf16 or fp16 (False when it cannot be read)."""
    if not model:
        return False
    try:
        return saved_dtype(read_hf_config(model)) in ("bfloat16", "float16")
    except (NomoatError, OSError, ValueError):
        return False


def bf16_autocast(dtype: str, device: torch.device, model: Any = None) -> bool:
    """Whether a run computes under bf16 autocast (recipes then load the frozen base in bf16).

    Args:
        dtype: The run's `dtype`: `bfloat16`/`bf16` asks for autocast anywhere, `float32`/`fp32` never; `auto`
            picks it on CUDA, and on a CPU with native bf16 products (`cpu_trains_bf16`) when the checkpoint itself
            is bf16 or fp16 (an fp32 checkpoint trains in fp32).
        device: Where the run computes.
        model: The checkpoint (folder or file) the run trains, when there is one.
    """
    if dtype in ("bfloat16", "bf16"):
        return True
    if dtype != "auto":
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and cpu_trains_bf16() and half_checkpoint(model)
