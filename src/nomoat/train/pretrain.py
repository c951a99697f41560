"""Full-parameter (pre)training: from scratch from a config, or continued from a model folder.

`PretrainRecipe(config).run()` reuses the SFT recipe's pieces: datasets are read by `nomoat.data` (text and chat
files, mixed), tokenized with the chat template's assistant masking, batched by length (or packed), and trained with
the chunked cross-entropy of `nomoat.train.loss`, AdamW and the warmed-up schedule of `nomoat.train.optim`.
Checkpoints are the SFT recipe's atomic folders (every parameter counts as trainable), so a killed run resumes to
the exact data position and RNG state. The result is a Hugging Face model folder (weights, `config.json`, the
tokenizer files) that `nomoat.load` and `transformers` both read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from nomoat.data import (
    BatchStream,
    Tokenized,
    length_grouped_batches,
    load_dataset,
    pack,
    tokenize_example,
)
from nomoat.models.checkpoint import DTYPE_NAMES, load_model, resolve_device, save_model
from nomoat.models.families import config_from_hf
from nomoat.models.transformer import Transformer
from nomoat.tokenizer import Tokenizer
from nomoat.train.allocator import tune_cpu_allocator
from nomoat.train.checkpointing import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from nomoat.train.loss import causal_lm_loss_sum
from nomoat.train.metrics import MetricsWriter, make_progress
from nomoat.train.optim import build_optimizer, build_scheduler
from nomoat.train.recipe import TrainingDivergedError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")  # fmt: skip


@dataclass
class PretrainConfig:
    """Everything a full-parameter training run needs.

    Attributes:
        model: A model folder to continue training (weights, config and tokenizer are read from it).
        model_config: A Hugging Face `config.json` (a dict or a path) to train from scratch instead of `model`.
        tokenizer: The folder holding the tokenizer files when training from scratch.
        data: Dataset files: text (`{"text": ...}`) and/or chats (`{"messages": [...]}`), any format nomoat reads.
        output: The finished model folder.
        run_dir: Checkpoints and metrics; default `output` + `.run`.
        seq_len: Longest training sequence (longer texts are cut into windows, longer chats truncated).
        packing: Pack examples into full rows (attention stays inside each example); off: length-grouped batches
            of padded examples (faster when examples are short, as their attention then runs in one call).
        batch_size: Sequences (or packed rows) per micro-batch.
        grad_accum: Micro-batches per optimizer step.
        max_steps: Optimizer steps; None runs `epochs` epochs.
        epochs: Passes over the data when `max_steps` is None.
        lr: Peak learning rate.
        schedule: `cosine`, `linear` or `constant`.
        warmup_steps: Linear warmup steps.
        min_lr_ratio: Final learning rate as a fraction of `lr`.
        weight_decay: AdamW decoupled weight decay (on matrices only; norms and embeddings are not decayed).
        betas: AdamW betas.
        max_grad_norm: Global gradient-norm clipping (0: off).
        init_std: Standard deviation of the random initialisation (from scratch).
        train_on: For chats: `assistant`, `last` or `all` tokens (texts train on every token).
        loss_chunk: Label tokens per chunk of the cross-entropy.
        seed: Seed of the initialisation, the data order and dropout.
        dtype: `auto` (bf16 autocast on CUDA, fp32 on CPU), `float32` or `bfloat16`.
        device: `auto`, `cpu` or `cuda[:N]`.
        save_dtype: Dtype of the saved weights (`float32`, `bfloat16` or `float16`).
        save_every: Optimizer steps between checkpoints (0: only at the end).
        keep_checkpoints: Checkpoints kept.
        log_every: Steps between metric lines.
        resume: Continue from the run's newest checkpoint.
    """

    model: str = ""
    model_config: dict[str, Any] | str | None = None
    tokenizer: str = ""
    data: list[str] = field(default_factory=list)
    output: str = "model"
    run_dir: str | None = None
    seq_len: int = 256
    packing: bool = False
    batch_size: int = 32
    grad_accum: int = 1
    max_steps: int | None = None
    epochs: float = 1.0
    lr: float = 1e-3
    schedule: str = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.98)
    max_grad_norm: float = 1.0
    init_std: float = 0.02
    train_on: str = "assistant"
    loss_chunk: int = 4096
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    save_dtype: str = "bfloat16"
    save_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 10
    resume: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.data, (str, Path)):
            self.data = [str(self.data)]
        self.data = [str(d) for d in self.data]
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if bool(self.model) == (self.model_config is not None):
            raise ValueError("give either model (continue training a folder) or model_config (train from scratch)")
        if self.model_config is not None and not self.tokenizer:
            raise ValueError("training from scratch needs tokenizer: a folder with tokenizer.json")
        if not self.data:
            raise ValueError("no data given")
        if self.save_dtype not in DTYPE_NAMES:
            raise ValueError(f"save_dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.save_dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable data."""
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out


