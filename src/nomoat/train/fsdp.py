"""Sharded training (`--fsdp`): the frozen base and the adapter split over the processes of a torchrun run.

FSDP2 (`torch.distributed.fsdp.fully_shard`) shards every decoder layer and then the whole model, so each process
holds 1/N of every weight and gathers one layer at a time for its forward and backward passes. Gradients are
reduce-scattered as sums (the loop normalises the step's loss by the label tokens of all ranks, as in data
parallelism), so N sharded processes take the same step as one process with the global batch.

Checkpoints are written with `torch.distributed.checkpoint` (every rank writes its shards of the trained tensors
and their optimizer moments, frozen weights excluded) into the same `checkpoints/step-N/` folders as unsharded
runs, with rank 0's `state.json` and RNG state beside them; they can be resumed with another number of processes.
The adapter written at the end is a plain PEFT adapter: its tensors are gathered whole on rank 0 for the save.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nomoat.train.checkpointing import PREFIX, TEMP_PREFIX, disk_errors, list_checkpoints, rng_state
from nomoat.train.distributed import Distributed
from nomoat.util.errors import InputError, UsageError
from nomoat.util.files import read_json

SHARDS = "sharded"  # the checkpoint's subfolder written by torch.distributed.checkpoint


def shard_model(model: nn.Module, dist: Distributed) -> None:
    """Apply FSDP2 to each decoder layer, then to the whole model (embeddings, final norm, head), in place.

    Args:
        model: The model with LoRA injected (trained tensors fp32, the base in its dtype).
        dist: The run's process group (rank 0's trained tensors were broadcast before).
    """
    from torch.distributed.fsdp import fully_shard

    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None:
        raise UsageError(f"--fsdp: {type(model).__name__} has no decoder layers to shard")
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    for module in model.modules():  # sums, not means: the loop already divided by the units of all ranks
        if hasattr(module, "set_gradient_divide_factor"):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain sums: gloo has no pre-multiplied sum


def sharded_parameters(model: nn.Module, names: list[str]) -> dict[str, nn.Parameter]:
    """The (now sharded) parameters of `names`, by name, after `shard_model` replaced them."""
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise RuntimeError(f"--fsdp: parameters lost in sharding: {missing[:3]}")
    return {n: params[n] for n in names}


def as_float(value: torch.Tensor | float) -> float:
    """A (possibly sharded, DTensor) scalar as a Python float (a collective for a DTensor)."""
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return float(value)


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))


def save_sharded(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict[str, Any],
    dist: Distributed,
    keep: int = 2,
) -> Path:
    """Write `checkpoints/step-N/` from every rank (shards) and rank 0 (state, RNG); atomic as a folder.

    All ranks call this together. The folder is written under a temporary name that rank 0 renames once every
    rank's shards are on disk.
    """
    import torch.distributed.checkpoint as dcp

    root = run_dir / "checkpoints"
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f"{TEMP_PREFIX}{final.name}-sharded"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier("a checkpoint")
    model_sd, optim_sd = _state_dicts(model, optimizer)
    size = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) * 3
    with disk_errors(root, f"checkpoint {final.name}", lambda: size):
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / SHARDS))
        dist.barrier("a checkpoint")
        if dist.is_main:
            rng, py_rng = rng_state()
            save_file(rng, str(tmp / "rng.safetensors"))
            payload = {"step": step, "scheduler": scheduler.state_dict(), "python_rng": py_rng, "sharded": True,
                       "world_size": dist.world_size, **state}  # fmt: skip
            (tmp / "state.json").write_text(json.dumps(payload, indent=1))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier("a checkpoint")
    return final


def load_sharded(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Restore a checkpoint written by `save_sharded` (any number of processes); returns its `state.json`."""
    import random

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = read_json(path / "state.json", error=InputError)
    model_sd, optim_sd = _state_dicts(model, optimizer)
    loaded = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(loaded, checkpoint_id=str(path / SHARDS))
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))  # fmt: skip
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(load_file(str(path / "rng.safetensors"))["torch_cpu"])
    py = state["python_rng"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    return state


@contextlib.contextmanager
def gathered(params: dict[str, nn.Parameter], model: nn.Module, dist: Distributed) -> Iterator[None]:
    """Within the block, rank 0's model holds whole (unsharded) copies of `params`, e.g. to save the adapter.

    Every rank enters (gathering is a collective); the sharded parameters are put back at the end.
    """
    full = {name: p.full_tensor() if hasattr(p, "full_tensor") else p.data for name, p in params.items()}
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        if dist.is_main:
            for name, tensor in full.items():
                owner_name, _, leaf = name.rpartition(".")
                owner = model.get_submodule(owner_name)
                swapped.append((owner, leaf, owner._parameters[leaf]))
                owner._parameters[leaf] = nn.Parameter(tensor.detach().clone(), requires_grad=True)
        yield
    finally:
        for owner, leaf, original in swapped:
            owner._parameters[leaf] = original


def check_kind(path: Path, sharded: bool) -> None:
    """Refuse to resume a sharded checkpoint without `--fsdp`, or an unsharded one with it."""
    if (path / SHARDS).is_dir() and not sharded:
        raise UsageError(f"{path} was written by an --fsdp run", hint="resume it with --fsdp under torchrun")
    if sharded and not (path / SHARDS).is_dir():
        raise UsageError(f"{path} was written without --fsdp", hint="resume it without --fsdp")


__all__ = ["as_float", "check_kind", "gathered", "load_sharded", "save_sharded", "shard_model",
           "sharded_parameters"]  # fmt: skip
