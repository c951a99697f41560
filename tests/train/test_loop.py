"""The training loop under a minimal recipe: accumulation against a plain torch loop, Ctrl-C and exact resume, and
the ways a run stops or resumes badly (a second Ctrl-C while saving, a finished run, another schedule, a full disk)."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console

from nomoat.train.checkpointing import list_checkpoints
from nomoat.train.loop import LoopResult, TrainingLoop

QUIET = Console(quiet=True)


@dataclass
class ToyConfig:
    run_dir: str
    lr: float = 0.05
    schedule: str = "constant"
    warmup_steps: int = 0
    grad_accum: int = 2
    max_grad_norm: float = 0.0
    max_steps: int = 6
    save_every: int = 2
    log_every: int = 1
    device: str = "cpu"
    seed: int = 3
    dropout: float = 0.0
    resume: bool = False


class ListStream:
    """Ready-made batches, in order, epoch after epoch, with the position as its state."""

    def __init__(self, batches: list[dict[str, Any]]) -> None:
        self.batches, self.epoch, self.index = batches, 0, 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        if self.index >= len(self):
            self.epoch, self.index = self.epoch + 1, 0
        while self.index < len(self):
            self.index += 1
            yield self.batches[self.index - 1]
        self.epoch, self.index = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = state["epoch"], state["index"]


def toy_batches() -> list[dict[str, Any]]:
    """Regression batches of unequal sizes (1, 3, 2, 4 rows), so per-row normalisation matters."""
    g = torch.Generator().manual_seed(0)
    out = []
    for n in (1, 3, 2, 4):
        x = torch.randn(n, 4, generator=g)
        out.append({"x": x, "y": x.sum(1, keepdim=True) * 0.5 + 1.0, "rows": n})
    return out


class ToyRecipe(TrainingLoop):
    """A linear regression: the recipe supplies a model, a stream and a summed loss; the loop does the rest."""

    interrupt_at: tuple[int, int] | None = None  # (step, signals) sent during that step's first forward pass

    def build(self) -> None:
        self.run_dir = Path(self.cfg.run_dir)
        self.name = self.run_dir.name
        self.model = torch.nn.Linear(4, 1)
        self.model.train()
        self.params = dict(self.model.named_parameters())
        self.stream = ListStream(toy_batches())
        self.total_steps = self.cfg.max_steps

    def units(self, batch: dict[str, Any]) -> int:
        return batch["rows"]

    def tokens(self, batch: dict[str, Any]) -> int:
        return batch["rows"]

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        if self.interrupt_at and self.interrupt_at[0] == self.step + 1:
            for _ in range(self.interrupt_at[1]):
                signal.raise_signal(signal.SIGINT)
            self.interrupt_at = None
        x = torch.nn.functional.dropout(batch["x"], self.cfg.dropout, self.model.training)  # draws from the RNG
        return (self.model(x) - batch["y"]).square().sum(), batch["rows"]


def _run(tmp_path: Path, name: str, **kw: Any) -> tuple[ToyRecipe, LoopResult]:
    recipe = ToyRecipe(ToyConfig(run_dir=str(tmp_path / name), **kw), console=QUIET, progress=False)
    return recipe, recipe.run()


def test_accumulated_steps_equal_a_plain_torch_loop(tmp_path):
    """Each step's loss is the mean over all rows of its micro-batches, and AdamW follows it as torch's does."""
    recipe, result = _run(tmp_path, "toy")
    torch.manual_seed(3)
    ref = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(ref.parameters(), lr=0.05, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    batches, losses = toy_batches(), []
    for step in range(6):
        group = [batches[(2 * step + i) % 4] for i in range(2)]
        x, y = torch.cat([b["x"] for b in group]), torch.cat([b["y"] for b in group])
        loss = (ref(x) - y).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert result.losses == pytest.approx(losses, rel=1e-6)
    torch.testing.assert_close(recipe.model.weight.detach(), ref.weight.detach(), rtol=1e-6, atol=1e-7)
    records = [json.loads(line) for line in (tmp_path / "toy" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["tokens"] for r in records] == [4, 6, 4, 6, 4, 6]
    assert list(records[0]) == ["step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"]


@pytest.mark.parametrize("signals", [1, 2])
def test_ctrl_c_finishes_the_step_then_resume_is_exact(tmp_path, signals):
    """One Ctrl-C: the step in flight completes and is checkpointed; resuming gives the uninterrupted run bit for
    bit (dropout draws included). Two: the loop stops at once and the last checkpoint is the one it resumes from."""
    _, whole = _run(tmp_path, "whole", dropout=0.3, save_every=2)
    recipe = ToyRecipe(ToyConfig(run_dir=str(tmp_path / "cut"), dropout=0.3, save_every=2), console=QUIET,
                       progress=False)  # fmt: skip
    recipe.interrupt_at = (4, signals)  # step 3 was not checkpointed
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        recipe.run()
    saved = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir())
    assert saved == (["step-000002", "step-000004"] if signals == 1 else ["step-000002"])
    assert signal.getsignal(signal.SIGINT) is before  # the loop's handler is gone
    resumed, rest = _run(tmp_path, "cut", dropout=0.3, save_every=2, resume=True)
    assert recipe.losses[: 4 if signals == 1 else 2] + rest.losses == whole.losses
    records = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records] == whole.losses


def test_second_ctrl_c_during_the_save_waits_for_the_checkpoint(tmp_path, monkeypatch):
    """Ctrl-C, then Ctrl-C again while the checkpoint is written: the write completes (no half checkpoint, no
    traceback from inside it), the run stops, and resuming gives the uninterrupted run."""
    import nomoat.train.loop as loop_module

    _, whole = _run(tmp_path, "whole", dropout=0.3)
    real, calls = loop_module.save_checkpoint, []

    def save_with_a_second_ctrl_c(*args: Any, **kwargs: Any) -> Path:
        calls.append(args[1])
        if args[1] == 3:  # the save the first Ctrl-C asked for
            signal.raise_signal(signal.SIGINT)  # the second Ctrl-C arrives while the checkpoint is being written
        return real(*args, **kwargs)

    monkeypatch.setattr(loop_module, "save_checkpoint", save_with_a_second_ctrl_c)
    recipe = ToyRecipe(ToyConfig(run_dir=str(tmp_path / "cut"), dropout=0.3), console=QUIET, progress=False)
    recipe.interrupt_at = (3, 1)
    with pytest.raises(KeyboardInterrupt):
        recipe.run()
    assert calls == [2, 3]
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["step-000002", "step-000003"]
    assert not [p for p in (tmp_path / "cut" / "checkpoints").iterdir() if p.name.startswith(".")]
    monkeypatch.setattr(loop_module, "save_checkpoint", real)
    _, rest = _run(tmp_path, "cut", dropout=0.3, resume=True)
    assert recipe.losses + rest.losses == whole.losses and len(recipe.losses) == 3


def test_ctrl_c_during_a_periodic_save_stops_once_it_is_written(tmp_path, monkeypatch):
    """Ctrl-C while a periodic checkpoint is written: the write completes, then the run stops there."""
    import nomoat.train.loop as loop_module

    real = loop_module.save_checkpoint

    def save(*args: Any, **kwargs: Any) -> Path:
        if args[1] == 2:
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop_module, "save_checkpoint", save)
    recipe = ToyRecipe(ToyConfig(run_dir=str(tmp_path / "p")), console=QUIET, progress=False)
    with pytest.raises(KeyboardInterrupt):
        recipe.run()
    assert len(recipe.losses) == 2 and [p.name for p in list_checkpoints(tmp_path / "p")] == ["step-000002"]


class FinishedToy(ToyRecipe):
    """A toy whose output is a file written by `finish`, like an adapter."""

    def finished_output(self) -> Path | None:
        out = self.run_dir / "output.txt"
        return out if out.exists() else None

    def finish(self, result: LoopResult) -> LoopResult:
        (self.run_dir / "output.txt").write_text(json.dumps(result.last))
        return result


def test_resume_of_a_finished_run(tmp_path):
    """A finished run is not rewritten (a clear refusal); killed after its last checkpoint but before its output,
    resuming writes the output from that checkpoint, with the last step's loss (not None)."""
    from nomoat.util.errors import UsageError

    cfg = ToyConfig(run_dir=str(tmp_path / "done"))
    whole = FinishedToy(cfg, console=QUIET, progress=False).run()
    written = (tmp_path / "done" / "output.txt").read_text()
    with pytest.raises(UsageError, match="has finished: all its 6 steps"):
        FinishedToy(ToyConfig(run_dir=cfg.run_dir, resume=True), console=QUIET, progress=False).run()
    assert (tmp_path / "done" / "output.txt").read_text() == written
    (tmp_path / "done" / "output.txt").unlink()  # as if killed between the last checkpoint and the output
    again = FinishedToy(ToyConfig(run_dir=cfg.run_dir, resume=True), console=QUIET, progress=False).run()
    assert again.steps == 6 and again.losses == []
    assert again.last["loss"] == whole.losses[-1]
    assert json.loads((tmp_path / "done" / "output.txt").read_text()) == json.loads(written)


