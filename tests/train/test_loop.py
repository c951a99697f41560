"""The training loop under a minimal recipe: accumulation against a plain torch loop, Ctrl-C and exact resume."""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console

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
