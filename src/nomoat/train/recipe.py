"""The supervised fine-tuning recipe: setup -> loss_step -> train -> save (torchtune's shape, one class).

`SFTRecipe(config).run()` loads the base model and tokenizer, injects LoRA (optionally on a quantized base), reads
and tokenizes the data, then trains with AdamW, a warmed-up schedule, gradient accumulation normalised over all
label tokens of the step, clipping and periodic validation. Checkpoints are atomic and resumable to the exact data
position and RNG state; the adapter is saved in PEFT's format with a `nomoat.json` provenance record.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import track

from nomoat.config.train import TrainConfig
from nomoat.data import (
    DEFAULT_CHAT_TEMPLATE,
    BatchStream,
    NoTrainableTokensError,
    Row,
    collate,
    length_grouped_batches,
    load_dataset,
    pack,
    split_validation,
    summarize,
    tokenize_example,
)
from nomoat.lora import count_parameters, inject_lora, quantize_model_nf4, save_adapter, trainable_parameters
from nomoat.models.checkpoint import load_model, resolve_device
from nomoat.models.quantize import quantize_model
from nomoat.tokenizer import Tokenizer
from nomoat.train.allocator import tune_cpu_allocator
from nomoat.train.checkpointing import latest_checkpoint, load_checkpoint, save_checkpoint
from nomoat.train.loss import causal_lm_loss_sum
from nomoat.train.metrics import MetricsWriter, make_progress, plot_loss_curve, read_metrics
from nomoat.train.optim import build_optimizer, build_scheduler


class TrainingDivergedError(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; the run stops without saving the broken state."""


@dataclass
class TrainResult:
    """What a finished run produced.

    Attributes:
        run_dir: The run folder (checkpoints, metrics, plots).
        adapter_dir: The saved adapter (PEFT format + nomoat.json).
        steps: Optimizer steps taken in total.
        losses: Training loss of every step of this process (steps resumed from a checkpoint are not repeated).
        final_loss: Training loss of the last step.
        val_loss: Last validation loss, if a validation split exists.
        tokens: Input tokens processed (padding excluded), all steps.
        seconds: Wall time of the training loop in this process.
        metrics: The last metrics record.
    """

    run_dir: Path
    adapter_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    final_loss: float | None = None
    val_loss: float | None = None
    tokens: int = 0
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_content_hash(folder: str | Path) -> str:
    """SHA-256 over a model folder's config and weight files (names and bytes), identifying the exact base."""
    folder = Path(folder)
    h = hashlib.sha256()
    for f in sorted(list(folder.glob("*.safetensors")) + [folder / "config.json"]):
        if f.is_file():
            h.update(f.name.encode())
            h.update(_sha256(f).encode())
    return h.hexdigest()


def _default_name(cfg: TrainConfig) -> str:
    data = Path(cfg.data[0]).stem if cfg.data else "data"
    return f"{Path(cfg.model).name or 'model'}-{data}"


