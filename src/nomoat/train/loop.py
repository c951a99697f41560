"""The one training loop: every training method is a recipe on top of `TrainingLoop`.

The loop owns what every method shares: device and precision (bf16 autocast), seeding, gradient accumulation (the
loss of an optimizer step is normalised over all the units, e.g. label tokens, of its micro-batches), clipping,
the NaN stop (`TrainingDivergedError`), AdamW and the learning-rate schedule, atomic checkpoints and exact resume
(trained tensors, optimizer, schedule, RNG states, data position), metrics (`metrics.jsonl`, TensorBoard, the loss
PNG), the progress bar, and Ctrl-C / SIGTERM (the step in flight finishes, a checkpoint is written, then
`KeyboardInterrupt` is raised; a second Ctrl-C stops at once and leaves the last checkpoint as it was, and while a
checkpoint is being written Ctrl-C waits for it to be complete).

Resume (`settings.resume`) continues from the newest checkpoint; a run that stopped before its first one starts
afresh (with a notice). The checkpoint records the schedule it was trained with: a different learning rate, weight
decay, schedule or warmup is refused, while a larger step count extends the run (the schedule is then the one of
the longer run, from the step reached). A run that had taken all its steps only writes its output again, from the
last checkpoint, where `finished_output()` does not exist yet; where it does, resuming is refused.

A recipe subclasses `TrainingLoop` and supplies what is its own:

- `build()`: the run folder (`run_dir`, `name`), the model, `params` (name -> every tensor that trains and is
  checkpointed), `stream` (restartable micro-batches with `state_dict()` / `load_state_dict()`; iterating it yields
  the rest of an epoch), `total_steps`, and optionally `val_batches`;
- `loss(batch) -> (loss_sum, count)`: the summed loss of one micro-batch (already on the device, run under the
  loop's autocast) and how many units it sums over;
- `finish(result)`: what a finished run saves and returns (an adapter, a model folder).

Optional hooks: `units(batch)` (what the step normalises by, known before the forward pass; default
`num_label_tokens`), `prepare_step(micro)` (turns the step's micro-batches into what `loss` takes), `tokens(batch)`,
`step_metrics(micro, units)`, `build_optimizer()`, `write_run_config()`.

Several processes (torchrun; `nomoat.train.distributed`): the loop joins the process group in `setup`, so a recipe
sees `self.dist` (rank, world size) in `build()` and must shard its data: its `stream` holds global batches
(batch size x processes) of which each rank takes its `shard` (a `BatchStream(..., shard=self.dist.shard)`). The
loop sums the step's units, loss and gradients over the ranks (so the step equals one process with the global
batch), agrees on stopping after a signal, and only rank 0 logs, writes metrics and checkpoints; `finish` runs on
every rank (a recipe writes its output when `self.dist.is_main`), then all ranks wait for it.

How the other methods fit:

- Preference tuning (DPO and its family): each batch holds the chosen and rejected sequences of its pairs;
  `units` counts pairs; `loss` runs the policy on both sequences, runs the frozen reference (the same model under
  `nomoat.lora.disable_lora` and `torch.no_grad()`) on both, and returns the summed pair losses. The reference
  costs no memory of its own and is never trained or checkpointed, since `params` holds the adapter only.
- RL (GRPO, RLOO): `stream` yields prompt batches; `prepare_step` generates the rollouts of the whole step with
  the current policy (no grad), scores them and computes group-normalised advantages (a group can span
  micro-batches, which is why it sees them all); `units` counts completion tokens (or sequences) and `loss` is the
  policy-gradient loss with an optional KL term against the adapter-disabled reference. Sampling draws from the
  torch RNG, which checkpoints restore, so a resumed run regenerates the same rollouts; a stream that keeps a
  buffer puts it in its `state_dict()`.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from nomoat.data import NoTrainableTokensError
from nomoat.models.checkpoint import resolve_device
from nomoat.train import distributed, fsdp
from nomoat.train.allocator import tune_cpu_allocator
from nomoat.train.checkpointing import (
    check_schedule,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    remove_stale_temp,
    save_checkpoint,
)
from nomoat.train.metrics import MetricsWriter, make_progress, plot_loss_curve
from nomoat.train.optim import build_optimizer, build_scheduler, set_schedule_step
from nomoat.train.precision import bf16_autocast
from nomoat.util.errors import NomoatError, UsageError
from nomoat.util.files import read_json, read_jsonl

Batch = dict[str, Any]



@contextlib.contextmanager
def _handling_signals(handler: Any) -> Iterator[None]:
    """Within it, SIGINT and SIGTERM go to `handler`; the previous handlers come back after (main thread only)."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)

class TrainingDivergedError(NomoatError, RuntimeError):
    """The loss or the gradient norm became NaN or infinite; the run stops without saving the broken state."""


@dataclass
class LoopSettings:
    """The knobs the loop reads, taken by name from a recipe's config (`LoopSettings.of`); absent ones default.

    Attributes:
        device: `auto`, `cpu` or `cuda[:N]`.
        dtype: `auto` (bf16 autocast on CUDA, and on CPUs with native bf16 products for a bf16/fp16 checkpoint),
            `float32` or `bfloat16` (bf16 autocast anywhere).
        seed: Seed of torch's and Python's generators, set before the recipe builds anything.
        grad_accum: Micro-batches per optimizer step.
        max_grad_norm: Global gradient-norm clipping (0: off).
        lr: Peak learning rate.
        schedule: `cosine`, `linear` or `constant`.
        warmup_steps: Linear warmup steps; None: `warmup_ratio` of the run.
        warmup_ratio: Warmup as a fraction of the run when `warmup_steps` is None.
        min_lr_ratio: Final learning rate as a fraction of `lr`.
        weight_decay: AdamW decoupled weight decay.
        betas: AdamW betas.
        eps: AdamW epsilon.
        eval_every: Steps between validations (0: only at the end, when there is a validation set).
        save_every: Steps between checkpoints (0: only at the end).
        keep_checkpoints: Checkpoints kept.
        log_every: Steps between metric lines.
        resume: Continue from the run's newest checkpoint.
        fsdp: With several processes, shard the model and the trained tensors over them (`nomoat.train.fsdp`).
    """

    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    lr: float = 1e-4
    schedule: str = "cosine"
    warmup_steps: int | None = None
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 10
    resume: bool = False
    fsdp: bool = False

    @classmethod
    def of(cls, config: Any) -> LoopSettings:
        """The settings of `config`: each field read from the attribute of the same name, where it has one."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls) if hasattr(config, f.name)})


@dataclass
class LoopResult:
    """What `TrainingLoop.train` did in this process.

    Attributes:
        steps: Optimizer steps taken in total (resumed ones included).
        losses: Training loss of every step of this process.
        last: The last step's metrics record.
        val_loss: Last validation loss, if any.
        tokens: Tokens processed in this process.
        seconds: Wall time of the loop in this process.
    """

    steps: int
    losses: list[float] = field(default_factory=list)
    last: dict[str, Any] = field(default_factory=dict)
    val_loss: float | None = None
    tokens: int = 0
    seconds: float = 0.0


class TrainingLoop:
    """The shared loop; subclass it with a recipe (see the module docstring for what a recipe supplies).

    Args:
        config: The recipe's configuration (the loop reads `LoopSettings` from it by name).
        console: Where progress and messages go (a quiet console silences them).
        progress: Show the live progress bar.
    """

    label = "train"  # the progress task's name
    resume_requires_checkpoint = False  # True: resuming a run that never saved a checkpoint is an error
    log_tokens_per_s = True  # metric lines carry the step's throughput

    def __init__(self, config: Any, console: Console | None = None, progress: bool = True) -> None:
        self.cfg = config
        self.settings = LoopSettings.of(config)
        self.console = console or Console(stderr=True)
        self.show_progress = progress
        self.step = 0
        self.tokens_seen = 0
        self.losses: list[float] = []
        self.val_batches: list[Batch] = []
        self.name = ""
        self._batches: Iterator[Batch] | None = None
        self._consistent = True  # False while a step is half done (its state must not be checkpointed)
        self._stop: str | None = None
        self._saved_step = -1
        self._stop_all = False  # every rank agreed to stop after this step
        self._resumed_last: dict[str, Any] = {}  # the checkpoint's last metrics record (a finished run's result)
        self.created_run_dir = False  # `build()` made `run_dir`: a run that fails to start removes it while empty
        self.dist = distributed.Distributed()

    # ---- what a recipe supplies -------------------------------------------------------------------------------

    def build(self) -> None:
        """Set `run_dir`, `name`, `model`, `params`, `stream`, `total_steps` (and `val_batches`)."""
        raise NotImplementedError

    def loss(self, batch: Batch) -> tuple[torch.Tensor, int]:
        """The summed loss of one micro-batch (a 0-dim tensor with grad) and the units it sums over."""
        raise NotImplementedError

    def finish(self, result: LoopResult) -> Any:
        """Save what the run produced and return the recipe's result (default: the loop's)."""
        return result

    def units(self, batch: Batch) -> int:
        """What a step's loss is averaged over, counted before the forward pass (default: label tokens)."""
        return int(batch["num_label_tokens"])

    def prepare_step(self, micro: list[Batch]) -> list[Batch]:
        """Turn a step's micro-batches into what `loss` takes (RL: rollouts, rewards, advantages)."""
        return micro

    def tokens(self, batch: Batch) -> int:
        """Input tokens of a micro-batch, padding excluded."""
        return int((batch["segment_ids"] != 0).sum())

    def step_metrics(self, micro: list[Batch], units: int) -> dict[str, Any]:
        """Extra fields of a step's metrics record."""
        return {}

    def build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over `params`."""
        s = self.settings
        return build_optimizer(self.params.values(), s.lr, s.weight_decay, s.betas, s.eps)

    def write_run_config(self) -> None:
        """Record the run's configuration in `run_dir`."""

    def finished_output(self) -> Path | None:
        """What a finished run wrote (e.g. its adapter folder) if it exists; resuming such a run is refused."""
        return None

    @property
    def resume_flags(self) -> str:
        """What to add to the same command to continue an interrupted run."""
        return "--resume"

    # ---- setup ------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Pick device and precision, seed, let the recipe build, then optimizer, schedule, resume and metrics."""
        s = self.settings
        self.dist = distributed.init(resolve_device(s.device))
        self.device = self.dist.device
        if not self.dist.is_main:  # rank 0 speaks for the run
            self.console, self.show_progress = Console(quiet=True), False
        if self.device.type == "cpu":
            tune_cpu_allocator()  # activations reuse freed memory instead of page-faulting anew each step
        self.autocast = bf16_autocast(s.dtype, self.device, getattr(self.cfg, "model", None))
        torch.manual_seed(s.seed)
        random.seed(s.seed)
        self.build()
        if self.dist.enabled:
            if getattr(self.stream, "shard", None) != self.dist.shard:
                raise UsageError(f"{type(self).__name__} does not shard its data across processes",
                                 hint="run it in one process (without torchrun or --nproc)")  # fmt: skip
            self.dist.broadcast_tensors(self.params.values())
            if self.sharded:
                fsdp.shard_model(self.model, self.dist)
                self.params = fsdp.sharded_parameters(self.model, list(self.params))
        self.optimizer = self.build_optimizer()
        warmup = s.warmup_steps if s.warmup_steps is not None else int(s.warmup_ratio * self.total_steps)
        self.schedule = {"lr": s.lr, "weight_decay": s.weight_decay, "schedule": s.schedule, "warmup_steps": warmup,
                         "min_lr_ratio": s.min_lr_ratio, "total_steps": self.total_steps}  # fmt: skip
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, warmup, s.schedule, s.min_lr_ratio)
        resume_step = self._resume()
        self._batches = None
        if self.dist.rank > 0:  # dropout and sampling differ between ranks (rank 0 keeps the one-process stream)
            torch.manual_seed(s.seed + 7919 * self.dist.rank + self.step)
        if self.dist.is_main:
            self.metrics: MetricsWriter | _NoMetrics = MetricsWriter(self.run_dir, resume_step=resume_step)
            self.write_run_config()
        else:
            self.metrics = _NoMetrics(self.run_dir)

    def _resume(self) -> int | None:
        if not self.settings.resume:
            return None
        if self.dist.is_main:
            remove_stale_temp(self.run_dir)
        if not self.resume_requires_checkpoint and not list_checkpoints(self.run_dir):
            self.console.print(f"[yellow]{self.run_dir} has no checkpoint yet (it stopped before its first one): "
                               "starting it from step 0[/yellow]")  # fmt: skip
            return 0  # metrics of the lost attempt are dropped
        ckpt = latest_checkpoint(self.run_dir)
        fsdp.check_kind(ckpt, self.sharded)
        saved = self._check_schedule(ckpt, read_json(ckpt / "state.json", error=UsageError))
        if self.sharded:
            state = fsdp.load_sharded(ckpt, self.model, self.optimizer, self.scheduler)
        else:
            state = load_checkpoint(ckpt, self.params, self.optimizer, self.scheduler)
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.stream.load_state_dict(state["data"])
        self._resumed_last = dict(state.get("last") or {})
        set_schedule_step(self.optimizer, self.scheduler, self.step)  # the lr of this run's schedule at this step
        self.console.print(f"[bold]resumed[/bold] from {ckpt} (step {self.step}/{self.total_steps})")
        if saved["total_steps"] not in (None, self.total_steps) and self.step < self.total_steps:
            self.console.print(f"[yellow]the run was for {saved['total_steps']} steps, now {self.total_steps}: the "
                               "learning rate follows the longer schedule from this step on[/yellow]")  # fmt: skip
        if self.step > self.total_steps:
            raise UsageError(f"{self.run_dir} has already taken {self.step} steps, more than the {self.total_steps} "
                             "asked for", hint=f"resume with --max-steps {self.step} or more")  # fmt: skip
        if self.step == self.total_steps:
            out = self.finished_output()
            if out is not None:
                raise UsageError(f"{self.run_dir} has finished: all its {self.step} steps are done and its output "
                                 f"is in {out}", hint="to train further resume with a larger --max-steps; for a new "
                                 "run pass another --name")  # fmt: skip
            self.console.print(f"[yellow]all {self.step} steps were done before the run stopped: writing its "
                               "output from the last checkpoint[/yellow]")  # fmt: skip
        return self.step

    def _check_schedule(self, ckpt: Path, state: dict[str, Any]) -> dict[str, Any]:
        """Refuse another learning rate or schedule; rebuild the schedule with the saved warmup; the saved one."""
        saved, now = check_schedule(ckpt, state, self.schedule, warmup_given=self.settings.warmup_steps is not None)
        if now != self.schedule:
            self.schedule = now
            self.scheduler = build_scheduler(self.optimizer, self.total_steps, now["warmup_steps"], now["schedule"],
                                             now["min_lr_ratio"])  # fmt: skip
        return saved

    # ---- one step ---------------------------------------------------------------------------------------------

    def _next_batch(self) -> Batch:
        """The next micro-batch; epochs follow one another without end (the step count decides when to stop)."""
        for _ in range(2):
            if self._batches is None:
                self._batches = iter(self.stream)
            batch = next(self._batches, None)
            if batch is not None:
                return batch
            self._batches = None
        raise RuntimeError("the batch stream is empty")

    def autocast_context(self) -> contextlib.AbstractContextManager:
        """The loop's precision: bf16 autocast on the device, or nothing."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()

    def loss_step(self, batch: Batch) -> tuple[torch.Tensor, int]:
        """`loss` of one micro-batch, its tensors moved to the device, under the loop's precision."""
        b = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with self.autocast_context():
            return self.loss(b)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over `grad_accum` micro-batches; the loss is the mean over all their units."""
        self._consistent = False
        micro = self.prepare_step([self._next_batch() for _ in range(self.settings.grad_accum)])
        n_total = sum(self.units(b) for b in micro)
        tokens = sum(self.tokens(b) for b in micro)
        if self.dist.enabled:  # the step is normalised over the units of every rank
            n_total, tokens = (int(v) for v in self.dist.sum_numbers([n_total, tokens]))
        if n_total == 0:
            raise NoTrainableTokensError(
                f"step {self.step + 1}: no label in this batch has a loss (all tokens masked); check --train-on and "
                "that examples are not truncated away by --seq-len"
            )
        loss_total = 0.0
        for b in micro:
            loss_sum, _ = self.loss_step(b)
            (loss_sum / n_total).backward()
            loss_total += float(loss_sum.detach())
        if self.dist.enabled:
            loss_total, stop = self.dist.sum_numbers([loss_total, self._stop is not None])
            self._stop_all = stop > 0
            if not self.sharded:  # FSDP summed them in the backward pass
                self.dist.sum_gradients(self.params.values())
        loss = loss_total / n_total
        grad_norm = self._clip_gradients()
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            raise TrainingDivergedError(
                f"step {self.step + 1}: loss {loss} and gradient norm {grad_norm} are not finite; stopped without "
                "saving this state",
                hint="lower the learning rate, keep gradient clipping on, or check the data; the last checkpoint "
                "(if any) is intact",
            )
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += tokens
        self._consistent = True
        return {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                **self.step_metrics(micro, n_total)}  # fmt: skip

    def _clip_gradients(self) -> float:
        """Clip to `max_grad_norm` (when > 0) and return the global gradient norm before clipping."""
        params = list(self.params.values())
        if self.settings.max_grad_norm > 0:
            return fsdp.as_float(torch.nn.utils.clip_grad_norm_(params, self.settings.max_grad_norm))
        if self.sharded:
            return fsdp.as_float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
        return float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean validation loss per unit (dropout off), or None without validation batches."""
        if not self.val_batches:
            return None
        self.model.eval()
        total, n = 0.0, 0
        rank, world = (0, 1) if self.sharded else self.dist.shard  # sharded: every rank runs every batch together
        for b in self.val_batches[rank::world]:  # each rank scores its share
            loss_sum, count = self.loss_step(b)
            total, n = total + float(loss_sum), n + count
        self.model.train()
        if not self.sharded:
            total, n = self.dist.sum_numbers([total, n], "validation")
        return total / max(n, 1)

    # ---- the loop ---------------------------------------------------------------------------------------------

    def save_checkpoint(self, last: dict[str, Any]) -> None:
        """Write the checkpoint of the current step (atomically; older ones beyond `keep_checkpoints` go).

        Rank 0 writes it; the others go on and wait for it at the next step's sums.
        """
        self._saved_step = self.step
        if not self.dist.is_main and not self.sharded:
            return
        state = {"tokens_seen": self.tokens_seen, "data": self.stream.state_dict(), "last": last,
                 "schedule": self.schedule}  # fmt: skip
        with self._signals_held():
            if self.sharded:  # every rank writes its shards
                fsdp.save_sharded(self.run_dir, self.step, self.model, self.optimizer, self.scheduler, state,
                                  self.dist, keep=self.settings.keep_checkpoints)  # fmt: skip
            else:
                save_checkpoint(self.run_dir, self.step, self.params, self.optimizer, self.scheduler, state,
                                keep=self.settings.keep_checkpoints)  # fmt: skip

    @property
    def sharded(self) -> bool:
        """The model is sharded over the processes (`--fsdp` under torchrun)."""
        return self.settings.fsdp and self.dist.enabled

    def full_params(self) -> contextlib.AbstractContextManager:
        """Within it, rank 0's model holds the trained tensors whole (every rank enters; unsharded: nothing)."""
        return fsdp.gathered(self.params, self.model, self.dist) if self.sharded else contextlib.nullcontext()

    @contextlib.contextmanager
    def _signals_held(self) -> Iterator[None]:
        """Ctrl-C or SIGTERM while a checkpoint is written waits for it, then raises `KeyboardInterrupt`."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        got: list[int] = []

        def handler(signum: int, frame: Any) -> None:
            got.append(signum)
            self.console.print("[yellow]writing a checkpoint: stopping as soon as it is complete[/yellow]")

        with _handling_signals(handler):
            yield
        if got:
            self._stop = signal.Signals(got[0]).name
            raise KeyboardInterrupt

    def train(self) -> LoopResult:
        """Run optimizer steps until `total_steps`, with metrics, validation, checkpoints and the stop signals."""
        s = self.settings
        start, t0, last = self.step, time.perf_counter(), dict(self._resumed_last)
        val_loss = last.get("val_loss")
        tokens_at_start = self.tokens_seen
        progress = make_progress(self.console, enabled=self.show_progress)
        try:
            with progress, self._stop_on_signals():
                task = progress.add_task(self.label, total=self.total_steps, completed=self.step)
                while self.step < self.total_steps:
                    ts = time.perf_counter()
                    record = self.train_step()
                    if self.log_tokens_per_s:
                        record["tokens_per_s"] = record["tokens"] / max(time.perf_counter() - ts, 1e-9)
                    self.losses.append(record["loss"])
                    final = self.step == self.total_steps
                    if (s.eval_every and self.step % s.eval_every == 0) or (final and self.val_batches):
                        val_loss = record["val_loss"] = self.evaluate()
                    elapsed = time.perf_counter() - t0
                    record["elapsed_s"] = elapsed
                    if self.step % s.log_every == 0 or final or "val_loss" in record:
                        self.metrics.write(record)
                    last = record
                    tps = (self.tokens_seen - tokens_at_start) / max(elapsed, 1e-9)
                    progress.update(task, completed=self.step, loss=record["loss"], lr=record["lr"], tps=tps,
                                    val_loss=val_loss)  # fmt: skip
                    if s.save_every and self.step % s.save_every == 0 and not final:
                        self.save_checkpoint(last)
                    if self._stop_requested() and not final:
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            if self.step > start and self._consistent:
                if self._saved_step != self.step:
                    with contextlib.suppress(KeyboardInterrupt):  # the checkpoint is complete: stop as asked
                        self.save_checkpoint(last)
                self.console.print(f"[yellow]interrupted at step {self.step}: checkpoint saved; continue with the "
                                   f"same command and {self.resume_flags}[/yellow]")  # fmt: skip
            raise
        except distributed.PeerLostError as e:
            e.hint = (f"the checkpoints written so far are intact: continue with the same command and "
                      f"{self.resume_flags} (any number of processes, keeping batch size x processes)")  # fmt: skip
            raise
        finally:
            self.metrics.close()
        if self.step > start:  # a finished run resumed only to write its output has its checkpoint
            self.save_checkpoint(last)
        return LoopResult(steps=self.step, losses=list(self.losses), last=last, val_loss=val_loss,
                          tokens=self.tokens_seen - tokens_at_start, seconds=time.perf_counter() - t0)  # fmt: skip

    def _stop_requested(self) -> bool:
        """A signal asked to stop (with several processes: on some rank, as all ranks agreed during the step)."""
        return self._stop_all if self.dist.enabled else self._stop is not None

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """While training, Ctrl-C or SIGTERM asks the loop to stop after the step in flight.

        A second Ctrl-C stops at once. Signal handlers can only be set from the main thread; elsewhere nothing changes.
        """
        self._stop = None
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self._stop is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop = signal.Signals(signum).name
            self.console.print("[yellow]stopping after this step (Ctrl-C again to stop at once)[/yellow]")

        with _handling_signals(handler):
            yield

    def write_loss_curve(self) -> Path | None:
        """Draw `run_dir/loss.png` from the run's metrics (None without matplotlib)."""
        return plot_loss_curve(read_jsonl(self.metrics.path), self.run_dir / "loss.png", title=self.name)

    def run(self) -> Any:
        """Set up, train, and let the recipe save and report (`finish`)."""
        try:
            try:
                self.setup()
            except BaseException:
                self._remove_unused_run_dir()
                raise
            out = self.finish(self.train())
            self.dist.barrier()  # every rank returns once rank 0 has written the output
            return out
        finally:
            self.dist.close()

    def _remove_unused_run_dir(self) -> None:
        """Remove the run folder this run made if it failed to start before writing anything there."""
        run_dir = getattr(self, "run_dir", None)
        if self.created_run_dir and run_dir is not None and Path(run_dir).is_dir():
            if not any(p.is_file() for p in Path(run_dir).rglob("*")):
                shutil.rmtree(run_dir, ignore_errors=True)


class _NoMetrics:
    """What ranks other than 0 write metrics to: nothing."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"

    def write(self, record: dict[str, Any]) -> None:
        """Drop the record."""

    def close(self) -> None:
        """Nothing to close."""


__all__ = ["LoopResult", "LoopSettings", "TrainingDivergedError", "TrainingLoop"]