def test_resume_with_more_steps_follows_the_longer_schedule(tmp_path):
    """A finished 3-step cosine run resumed with 6 steps: steps 4-6 use the 6-step cosine's rates (not the stale
    rate 0 of the old schedule's end), so the whole run is an honest 6-step schedule from step 3 on."""
    import math

    kw = dict(schedule="cosine", lr=0.05, save_every=1, grad_accum=1)
    _run(tmp_path, "grow", max_steps=3, **kw)
    _, more = _run(tmp_path, "grow", max_steps=6, resume=True, **kw)
    assert more.steps == 6 and len(more.losses) == 3
    records = [json.loads(line) for line in (tmp_path / "grow" / "metrics.jsonl").read_text().splitlines()]
    expected = [0.05 * 0.5 * (1 + math.cos(math.pi * k / 6)) for k in (3, 4, 5)]
    assert [r["lr"] for r in records[3:]] == pytest.approx(expected, rel=1e-12)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("change, flag", [({"lr": 0.01}, "--lr"), ({"schedule": "cosine"}, "--schedule")])
def test_resume_refuses_another_schedule(tmp_path, change, flag):
    """The checkpoint remembers its learning rate and schedule: resuming with others is refused by name (the
    provenance would otherwise record a value the first steps never used)."""
    from nomoat.util.errors import UsageError

    _run(tmp_path, "lr", max_steps=2, save_every=1)
    with pytest.raises(UsageError, match=flag):
        _run(tmp_path, "lr", max_steps=4, resume=True, **change)