class SFTRecipe:
    """A LoRA supervised fine-tuning run.

    Example:
        >>> result = SFTRecipe(TrainConfig(model="path/to/model", data=["chat.jsonl"], max_steps=100)).run()

    Args:
        config: The run configuration.
        console: Where progress and the summary go (a quiet console silences them).
        progress: Show the live progress bar.
    """

    def __init__(self, config: TrainConfig, console: Console | None = None, progress: bool = True) -> None:
        self.cfg = config
        self.console = console or Console(stderr=True)
        self.show_progress = progress
        self.step = 0
        self.tokens_seen = 0
        self.losses: list[float] = []

    # ---- setup ------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Load model, tokenizer and data; inject LoRA; build optimizer, scheduler and the batch stream."""
        cfg = self.cfg
        if not cfg.model:
            raise ValueError("no model given: pass a model folder (nomoat train MODEL --data FILE)")
        if not cfg.data:
            raise ValueError("no data given: pass --data FILE (JSON, JSONL, CSV or Parquet)")
        self.device = resolve_device(cfg.device)
        if self.device.type == "cpu":
            tune_cpu_allocator()  # activations reuse freed memory instead of page-faulting anew each step
        # bf16 autocast: the default on CUDA; on CPU when asked (fast where the CPU has bf16 instructions).
        bf16 = cfg.dtype in ("bfloat16", "bf16") or (cfg.dtype == "auto" and self.device.type == "cuda")
        self.autocast = bf16
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        # Read and validate the data before the (possibly large) model: bad records fail in seconds.
        self.dataset = load_dataset(cfg.data, format=cfg.format, columns=cfg.columns or None, limit=cfg.limit)
        self.run_dir = self._run_dir()
        base_dtype = torch.bfloat16 if self.autocast else torch.float32
        self.console.print(f"[bold]model[/bold] {cfg.model}")
        self.model = load_model(cfg.model, dtype=base_dtype, device=self.device)
        self.tokenizer = Tokenizer.from_dir(cfg.model)
        if cfg.quantize_base in ("int8", "int4"):
            quantize_model(self.model, cfg.quantize_base, include_lm_head=False)
        elif cfg.quantize_base == "nf4":
            quantize_model_nf4(self.model)
        inject_lora(self.model, cfg.lora)
        for p in self.model.parameters():  # adapters train in fp32 even over a bf16 base
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
        self.model.gradient_checkpointing = cfg.grad_checkpointing
        self.model.train()
        self.params = trainable_parameters(self.model)
        trainable, total = count_parameters(self.model)
        targets = cfg.lora.target_modules
        targets = ", ".join(targets) if isinstance(targets, list) else targets
        share = 100 * trainable / max(total, 1)
        self.console.print(f"[bold]LoRA[/bold] r={cfg.lora.r} alpha={cfg.lora.alpha} on {targets}: "
                           f"{trainable:,} trainable of {total:,} parameters ({share:.2f}%)")  # fmt: skip
        self._setup_data()
        self.optimizer = build_optimizer(self.params.values(), cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps)
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * self.total_steps)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, warmup, cfg.schedule, cfg.min_lr_ratio)
        resume_step = None
        if cfg.resume:
            ckpt = latest_checkpoint(self.run_dir)
            state = load_checkpoint(ckpt, self.params, self.optimizer, self.scheduler)
            self.step, self.tokens_seen = state["step"], state["tokens_seen"]
            self.stream.load_state_dict(state["data"])
            self._batches = None
            resume_step = self.step
            self.console.print(f"[bold]resumed[/bold] from {ckpt} (step {self.step}/{self.total_steps})")
        self.metrics = MetricsWriter(self.run_dir, resume_step=resume_step)
        (self.run_dir / "config.yaml").write_text(_yaml(cfg.to_dict()))

    def _run_dir(self) -> Path:
        cfg = self.cfg
        name = cfg.name or _default_name(cfg)
        run_dir = Path(cfg.output_dir).expanduser() / name
        if not cfg.resume and run_dir.exists() and any(run_dir.iterdir()):
            if cfg.name:
                raise FileExistsError(
                    f"{run_dir} already holds a run: pass --resume to continue it, or another --name"
                )
            i = 2
            while (run_dir.parent / f"{name}-{i}").exists():
                i += 1
            run_dir = run_dir.parent / f"{name}-{i}"
        if cfg.resume and not run_dir.exists():
            raise FileNotFoundError(f"{run_dir}: no run to resume (check --name and --output-dir)")
        run_dir.mkdir(parents=True, exist_ok=True)
        self.name = run_dir.name
        return run_dir

    def _setup_data(self) -> None:
        cfg = self.cfg
        # Tokenize every example once (a text may give several windows), summarise them all, then split by example.
        examples = track(self.dataset.examples, description="tokenizing", console=self.console, transient=True,
                         disable=not self.show_progress or len(self.dataset.examples) < 2000)  # fmt: skip
        per_example = [tokenize_example(e, self.tokenizer, cfg.seq_len, train_on=cfg.train_on) for e in examples]
        self.summary = summarize(self.dataset, [t for seqs in per_example for t in seqs], cfg.seq_len)
        self.summary.render(self.console)
        val_count = cfg.val_size if cfg.val_size is not None else cfg.val_fraction
        train_seqs, val_seqs = (per_example, [])
        if val_count:
            train_seqs, val_seqs = split_validation(per_example, val_count, seed=cfg.seed)
        tok = [t for seqs in train_seqs for t in seqs if t.num_label_tokens]
        vtok = [t for seqs in val_seqs for t in seqs if t.num_label_tokens]
        if val_seqs:
            self.console.print(f"[bold]split[/bold] {len(train_seqs)} examples for training, {len(val_seqs)} held out "
                               "for validation")  # fmt: skip
        if not tok:
            raise NoTrainableTokensError(
                "no example has a trainable token: check --train-on (assistant turns only by default) and --seq-len"
            )
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.pad_id = pad
        if cfg.packing:
            rows = pack(tok, cfg.seq_len, seed=cfg.seed)
            self.stream = BatchStream(rows, cfg.batch_size, seed=cfg.seed, pad_id=pad)
        else:
            batches = length_grouped_batches(tok, cfg.batch_size, seed=cfg.seed)
            self.stream = BatchStream(batches, 1, seed=cfg.seed, pad_id=pad)
        self._batches = None
        self.val_batches: list[dict[str, torch.Tensor]] = []
        if vtok:
            vrows = pack(vtok, cfg.seq_len, seed=cfg.seed) if cfg.packing else [Row.single(t) for t in vtok]
            bs = cfg.batch_size
            self.val_batches = [collate(vrows[i : i + bs], pad) for i in range(0, len(vrows), bs)]
        per_epoch = max(1, len(self.stream) // cfg.grad_accum)
        self.total_steps = cfg.max_steps or max(1, math.ceil(per_epoch * cfg.epochs))

    # ---- one step ---------------------------------------------------------------------------------------------

    def _next_batch(self) -> dict[str, Any]:
        """The next micro-batch; epochs follow one another without end (the step count decides when to stop)."""
        for _ in range(2):
            if self._batches is None:
                self._batches = iter(self.stream)
            batch = next(self._batches, None)
            if batch is not None:
                return batch
            self._batches = None
        raise RuntimeError("the batch stream is empty")

    def loss_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Forward one micro-batch: the summed token loss (with grad) and the number of label tokens."""
        b = {k: v.to(self.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        ctx = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with ctx:
            hidden = self.model(b["input_ids"], position_ids=b["position_ids"], segment_ids=b["segment_ids"],
                                return_hidden=True)  # fmt: skip
            return causal_lm_loss_sum(self.model, hidden, b["labels"], self.cfg.loss_chunk)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over `grad_accum` micro-batches; the loss is the mean over all their label tokens."""
        cfg = self.cfg
        micro = [self._next_batch() for _ in range(cfg.grad_accum)]
        n_total = sum(int(b["num_label_tokens"]) for b in micro)
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
        loss = loss_total / n_total
        params = list(self.params.values())
        if cfg.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        else:
            grad_norm = float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            raise TrainingDivergedError(
                f"step {self.step + 1}: loss {loss} and gradient norm {grad_norm} are not finite; stopped without "
                "saving this state. Lower --lr, keep --max-grad-norm on, or check the data; the last checkpoint "
                "(if any) is intact"
            )
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        tokens = sum(int((b["segment_ids"] != 0).sum()) for b in micro)
        self.tokens_seen += tokens
        return {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                "label_tokens": n_total,
                "epoch": round(self.stream.epoch + self.stream.index / len(self.stream), 4)}  # fmt: skip

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean validation loss per label token (dropout off), or None without a validation split."""
        if not self.val_batches:
            return None
        self.model.eval()
        total, n = 0.0, 0
        for b in self.val_batches:
            loss_sum, count = self.loss_step(b)
            total, n = total + float(loss_sum), n + count
        self.model.train()
        return total / max(n, 1)

    # ---- the loop ---------------------------------------------------------------------------------------------

    def _checkpoint(self, last: dict[str, Any]) -> None:
        state = {"tokens_seen": self.tokens_seen, "data": self.stream.state_dict(), "last": last}
        save_checkpoint(self.run_dir, self.step, self.params, self.optimizer, self.scheduler, state,
                        keep=self.cfg.keep_checkpoints)  # fmt: skip

    def train(self) -> TrainResult:
        """Run optimizer steps until `total_steps`, with logging, validation and checkpoints."""
        cfg = self.cfg
        start, t0, last, val_loss = self.step, time.perf_counter(), {}, None
        tokens_at_start = self.tokens_seen
        progress = make_progress(self.console, enabled=self.show_progress)
        try:
            with progress:
                task = progress.add_task("train", total=self.total_steps, completed=self.step)
                while self.step < self.total_steps:
                    ts = time.perf_counter()
                    record = self.train_step()
                    record["tokens_per_s"] = record["tokens"] / max(time.perf_counter() - ts, 1e-9)
                    self.losses.append(record["loss"])
                    final = self.step == self.total_steps
                    if (cfg.eval_every and self.step % cfg.eval_every == 0) or (final and self.val_batches):
                        val_loss = record["val_loss"] = self.evaluate()
                    elapsed = time.perf_counter() - t0
                    record["elapsed_s"] = elapsed
                    if self.step % cfg.log_every == 0 or final or "val_loss" in record:
                        self.metrics.write(record)
                    last = record
                    tps = (self.tokens_seen - tokens_at_start) / max(elapsed, 1e-9)
                    progress.update(task, completed=self.step, loss=record["loss"], lr=record["lr"], tps=tps,
                                    val_loss=val_loss)  # fmt: skip
                    if cfg.save_every and self.step % cfg.save_every == 0 and not final:
                        self._checkpoint(last)
        except KeyboardInterrupt:
            if self.step > start:
                self._checkpoint(last)
                self.console.print(f"[yellow]interrupted at step {self.step}: checkpoint saved; continue with "
                                   f"the same command and --resume --name {self.name}[/yellow]")  # fmt: skip
            raise
        finally:
            self.metrics.close()
        self._checkpoint(last)
        seconds = time.perf_counter() - t0
        return TrainResult(run_dir=self.run_dir, adapter_dir=self.run_dir / "adapter", steps=self.step,
                           losses=list(self.losses), final_loss=last.get("loss"), val_loss=val_loss,
                           tokens=self.tokens_seen - tokens_at_start, seconds=seconds, metrics=last)  # fmt: skip

    def save(self, result: TrainResult) -> Path:
        """Save the adapter (PEFT format, provenance in `nomoat.json`) and the loss curve; returns the adapter dir."""
        cfg = self.cfg
        provenance = {
            "base_model": {"path": str(Path(cfg.model).expanduser().resolve()), "sha256": model_content_hash(cfg.model),
                           "family": self.model.config.family},
            "data": [{"path": str(Path(f["path"]).resolve()), "sha256": f["sha256"], "records": f.get("records")}
                     for f in self.dataset.files],
            "data_format": self.dataset.format,
            "data_summary": self.summary.to_dict(),
            "training": cfg.to_dict(),
            "metrics": {"steps": self.step, "final_loss": result.final_loss, "val_loss": result.val_loss,
                        "tokens": self.tokens_seen, "seconds": round(result.seconds, 2)},
            "run_dir": str(self.run_dir.resolve()),
        }  # fmt: skip
        fallback = self.tokenizer.chat_template is None and self.dataset.format != "text"
        if fallback:  # the data was rendered with nomoat's default template: inference must use it too
            provenance["chat_template"] = "nomoat default (ChatML); the base model has none"
        save_adapter(self.model, result.adapter_dir, cfg.lora, base_model_name_or_path=cfg.model,
                     provenance=provenance)  # fmt: skip
        if fallback:
            tmp = result.adapter_dir / ".chat_template.jinja.tmp"
            tmp.write_text(DEFAULT_CHAT_TEMPLATE, encoding="utf-8")
            tmp.replace(result.adapter_dir / "chat_template.jinja")
        plot_loss_curve(read_metrics(self.metrics.path), self.run_dir / "loss.png", title=self.name)
        return result.adapter_dir

    def run(self) -> TrainResult:
        """Set up, train and save, then print the closing summary."""
        self.setup()
        result = self.train()
        self.save(result)
        self._summary(result)
        return result

    def _summary(self, r: TrainResult) -> None:
        first = f"{self.losses[0]:.4f} -> " if self.losses else ""
        lines = [
            f"[bold green]done[/bold green]: {r.steps} steps in {r.seconds:.1f} s, {r.tokens:,} tokens "
            f"({r.tokens / max(r.seconds, 1e-9):.0f} tok/s)",
            f"loss {first}{r.final_loss:.4f}" + (f", validation {r.val_loss:.4f}" if r.val_loss is not None else ""),
            f"adapter  {r.adapter_dir}",
            f"metrics  {self.metrics.path}  (loss curve: {self.run_dir / 'loss.png'})",
            f"chat     nomoat chat {self.cfg.model} --adapter {r.adapter_dir}",
        ]
        for line in lines:
            self.console.print(line)


def _yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(json.loads(json.dumps(data)), sort_keys=False)


def train(model: str | None = None, data: str | list[str] | None = None, config: str | Path | None = None,
          progress: bool = True, console: Console | None = None, **options: Any) -> TrainResult:  # fmt: skip
    """Fine-tune a LoRA adapter: the Python form of `nomoat train`.

    Example:
        >>> import nomoat
        >>> result = nomoat.train("models/SmolLM2-135M-Instruct", data="chat.jsonl", max_steps=200, lr=1e-4)
        >>> result.adapter_dir

    Args:
        model: Base model folder (Hugging Face format).
        data: A dataset file or a list of them.
        config: A YAML run file; `model`, `data` and `options` override its values.
        progress: Show the live progress bar.
        console: Where to print (default: stderr).
        **options: Any `TrainConfig` field (`lr`, `max_steps`, `lora={"r": 8}`, ...).

    Returns:
        The run's result: adapter folder, losses, token counts and timings.
    """
    from nomoat.config.train import load_train_config

    cfg = load_train_config(config, model=model, data=[data] if isinstance(data, (str, Path)) else data, **options)
    return SFTRecipe(cfg, console=console, progress=progress).run()


__all__ = ["SFTRecipe", "TrainResult", "TrainingDivergedError", "train", "model_content_hash"]
