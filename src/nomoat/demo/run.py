"""`run_demo`, the `nomoat demo` flow: base model -> score -> LoRA fine-tune -> score again -> registry.

The new task is a generated company handbook (offices' Wi-Fi passwords, managers, floors, meeting rooms) that the
embedded model never saw. The adapter trains on five phrasings of every question and is scored on two others, so the
score measures learnt facts, not memorised strings. `DemoSettings` sets the scale (`FULL`, or `QUICK` for CI).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from nomoat.data.render import DEFAULT_CHAT_TEMPLATE
from nomoat.demo import MODEL_DIR
from nomoat.demo.score import answer, score_items
from nomoat.demo.tasks import HANDBOOK_SYSTEM, WORLD, handbook_items
from nomoat.util.hub import DEMO, local_path


@dataclass
class DemoSettings:
    """The scale of one demo run.

    Attributes:
        offices: Offices of the handbook to learn (4 facts each).
        steps: LoRA optimizer steps.
        batch_size: Chats per step.
        lr: LoRA learning rate.
        r: LoRA rank.
    """

    offices: int = 6
    steps: int = 320
    batch_size: int = 8
    lr: float = 3e-3
    r: int = 16


FULL = DemoSettings()
QUICK = DemoSettings(offices=3, steps=120)

SHOWCASE = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "user", "content": "What is 27 + 35?"}],
    [{"role": "user", "content": "Sort these words alphabetically: tiger, apple, lemon, castle"}],
    [{"role": "user", "content": "How many minutes are in 3 hours?"}],
    [{"role": "user", "content": f"What is the capital of {WORLD.countries[0].name}?"}],
]


@dataclass
class DemoResult:
    """What a demo run measured."""

    adapter_name: str
    adapter_dir: Path
    base_accuracy: float
    tuned_accuracy: float
    train_seconds: float
    total_seconds: float
    examples: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary."""
        return {"adapter": self.adapter_name, "adapter_dir": str(self.adapter_dir),
                "base_accuracy": self.base_accuracy, "tuned_accuracy": self.tuned_accuracy,
                "train_seconds": round(self.train_seconds, 1),
                "total_seconds": round(self.total_seconds, 1)}  # fmt: skip


def _showcase(console: Console, engine: Any, label: str) -> None:
    table = Table(title=f"{label}, before fine-tuning", show_lines=False)
    table.add_column("you")
    table.add_column("model", style="cyan")
    for chat, reply in zip(SHOWCASE, answer(engine, SHOWCASE, max_new_tokens=32)):
        table.add_row(chat[-1]["content"], reply)
    console.print(table)


def run_demo(quick: bool = False, name: str = "demo-handbook", model_dir: str | Path | None = None,
             console: Console | None = None, progress: bool = True, settings: DemoSettings | None = None,
             work_dir: str | Path | None = None) -> DemoResult:  # fmt: skip
    """Run the whole demo and return its measurements.

    Args:
        quick: The reduced run (fewer facts and steps; for CI).
        name: Registry name of the trained adapter (replaced if it exists).
        model_dir: The base model: `demo` (the embedded one, the default), a Hub id, a folder; one without a chat
            template (a base model) is asked and taught in nomoat's default ChatML layout.
        console: Where to print.
        progress: Show the training progress bar.
        settings: Override the scale (default: `QUICK` or `FULL`).
        work_dir: Folder for the training data and run (default: a temporary folder).

    Returns:
        The accuracies before and after, timings and the adapter's registry folder.
    """
    import torch

    t0 = time.perf_counter()
    console = console or Console()
    threads = torch.get_num_threads()
    torch.set_num_threads(_threads(threads))
    try:
        return _run(quick, name, model_dir, console, progress, settings, work_dir, t0)
    finally:
        torch.set_num_threads(threads)


def _threads(current: int) -> int:
    """How many threads the demo uses: one, unless OMP_NUM_THREADS says otherwise.

    The demo's matrices are tiny (5M parameters, batches of a few hundred tokens), so a second thread gains little,
    and as soon as another process holds a core torch's worker threads wait for each other at every op: measured on
    a 2-core CPU shared with other jobs, a LoRA step took 12 s with 2 threads and 1 s with one.
    """
    return current if "OMP_NUM_THREADS" in os.environ else 1