@dataclass
class PretrainResult:
    """What a finished run produced: the model folder, the step count and every loss of this process."""

    output: Path
    steps: int
    losses: list[float]
    tokens: int
    seconds: float


class PretrainRecipe:
    """A full-parameter training run (every weight of the model trains).

    Example:
        >>> PretrainRecipe(PretrainConfig(model_config="config.json", tokenizer="tok/", data=["d.jsonl"])).run()

    Args:
        config: The run configuration.
        console: Where progress goes.
        progress: Show the live progress bar.
    """

    def __init__(self, config: PretrainConfig, console: Console | None = None, progress: bool = True) -> None:
        self.cfg = config
        self.console = console or Console(stderr=True)
        self.show_progress = progress
        self.step = 0
        self.tokens_seen = 0
        self.losses: list[float] = []

    def setup(self) -> None:
        """Build or load the model, read and tokenize the data, build optimizer, scheduler and batch stream."""
        cfg = self.cfg
        self.device = resolve_device(cfg.device)
        if self.device.type == "cpu":
            tune_cpu_allocator()
        self.autocast = cfg.dtype in ("bfloat16", "bf16") or (cfg.dtype == "auto" and self.device.type == "cuda")
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.run_dir = Path(cfg.run_dir or f"{cfg.output}.run")
        if not cfg.resume and list_checkpoints(self.run_dir):
            raise FileExistsError(f"{self.run_dir} already holds checkpoints: pass resume=True or another run_dir")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.model:
            self.model = load_model(cfg.model, dtype=torch.float32, device=self.device)
            self.tokenizer_dir = Path(cfg.model)
        else:
            hf = cfg.model_config
            if not isinstance(hf, dict):
                hf = json.loads(Path(hf).read_text(encoding="utf-8"))
            mcfg = config_from_hf(dict(hf))
            mcfg.hf_config = dict(hf)
            self.model = Transformer(mcfg)
            self.model.init_weights(std=cfg.init_std, seed=cfg.seed)
            self.model.to(self.device)
            self.tokenizer_dir = Path(cfg.tokenizer)
        self.tokenizer = Tokenizer.from_dir(self.tokenizer_dir)
        self.model.train()
        self.params = dict(self.model.named_parameters())  # tied weights appear once
        for p in self.params.values():
            p.requires_grad_(True)
        n = sum(p.numel() for p in self.params.values())
        self.console.print(f"[bold]model[/bold] {self.model.config.family}, {n:,} parameters, all trained")
        self._setup_data()
        self.optimizer = self._optimizer()
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, cfg.warmup_steps, cfg.schedule,
                                         cfg.min_lr_ratio)  # fmt: skip
        resume_step = None
        if cfg.resume and list_checkpoints(self.run_dir):
            ckpt = latest_checkpoint(self.run_dir)
            state = load_checkpoint(ckpt, self.params, self.optimizer, self.scheduler)
            self.step, self.tokens_seen = state["step"], state["tokens_seen"]
            self.stream.load_state_dict(state["data"])
            resume_step = self.step
            self.console.print(f"[bold]resumed[/bold] from {ckpt} (step {self.step}/{self.total_steps})")
        self._batches = None
        self.metrics = MetricsWriter(self.run_dir, resume_step=resume_step)
        (self.run_dir / "pretrain.json").write_text(json.dumps(cfg.to_dict(), indent=1))

    def _optimizer(self) -> torch.optim.Optimizer:
        # Decay matrices only: decaying norm gains and embeddings hurts small models (the GPT-2 / nanoGPT rule).
        decay = [p for n, p in self.params.items() if p.ndim >= 2 and "embed" not in n]
        other = [p for n, p in self.params.items() if not (p.ndim >= 2 and "embed" not in n)]
        opt = build_optimizer([*decay, *other], self.cfg.lr, 0.0, self.cfg.betas)
        if self.cfg.weight_decay:
            group = opt.param_groups[0]
            opt.param_groups.clear()
            opt.add_param_group({**group, "params": decay, "weight_decay": self.cfg.weight_decay})
            opt.add_param_group({**group, "params": other, "weight_decay": 0.0})
        return opt

    def _setup_data(self) -> None:
        cfg = self.cfg
        examples = []
        for path in cfg.data:  # one file at a time: each may hold another format (text, chats)
            examples += load_dataset(path).examples
        tokenized: list[Tokenized] = []
        for e in examples:
            tokenized += [t for t in tokenize_example(e, self.tokenizer, cfg.seq_len, train_on=cfg.train_on)
                          if t.num_label_tokens]  # fmt: skip
        if not tokenized:
            raise ValueError("no sequence has a trainable token")
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        if cfg.packing:
            self.stream = BatchStream(pack(tokenized, cfg.seq_len, seed=cfg.seed), cfg.batch_size, seed=cfg.seed,
                                      pad_id=self.pad_id)  # fmt: skip
        else:
            batches = length_grouped_batches(tokenized, cfg.batch_size, seed=cfg.seed)
            self.stream = BatchStream(batches, 1, seed=cfg.seed, pad_id=self.pad_id)
        n_tokens = sum(len(t.input_ids) for t in tokenized)
        self.console.print(f"[bold]data[/bold] {len(examples):,} examples, {len(tokenized):,} sequences, "
                           f"{n_tokens:,} tokens, {len(self.stream):,} batches per epoch")  # fmt: skip
        per_epoch = max(1, len(self.stream) // cfg.grad_accum)
        self.total_steps = cfg.max_steps or max(1, math.ceil(per_epoch * cfg.epochs))

    def _next_batch(self) -> dict[str, Any]:
        for _ in range(2):
            if self._batches is None:
                self._batches = iter(self.stream)
            batch = next(self._batches, None)
            if batch is not None:
                return batch
            self._batches = None
        raise RuntimeError("the batch stream is empty")

    def loss_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """Forward one micro-batch: the summed token loss (with grad) and its label-token count."""
        b = {k: v.to(self.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        ctx = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with ctx:
            if self.cfg.packing:
                hidden = self.model(b["input_ids"], position_ids=b["position_ids"], segment_ids=b["segment_ids"],
                                    return_hidden=True)  # fmt: skip
            else:
                # One example per row, right-padded: a padding mask runs all rows' attention in one call (the
                # segment path loops over rows), and causal attention never lets a real token see the padding.
                hidden = self.model(b["input_ids"], attention_mask=b["segment_ids"] != 0,
                                    position_ids=b["position_ids"], return_hidden=True)  # fmt: skip
            return causal_lm_loss_sum(self.model, hidden, b["labels"], self.cfg.loss_chunk)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over `grad_accum` micro-batches (loss averaged over all their label tokens)."""
        cfg = self.cfg
        micro = [self._next_batch() for _ in range(cfg.grad_accum)]
        n_total = sum(int(b["num_label_tokens"]) for b in micro)
        loss_total = 0.0
        for b in micro:
            loss_sum, _ = self.loss_step(b)
            (loss_sum / max(n_total, 1)).backward()
            loss_total += float(loss_sum.detach())
        loss = loss_total / max(n_total, 1)
        params = list(self.params.values())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf")))
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            raise TrainingDivergedError(f"step {self.step + 1}: loss {loss}, gradient norm {grad_norm}: lower the lr")
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        tokens = sum(int((b["segment_ids"] != 0).sum()) for b in micro)
        self.tokens_seen += tokens
        return {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens}

    def _checkpoint(self, last: dict[str, Any]) -> None:
        state = {"tokens_seen": self.tokens_seen, "data": self.stream.state_dict(), "last": last}
        save_checkpoint(self.run_dir, self.step, self.params, self.optimizer, self.scheduler, state,
                        keep=self.cfg.keep_checkpoints)  # fmt: skip

    def train(self) -> tuple[float, int]:
        """Run optimizer steps up to `total_steps` with logging and checkpoints; returns (seconds, tokens)."""
        cfg = self.cfg
        t0, last, tokens0 = time.perf_counter(), {}, self.tokens_seen
        progress = make_progress(self.console, enabled=self.show_progress)
        try:
            with progress:
                task = progress.add_task("pretrain", total=self.total_steps, completed=self.step)
                while self.step < self.total_steps:
                    last = self.train_step()
                    self.losses.append(last["loss"])
                    last["elapsed_s"] = elapsed = time.perf_counter() - t0
                    if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                        self.metrics.write(last)
                    tps = (self.tokens_seen - tokens0) / max(elapsed, 1e-9)
                    progress.update(task, completed=self.step, loss=last["loss"], lr=last["lr"], tps=tps)
                    if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                        self._checkpoint(last)
        except KeyboardInterrupt:
            if last:
                self._checkpoint(last)
            raise
        finally:
            self.metrics.close()
        self._checkpoint(last)
        return time.perf_counter() - t0, self.tokens_seen - tokens0

    def save(self) -> Path:
        """Write the model folder: weights in `save_dtype`, `config.json` and the tokenizer files."""
        out = Path(self.cfg.output)
        self.model.eval()
        dtype = DTYPE_NAMES[self.cfg.save_dtype]
        original = {n: p.data for n, p in self.params.items()}
        try:
            for p in self.params.values():
                p.data = p.data.to(dtype)
            save_model(self.model, out)
        finally:
            for n, p in self.params.items():
                p.data = original[n]
        for name in TOKENIZER_FILES:
            src = self.tokenizer_dir / name
            if src.is_file() and src.resolve() != (out / name).resolve():
                shutil.copyfile(src, out / name)
        return out

    def run(self) -> PretrainResult:
        """Set up, train and save."""
        self.setup()
        seconds, tokens = self.train()
        out = self.save()
        self.console.print(f"[bold green]done[/bold green]: {self.step} steps in {seconds:.0f} s "
                           f"({tokens / max(seconds, 1e-9):,.0f} tok/s), final loss {self.losses[-1]:.4f}; "
                           f"model in {out}" if self.losses else f"nothing to train; model in {out}")  # fmt: skip
        return PretrainResult(out, self.step, list(self.losses), tokens, seconds)


def pretrain(progress: bool = True, console: Console | None = None, **options: Any) -> PretrainResult:
    """Full-parameter training: the Python form of `nomoat pretrain`.

    Args:
        progress: Show the live progress bar.
        console: Where to print (default: stderr).
        **options: `PretrainConfig` fields.

    Returns:
        The output folder, steps, losses, tokens and seconds.
    """
    return PretrainRecipe(PretrainConfig(**options), console=console, progress=progress).run()


__all__ = ["PretrainConfig", "PretrainRecipe", "PretrainResult", "pretrain"]
