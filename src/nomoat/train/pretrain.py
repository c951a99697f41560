"""Full-parameter (pre)training, from scratch from a config or continued from a model folder: a recipe on the loop.

It owns what is particular to it: the model (built from a Hugging Face config and randomly initialised, or loaded),
every weight trained (AdamW decay on matrices only), the data (text and chat files, mixed, tokenized with the chat
template's assistant masking, length-grouped or packed), the causal-LM loss, and the Hugging Face model folder it
writes (weights, `config.json`, the tokenizer files) that `nomoat.load` and `transformers` both read. The loop
(`nomoat.train.loop`) does the rest, so a killed run resumes to the exact data position and RNG state.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from nomoat.data import (
    BatchStream,
    NoTrainableTokensError,
    Tokenized,
    length_grouped_batches,
    load_dataset,
    pack,
    tokenize_example,
)
from nomoat.models.checkpoint import DTYPE_NAMES, load_model, save_model
from nomoat.models.families import config_from_hf
from nomoat.models.transformer import Transformer
from nomoat.tokenizer import Tokenizer
from nomoat.train.checkpointing import RunExistsError, list_checkpoints
from nomoat.train.loop import LoopResult, TrainingLoop
from nomoat.train.loss import causal_lm_loss_sum
from nomoat.train.optim import build_optimizer
from nomoat.util.errors import InputError, UsageError
from nomoat.util.files import atomic_write_text, read_json

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
            raise UsageError("give either model (continue training a folder) or model_config (train from scratch)")
        if self.model_config is not None and not self.tokenizer:
            raise UsageError("training from scratch needs tokenizer: a folder with tokenizer.json")
        if not self.data:
            raise UsageError("no data given")
        if self.save_dtype not in DTYPE_NAMES:
            raise UsageError(f"save_dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.save_dtype!r}")

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


class PretrainRecipe(TrainingLoop):
    """A full-parameter training run (every weight of the model trains).

    Example:
        >>> PretrainRecipe(PretrainConfig(model_config="config.json", tokenizer="tok/", data=["d.jsonl"])).run()

    Args:
        config: The run configuration.
        console: Where progress goes.
        progress: Show the live progress bar.
    """

    label = "pretrain"
    resume_requires_checkpoint = False  # resuming a run that never saved starts it
    log_tokens_per_s = False

    def __init__(self, config: PretrainConfig, console: Console | None = None, progress: bool = True) -> None:
        super().__init__(config, console, progress)

    def build(self) -> None:
        """Build or load the model, read, tokenize and batch the data."""
        cfg = self.cfg
        self.run_dir = Path(cfg.run_dir or f"{cfg.output}.run")
        self.name = self.run_dir.name
        if not cfg.resume and list_checkpoints(self.run_dir):
            raise RunExistsError(f"{self.run_dir} already holds checkpoints",
                                 hint="pass resume=True (--resume) or another run_dir")  # fmt: skip
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.model:
            self.model = load_model(cfg.model, dtype=torch.float32, device=self.device)
            self.tokenizer_dir = Path(cfg.model)
        else:
            hf = cfg.model_config
            hf = hf if isinstance(hf, dict) else read_json(hf, error=InputError)
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

    def build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW; weight decay on matrices only (decaying norm gains and embeddings hurts small models)."""
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
            raise NoTrainableTokensError("no sequence has a trainable token")
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        bs, shard = cfg.batch_size * self.dist.world_size, self.dist.shard  # global batches, this rank's share
        if cfg.packing:
            self.stream = BatchStream(pack(tokenized, cfg.seq_len, seed=cfg.seed), bs, seed=cfg.seed,
                                      pad_id=self.pad_id, shard=shard)  # fmt: skip
        else:
            batches = length_grouped_batches(tokenized, bs, seed=cfg.seed)
            self.stream = BatchStream(batches, 1, seed=cfg.seed, pad_id=self.pad_id, shard=shard)
        n_tokens = sum(len(t.input_ids) for t in tokenized)
        self.console.print(f"[bold]data[/bold] {len(examples):,} examples, {len(tokenized):,} sequences, "
                           f"{n_tokens:,} tokens, {len(self.stream):,} batches per epoch")  # fmt: skip
        per_epoch = max(1, len(self.stream) // cfg.grad_accum)
        self.total_steps = cfg.max_steps or max(1, math.ceil(per_epoch * cfg.epochs))

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """The summed next-token loss over the label tokens of one micro-batch, and their count."""
        if self.cfg.packing:
            hidden = self.model(batch["input_ids"], position_ids=batch["position_ids"],
                                segment_ids=batch["segment_ids"], return_hidden=True)  # fmt: skip
        else:
            # One example per row, right-padded: a padding mask runs all rows' attention in one call (the segment
            # path loops over rows), and causal attention never lets a real token see the padding.
            hidden = self.model(batch["input_ids"], attention_mask=batch["segment_ids"] != 0,
                                position_ids=batch["position_ids"], return_hidden=True)  # fmt: skip
        return causal_lm_loss_sum(self.model, hidden, batch["labels"], self.cfg.loss_chunk)

    def write_run_config(self) -> None:
        """`pretrain.json`: the run's configuration."""
        atomic_write_text(self.run_dir / "pretrain.json", json.dumps(self.cfg.to_dict(), indent=1))

    def save(self) -> Path:
        """Write the model folder: weights in `save_dtype`, `config.json` and the tokenizer files."""
        out = Path(self.cfg.output)
        if not self.dist.is_main:  # rank 0 writes the model
            return out
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

    def finish(self, result: LoopResult) -> PretrainResult:
        """Save the model folder and print the closing line."""
        out = self.save()
        seconds, tokens = result.seconds, result.tokens
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
