"""Optimizer and learning-rate schedule of a run: AdamW with linear warmup, then cosine, linear or constant."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from nomoat.util.errors import UsageError


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float = 0.0) -> float:
    """The multiplier of the peak learning rate at optimizer step `step` (0-based).

    Warmup rises linearly from `1 / (warmup + 1)` to 1 (never exactly 0, so the first step learns); then `cosine`
    and `linear` fall to `min_ratio` at `total_steps`, and `constant` stays at 1.

    Args:
        step: Optimizer steps taken so far.
        total_steps: Steps in the whole run.
        warmup_steps: Steps of linear warmup.
        schedule: `cosine`, `linear` or `constant`.
        min_ratio: Final multiplier of the decaying schedules.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        decay = 1.0 - progress
    elif schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise UsageError(f"unknown schedule {schedule!r}", hint="use cosine, linear or constant")
    return min_ratio + (1.0 - min_ratio) * decay


def build_optimizer(
    params: Iterable[torch.nn.Parameter],
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (the fused implementation where the parameters allow it).

    Args:
        params: The parameters to train (LoRA matrices and any fully trained modules).
        lr: Peak learning rate.
        weight_decay: Decoupled weight decay.
        betas: Adam betas.
        eps: Adam epsilon.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise UsageError("no trainable parameters", hint="inject a LoRA adapter (or name modules to train) first")
    # The fused kernel updates each tensor in one pass (CPU and CUDA); the foreach path is a loop of ~10 ops per
    # tensor on CPU, which costs more than the adapter's matmuls for small ranks.
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in params)
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             fused=fused or None, foreach=None if fused else True)  # fmt: skip


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` following `lr_factor`; its state (the step count) goes into checkpoints."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, schedule, min_ratio)
    )


def set_schedule_step(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, step: int
) -> None:
    """Put the optimizer's learning rates where `scheduler`'s own schedule has them after `step` steps.

    After a checkpoint is loaded this is what the loaded values already are, unless the run's length changed
    (a resumed run extended with a larger step count follows the longer schedule from `step` on).
    """
    scheduler.last_epoch = step
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports
