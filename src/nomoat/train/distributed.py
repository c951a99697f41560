"""Data-parallel training on `torch.distributed`: joining torchrun's process group, and the loop's collectives.

The collectives are the few the training loop needs: sums of counts and gradients, barrier, broadcast from rank 0.

The loop all-reduces the trained gradients itself once per optimizer step, after all its micro-batches, instead
of wrapping the model in `DistributedDataParallel`: recipes keep calling their model directly (the LoRA head,
the chunked loss and the adapter-disabled reference all work unchanged), accumulation needs no `no_sync`, and the
step's loss is normalised by the label tokens of all ranks (summed here) rather than averaged per rank, so N
processes with batch B take the same step as one process with batch N x B. Each rank is seeded alike before the
recipe builds, and rank 0's trained tensors are broadcast once, so every rank starts from the same weights.

A lost peer (a killed rank, a closed connection, a collective past the process-group timeout) becomes a
`PeerLostError` with a message saying what happened; the checkpoints written so far stay intact.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from nomoat.util.errors import NomoatError, UsageError

T = TypeVar("T")

TIMEOUT_ENV = "NOMOAT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0  # a collective waits this long for a silent peer before the run stops
BUCKET_BYTES = 32 << 20  # gradients are summed in flat buffers of about this size


class PeerLostError(NomoatError, RuntimeError):
    """Another process of a distributed run died, hung or closed its connection; this one stops too."""

    exit_code = 1


def timeout_s() -> float:
    """The process-group timeout in seconds: `NOMOAT_DIST_TIMEOUT`, else 600."""
    value = os.environ.get(TIMEOUT_ENV)
    try:
        return float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        raise UsageError(f"{TIMEOUT_ENV}={value!r} is not a number of seconds") from None


@dataclass
class Distributed:
    """This process's place in a data-parallel run (a single process is rank 0 of 1, and every call is a no-op).

    Attributes:
        rank: Global rank.
        world_size: Number of processes.
        local_rank: Rank on this node (picks the GPU).
        device: The device this rank computes on.
        owns_group: The process group was created here (and is destroyed by `close`).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, writes metrics, checkpoints and the final adapter or model."""
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int]:
        """(rank, world size): which share of each global batch this process takes."""
        return self.rank, self.world_size

    # ---- collectives --------------------------------------------------------------------------------------------

    def _collective(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except (RuntimeError, ConnectionError) as e:  # gloo, nccl and the store raise RuntimeError subclasses
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise PeerLostError(
                f"rank {self.rank} of {self.world_size}: lost contact with the other processes during {what} "
                f"({first}); another process was killed, failed or timed out, so this one stops too",
                hint="the checkpoints written so far are intact: run the same command with --resume (with any "
                "number of processes, keeping batch size x processes)",
            ) from e

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def sum_numbers(self, values: Sequence[float], what: str = "a step") -> list[float]:
        """The sum over all ranks of each value (float64, exact for counts below 2**53)."""
        if not self.enabled:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._comm_device())
        self._collective(what, lambda: dist.all_reduce(t))
        return t.cpu().tolist()

    def sum_gradients(self, params: Iterable[torch.Tensor], what: str = "the gradient sum") -> None:
        """Replace each parameter's gradient by its sum over all ranks.

        A parameter that has a gradient on some rank gets one on every rank (zeros where it had none), so all
        ranks step the same parameters; one that has none anywhere keeps none (the optimizer skips it, as alone).
        """
        if not self.enabled:
            return
        params = list(params)
        has = self.sum_numbers([p.grad is not None for p in params], what)
        grads = []
        for p, n in zip(params, has, strict=True):
            if n > 0:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
        for bucket in _buckets(grads):
            flat = torch.cat([g.reshape(-1) for g in bucket]).to(self._comm_device())
            self._collective(what, lambda flat=flat: dist.all_reduce(flat))
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    def broadcast_tensors(self, tensors: Iterable[torch.Tensor], what: str = "the start") -> None:
        """Overwrite each tensor with rank 0's values."""
        if not self.enabled:
            return
        with torch.no_grad():
            for bucket in _buckets([t.data for t in tensors]):
                flat = torch.cat([t.reshape(-1) for t in bucket]).to(self._comm_device())
                self._collective(what, lambda flat=flat: dist.broadcast(flat, 0))
                offset = 0
                for t in bucket:
                    t.copy_(flat[offset : offset + t.numel()].view_as(t))
                    offset += t.numel()

    def from_main(self, fn: Callable[[], T], what: str = "setup") -> T:
        """Run `fn` on rank 0 only and give every rank its result (rank 0's error is raised on every rank)."""
        if not self.enabled:
            return fn()
        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except Exception as e:  # the others must not wait for a result that never comes
                box[0] = ("error", (str(e), getattr(e, "hint", None)))
                self._collective(what, lambda: dist.broadcast_object_list(box, 0))
                raise
        self._collective(what, lambda: dist.broadcast_object_list(box, 0))
        kind, value = box[0]
        if kind == "error":
            raise NomoatError(f"rank 0 failed during {what}: {value[0]}", hint=value[1])
        return value

    def barrier(self, what: str = "the end of the run") -> None:
        """Wait for every rank."""
        if self.enabled:
            self._collective(what, lambda: dist.barrier())

    def close(self) -> None:
        """Destroy the process group this object created."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def _buckets(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive groups of tensors of one dtype and device, each about `BUCKET_BYTES` (flattened together)."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        if out and out[-1][0].dtype == t.dtype and out[-1][0].device == t.device and size < BUCKET_BYTES:
            out[-1].append(t)
            size += t.numel() * t.element_size()
        else:
            out.append([t])
            size = t.numel() * t.element_size()
    return out


def init(device: torch.device) -> Distributed:
    """Join the run torchrun started (`WORLD_SIZE` > 1 in the environment), or describe a single process.

    On CUDA each rank takes GPU `LOCAL_RANK` and the backend is `nccl`; on CPU it is `gloo`. The process-group
    timeout is `NOMOAT_DIST_TIMEOUT` seconds (default 600): a collective waiting longer for a peer fails.

    Args:
        device: The device the run asked for (`cuda` is narrowed to this rank's GPU).

    Returns:
        The process's rank, world size and device.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s()), **kwargs)
        owns = True
    return Distributed(rank=rank, world_size=world, local_rank=local_rank, device=device, owns_group=owns)


def torchrun_command(nproc: int, args: Sequence[str]) -> list[str]:
    """The command that runs `nomoat ARGS` in `nproc` processes on this machine, through torchrun.

    Args:
        nproc: Processes (one per GPU on a GPU machine).
        args: The nomoat command line after the program name, without `--nproc`.
    """
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "nomoat", *args]  # fmt: skip


def strip_option(args: Sequence[str], option: str) -> list[str]:
    """`args` without `option VALUE` / `option=VALUE`."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == option:
            skip = True
        elif not a.startswith(f"{option}="):
            out.append(a)
    return out


__all__ = ["Distributed", "PeerLostError", "init", "strip_option", "timeout_s", "torchrun_command"]