def test_resume_before_the_first_checkpoint_starts_afresh(tmp_path):
    """A run killed before its first checkpoint is no dead end: --resume starts it from step 0 (with a notice),
    the lost attempt's metric lines and the temporary folder of its interrupted save are removed."""
    _, whole = _run(tmp_path, "whole")
    run = tmp_path / "early"
    (run / "checkpoints" / ".tmp-step-000002-1234").mkdir(parents=True)
    (run / "checkpoints" / ".tmp-step-000002-1234" / "trainable.safetensors").write_bytes(b"x" * 1000)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 99.0}\n')
    console = Console(record=True, width=200, file=open(os.devnull, "w"))  # noqa: SIM115
    recipe = ToyRecipe(ToyConfig(run_dir=str(run), resume=True), console=console, progress=False)
    result = recipe.run()
    assert "no checkpoint yet" in console.export_text()
    assert result.losses == whole.losses
    assert [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()] == whole.losses
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000004", "step-000006"]


def test_interrupted_saves_leave_no_temporary_folders(tmp_path):
    """Temporary folders of saves a kill interrupted are removed when the run resumes, before it writes."""
    _run(tmp_path, "tmp", max_steps=2, save_every=1)
    stale = tmp_path / "tmp" / "checkpoints" / ".tmp-step-000003-999"
    stale.mkdir()
    recipe = ToyRecipe(ToyConfig(run_dir=str(tmp_path / "tmp"), max_steps=4, resume=True), console=QUIET,
                       progress=False)  # fmt: skip
    recipe.setup()  # on resume, before any new write (a full disk is freed first)
    recipe.metrics.close()
    assert not stale.exists()


@pytest.mark.parametrize("failure", ["safetensors", "oserror"])
def test_full_disk_names_the_folder_and_the_space_needed(tmp_path, monkeypatch, failure):
    """A checkpoint that cannot be written for want of space is a clear error (folder, bytes needed, what to do),
    not safetensors' raw error; the half-written folder is gone and the previous checkpoint intact."""
    import errno

    from safetensors import SafetensorError

    import nomoat.train.checkpointing as ckpt_module
    from nomoat.train.checkpointing import DiskFullError

    real, count = ckpt_module.save_file, []

    def save_file(tensors: dict, path: str, *args: Any, **kwargs: Any) -> None:
        count.append(path)
        if "step-000004" in path:
            if failure == "safetensors":
                raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                      '"No space left on device" })')  # fmt: skip
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt_module, "save_file", save_file)
    with pytest.raises(DiskFullError) as info:
        _run(tmp_path, "full")
    message = str(info.value)
    assert str(tmp_path / "full" / "checkpoints") in message and "disk is full" in message
    assert "needs about" in message and "free there" in message and "--resume" in info.value.hint
    assert [p.name for p in (tmp_path / "full" / "checkpoints").iterdir()] == ["step-000002"]