def _run(quick: bool, name: str, model_dir: str | Path | None, console: Console, progress: bool,
         settings: DemoSettings | None, work_dir: str | Path | None, t0: float) -> DemoResult:  # fmt: skip
    import torch

    import nomoat
    from nomoat.config.train import TrainConfig
    from nomoat.generate.engine import Engine
    from nomoat.lora.registry import Registry
    from nomoat.train.sft import SFTRecipe

    s = settings or (QUICK if quick else FULL)
    model_dir = Path(model_dir or DEMO)
    label = DEMO if Path(local_path(model_dir)).resolve() == MODEL_DIR.resolve() else str(model_dir)
    torch.manual_seed(0)
    console.rule("[bold]1. the embedded model" if label == DEMO else "[bold]1. the base model")
    model, tok = nomoat.load(str(model_dir), device="cpu")
    n_params = sum(p.numel() for p in model.parameters())
    about = (", trained from scratch on generated tasks only (arithmetic, word lists, units, a fictional atlas)"
             if label == DEMO else "")  # fmt: skip
    console.print(f"{label}: {model.config.family}, {n_params / 1e6:.1f}M parameters{about}")
    if tok.chat_template is None:  # a base model: asked and taught in the layout training gives it (plain text)
        tok.chat_templates["default"] = DEFAULT_CHAT_TEMPLATE
        console.print(f"{label} has no chat template (a base model): it is asked, and taught, in nomoat's default "
                      "ChatML layout as plain text, the layout `nomoat train` uses for a model without a template")
    engine = Engine(model, tok, max_running=32, max_queue=1 << 20, max_seq_len=256, prefix_cache_bytes=0)
    _showcase(console, engine, "the embedded model" if label == DEMO else label)

    console.rule("[bold]2. a task it has never seen: the Brightloom company handbook")
    train_items = handbook_items("train", offices=s.offices, seed=1)
    eval_items = handbook_items("eval", offices=s.offices, seed=2)
    base_scores, base_answers = score_items(engine, eval_items)
    base = base_scores.get("handbook", 0.0)
    console.print(f"{len(eval_items)} held-out questions about {s.offices * 4} facts: base model "
                  f"[bold red]{base:.0%}[/bold red] correct")  # fmt: skip

    console.rule("[bold]3. fine-tuning a LoRA adapter")
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="nomoat-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "handbook.jsonl"
    data.write_text("".join(json.dumps({"messages": it.messages}) + "\n" for it in train_items), encoding="utf-8")
    console.print(f"{len(train_items)} training chats ({data}); {len(eval_items)} other phrasings held out")
    cfg = TrainConfig(model=str(model_dir), data=[str(data)], name="handbook", output_dir=str(work / "runs"),
                      lora={"r": s.r, "alpha": 2 * s.r, "dropout": 0.0, "target_modules": "all-linear"},
                      seq_len=128, packing=False, batch_size=s.batch_size, max_steps=s.steps, lr=s.lr,
                      warmup_steps=5, schedule="cosine", min_lr_ratio=0.1, device="cpu", seed=0,
                      log_every=10)  # fmt: skip
    recipe = SFTRecipe(cfg, console=_ProgressOnly(console), progress=progress)
    result = recipe.run()
    tail = result.losses[-10:]
    console.print(f"{result.steps} steps in {result.seconds:.0f} s; loss {result.losses[0]:.2f} at the start, "
                  f"{sum(tail) / len(tail):.3f} over the last {len(tail)} steps")  # fmt: skip

    console.rule("[bold]4. the same questions, with the adapter")
    engine.add_adapter(name, result.adapter_dir)
    tuned_scores, tuned_answers = score_items(engine, eval_items, adapter=name)
    tuned = tuned_scores.get("handbook", 0.0)
    table = Table(title=f"held-out questions: base {base:.0%} -> with adapter {tuned:.0%}")
    for col, style in (("question", None), ("expected", "green"), ("base model", "red"), ("with adapter", "cyan")):
        table.add_column(col, style=style)
    for it, b, a in list(zip(eval_items, base_answers, tuned_answers))[:8]:
        table.add_row(it.prompt[-1]["content"], it.answer, b, a)
    console.print(table)

    console.rule("[bold]5. saved")
    registry = Registry()
    dest = registry.import_adapter(result.adapter_dir, name=name, overwrite=True)
    console.print(f"adapter [bold]{name}[/bold] in the registry: {dest}")
    _next_steps(console, label, name)
    total = time.perf_counter() - t0
    console.print(f"[dim]demo finished in {total:.0f} s[/dim]")
    examples = [{"question": it.prompt[-1]["content"], "expected": it.answer, "base": b, "tuned": a}
                for it, b, a in zip(eval_items, base_answers, tuned_answers)]  # fmt: skip
    return DemoResult(name, dest, base, tuned, result.seconds, total, examples)


class _ProgressOnly(Console):
    """A console that shows the training progress bar but not the recipe's data tables (the demo narrates)."""

    def __init__(self, loud: Console) -> None:
        super().__init__(file=loud.file, force_terminal=loud.is_terminal, width=loud.width)

    def print(self, *args: Any, **kwargs: Any) -> None:  # noqa: D102
        pass


def _next_steps(console: Console, model: str, name: str) -> None:
    q = "What is the Wi-Fi password of the Oslo office?"
    body = json.dumps({"model": name, "messages": [{"role": "system", "content": HANDBOOK_SYSTEM},
                                                   {"role": "user", "content": q}]})  # fmt: skip
    console.print(f"""
[bold]next[/bold]
  chat with it          nomoat chat {model} --adapter {name}
  serve it              nomoat serve {model} --adapter {name}
  call it with curl     curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
                          -d '{body}'
  with the openai client
    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    r = client.chat.completions.create(model="{name}", messages=[{{"role": "user", "content": "{q}"}}])
    print(r.choices[0].message.content)
  list your adapters    nomoat adapters list""")  # fmt: skip
