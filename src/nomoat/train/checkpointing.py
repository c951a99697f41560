"""Training checkpoints: everything needed to continue a run exactly, written atomically, never pickled.

A checkpoint is a folder `checkpoints/step-000120/` holding:

- `trainable.safetensors`: the trained tensors (LoRA matrices, fully trained modules), by parameter name;
- `optimizer.safetensors` + `optimizer.json`: AdamW's moment tensors, and its param groups and scalars;
- `rng.safetensors`: the torch CPU (and CUDA) generator states;
- `state.json`: step, data position, scheduler state, Python's RNG state, counters and the last metrics.

The folder is written under a temporary name and renamed into place, so a run killed at any moment leaves either
the previous checkpoint or the new one, never half of one; the temporary folders such a kill leaves are removed
before the next write (`remove_stale_temp`). A write that fails for want of space says where and how much is
needed (`DiskFullError`). Tensors load from safetensors only (no unpickling). This module also owns the errors about
a run folder's state (one to resume, one already there).
"""

from __future__ import annotations

import errno
import json
import random
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nomoat.util.errors import InputError, NomoatError, UsageError
from nomoat.util.files import atomic_dir, read_json

PREFIX = "step-"
TEMP_PREFIX = ".tmp-"  # `atomic_dir`'s temporary folders


class CheckpointNotFoundError(InputError, FileNotFoundError):
    """No checkpoint to resume from."""


class RunNotFoundError(InputError, FileNotFoundError):
    """A run to resume does not exist."""


class RunExistsError(UsageError, FileExistsError):
    """A new run would overwrite one already in its folder."""


class DiskFullError(NomoatError, OSError):
    """A checkpoint or an adapter could not be written: the disk is full (or the write failed)."""


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


@contextmanager
def disk_errors(folder: str | Path, what: str, needed: Callable[[], int]) -> Iterator[None]:
    """Turn a failed write (OSError, safetensors' IO error) of `what` into `folder` into a `DiskFullError`.

    Args:
        folder: Where the files go (its free space is reported).
        what: What was being written, for the message.
        needed: Bytes the write needs (called only on failure).
    """
    try:
        yield
    except (OSError, SafetensorError) as e:
        if isinstance(e, DiskFullError):
            raise
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(
            word in str(e) for word in ("No space left", "StorageFull", "Disk quota"))  # fmt: skip
        parent = Path(folder)
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        try:
            free = _size(shutil.disk_usage(parent).free)
        except OSError:
            free = "unknown"
        reason = "the disk is full" if full else (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DiskFullError(
            f"could not write {what} to {folder}: {reason} (it needs about {_size(needed())}, {free} free there)",
            hint="free some space (or choose a folder on a larger disk with --output-dir), then run the same command "
            "with --resume: the checkpoints written before are intact",
        ) from None


def remove_stale_temp(run_dir: str | Path) -> None:
    """Remove the temporary folders that writes of checkpoints killed midway left in `run_dir/checkpoints`."""
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for stale in root.iterdir():
            if stale.name.startswith(TEMP_PREFIX) and stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars, "ids": list(sd["state"].keys())}


def _optimizer_from_files(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, values in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> tuple[dict[str, torch.Tensor], Any]:
    """This process's torch generator states (CPU, every CUDA device) as tensors, and Python's RNG state."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    return tensors, random.getstate()


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write a checkpoint for optimizer step `step` atomically and prune older ones.

    Args:
        run_dir: The run folder; checkpoints go to `run_dir/checkpoints/step-XXXXXX`.
        step: Optimizer steps completed.
        trainable: Name -> tensor of everything that trains.
        optimizer: The optimizer (its moments are saved).
        scheduler: The learning-rate scheduler.
        state: JSON-serialisable run state (data position, counters, metrics).
        keep: Checkpoints kept (the newest ones).

    Returns:
        The checkpoint folder.
    """
    root = Path(run_dir) / "checkpoints"
    final = root / f"{PREFIX}{step:06d}"
    remove_stale_temp(run_dir)  # what a killed write left must not fill the disk again
    tensors = {k: v.detach().contiguous().cpu() for k, v in trainable.items()}
    opt_tensors, opt_meta = _optimizer_to_files(optimizer)

    def needed() -> int:
        return sum(t.numel() * t.element_size() for t in [*tensors.values(), *opt_tensors.values()]) + (1 << 16)

    with disk_errors(root, f"checkpoint {final.name}", needed), atomic_dir(final, TEMP_PREFIX) as tmp:
        save_file(tensors, str(tmp / "trainable.safetensors"))  # the folder is flushed before it becomes visible
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
        rng_tensors, py_rng = rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        sched = scheduler.state_dict()  # plain numbers; a lambda is stored as None and rebuilt by the run
        payload = {"step": step, "scheduler": sched, "python_rng": py_rng, **state}
        (tmp / "state.json").write_text(json.dumps(payload, indent=1))
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


_SCHEDULE_FLAGS = {"lr": "--lr", "weight_decay": "--weight-decay", "schedule": "--schedule",
                   "warmup_steps": "--warmup-steps", "min_lr_ratio": "min_lr_ratio"}  # fmt: skip


def check_schedule(
    ckpt: Path, state: dict[str, Any], now: dict[str, Any], warmup_given: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Compare the schedule a checkpoint was trained with (`state["schedule"]`) with the one asked for now.

    Args:
        ckpt: The checkpoint folder (for the message).
        state: Its `state.json`.
        now: The run's schedule: lr, weight_decay, schedule, warmup_steps, min_lr_ratio, total_steps.
        warmup_given: The warmup was given in steps (else it came from a ratio of the run's length, and a longer
            run keeps the warmup it had).

    Returns:
        The saved schedule (`total_steps` None where unknown) and the one to use now.

    Raises:
        UsageError: A learning rate, weight decay, schedule or warmup that differs, named by its flag.
    """
    saved = dict(state.get("schedule") or {"lr": (state.get("scheduler") or {}).get("base_lrs", [None])[0]})
    now = dict(now)
    if not warmup_given and "warmup_steps" in saved:
        now["warmup_steps"] = saved["warmup_steps"]
    for key, flag in _SCHEDULE_FLAGS.items():
        if saved.get(key) is not None and saved[key] != now[key]:
            raise UsageError(f"{ckpt}: the run was trained with {flag} {saved[key]}, this command asks for {now[key]}",
                             hint=f"resume with {flag} {saved[key]} (see config.yaml in the run folder), or start "
                             "a new run with another --name")  # fmt: skip
    saved.setdefault("total_steps", None)
    return saved, now


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders of an interrupted write are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The newest complete checkpoint of a run.

    Raises:
        CheckpointNotFoundError: The run has none.
    """
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointNotFoundError(
            f"{run_dir}: no checkpoint to resume from (checkpoints are written every save_every steps)",
            hint="start the run without --resume",
        )
    return found[-1]


def load_checkpoint(
    path: str | Path,
    params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Restore trained tensors, optimizer, scheduler and RNG states from a checkpoint folder.

    Args:
        path: A checkpoint folder written by `save_checkpoint`.
        params: Name -> parameter of the model being trained (the same names that were saved).
        optimizer: The run's optimizer, built over the same parameters in the same order.
        scheduler: The run's scheduler.

    Returns:
        The saved run state (`state.json`): step, data position, counters.

    Raises:
        InputError: The checkpoint's tensors do not match the model's trainable parameters.
    """
    path = Path(path)
    trainable = load_file(str(path / "trainable.safetensors"))
    missing = sorted(set(params) - set(trainable))
    extra = sorted(set(trainable) - set(params))
    if missing or extra:
        raise InputError(
            f"{path}: checkpoint does not match this run's adapter (missing {missing[:3]}, unexpected {extra[:3]})",
            hint="resume with the same model and LoRA settings",
        )
    with torch.no_grad():
        for name, tensor in trainable.items():
            if params[name].shape != tensor.shape:
                shapes = f"{tuple(tensor.shape)}, the model {tuple(params[name].shape)}"
                raise InputError(f"{path}: {name} has shape {shapes}",
                                 hint="resume with the same model and LoRA settings")  # fmt: skip
            params[name].copy_(tensor)
    device = next(iter(params.values())).device
    opt_tensors = {k: v.to(device) if not k.endswith(".step") else v for k, v in
                   load_file(str(path / "optimizer.safetensors")).items()}  # fmt: skip
    _optimizer_from_files(optimizer, opt_tensors, read_json(path / "optimizer.json", error=InputError))
    state = read_json(path / "state.json", error=InputError)
    scheduler.load_state_dict(state["scheduler"])
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    py = state["python_rng"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    return state
