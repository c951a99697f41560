"""What a run reports: metrics, TensorBoard events, a loss-curve PNG and a live progress line.

`metrics.jsonl` has one JSON object per logged step; TensorBoard events are written when `tensorboard` is
installed; the PNG is drawn at the end of the run. The training loop (`nomoat.train.loop`) drives all of them.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from nomoat.util.files import atomic_path, atomic_write_text

logger = logging.getLogger(__name__)


class MetricsWriter:
    """Appends metrics to `run_dir/metrics.jsonl`, and mirrors scalars to TensorBoard when it is importable.

    Each line is flushed as it is written, so a killed run keeps every logged step. TensorBoard events go to
    `run_dir/tensorboard`.

    Args:
        run_dir: The run folder.
        resume_step: On resume, lines of steps after this one (logged after the checkpoint) are dropped first, so
            the file reads as one uninterrupted run.
    """

    def __init__(self, run_dir: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if line.strip()
                    and json.loads(line).get("step", 0) <= resume_step]  # fmt: skip
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step)
        except Exception:  # tensorboard not installed: metrics.jsonl is the record
            self._tb = None

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (must contain `step`)."""
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key.replace("_", "/", 1) if key.startswith(("train_", "val_")) else key,
                                        value, record["step"])  # fmt: skip

    def close(self) -> None:
        """Flush and close the files."""
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def plot_loss_curve(metrics: list[dict[str, Any]], out: str | Path, title: str = "") -> Path | None:
    """Draw training (and validation) loss against steps into a PNG; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no loss-curve PNG (pip install matplotlib)")
        return None
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    val = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=out.suffix.lstrip(".") or "png")
    plt.close(fig)
    return out


class _Stats(ProgressColumn):
    def render(self, task: Task) -> Text:
        f = task.fields
        if "loss" not in f:
            return Text("")
        parts = [f"loss {f['loss']:.4f}", f"lr {f['lr']:.2e}", f"{f['tps']:.0f} tok/s"]
        if f.get("val_loss") is not None:
            parts.insert(1, f"val {f['val_loss']:.4f}")
        return Text("  ".join(parts), style="cyan")


def make_progress(console: Console | None = None, enabled: bool = True) -> Progress:
    """A progress bar showing steps, loss, learning rate, tokens/s, elapsed time and ETA."""
    return Progress(
        TextColumn("[bold]train[/bold]"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        _Stats(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )
