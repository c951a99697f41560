"""Supervised LoRA fine-tuning (`nomoat train`): a recipe on the shared training loop.

It owns what is particular to SFT: the run folder's name, the base model (optionally quantized) with LoRA injected,
the data (read, tokenized with the chat template's masking, split for validation, packed or length-grouped), the
causal-LM loss over label tokens, and the adapter it saves in PEFT's format with a `nomoat.json` provenance record.
The loop (`nomoat.train.loop`) does the rest.
"""

from __future__ import annotations

import hashlib
import json
import math
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
from nomoat.lora import count_parameters, inject_lora, save_adapter, trainable_parameters
from nomoat.lora.nf4 import load_model_nf4
from nomoat.models.checkpoint import load_model
from nomoat.models.load_plan import IntQuantizer
from nomoat.models.safetensors_check import check_safetensors
from nomoat.tokenizer import Tokenizer
from nomoat.train.checkpointing import RunExistsError, RunNotFoundError, disk_errors
from nomoat.train.loop import LoopResult, TrainingDivergedError, TrainingLoop
from nomoat.train.loss import causal_lm_loss_sum
from nomoat.util.errors import UsageError
from nomoat.util.files import atomic_write_text, sha256_file
from nomoat.util.hub import local_path


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


def model_content_hash(folder: str | Path) -> str:
    """SHA-256 over a model folder's config and weight files (names and bytes), identifying the exact base."""
    folder = Path(folder)
    h = hashlib.sha256()
    for f in sorted(list(folder.glob("*.safetensors")) + [folder / "config.json"]):
        if f.is_file():
            h.update(f.name.encode())
            h.update(sha256_file(f).encode())
    return h.hexdigest()


def check_options(cfg: TrainConfig) -> None:
    """Check what only shows once the model is loaded, before it is: the run name and the shortest row.

    Raises:
        UsageError: Naming the option (`--name`, `--seq-len`) and what it accepts.
    """
    name = cfg.name
    if name is not None and (name in ("", ".", "..") or any(c in name for c in "/\\") or Path(name).is_absolute()):
        raise UsageError(f"--name {name!r}: a run name is one folder name under --output-dir (no '/', '\\' or '..')",
                         hint="name the run plainly; choose where runs go with --output-dir")  # fmt: skip
    if cfg.seq_len < 2:
        raise UsageError(f"--seq-len {cfg.seq_len}: a training row needs at least 2 tokens (one to read, one to "
                         "predict)", hint="pass --seq-len 2 or more (the default is 1024)")  # fmt: skip


class SFTRecipe(TrainingLoop):
    """A LoRA supervised fine-tuning run.

    Example:
        >>> result = SFTRecipe(TrainConfig(model="path/to/model", data=["chat.jsonl"], max_steps=100)).run()

    Args:
        config: The run configuration.
        console: Where progress and the summary go (a quiet console silences them).
        progress: Show the live progress bar.
    """

    def __init__(self, config: TrainConfig, console: Console | None = None, progress: bool = True) -> None:
        super().__init__(config, console, progress)

    def build(self) -> None:
        """Read the data, load the model and tokenizer, inject LoRA, tokenize and batch the data."""
        cfg = self.cfg
        if not cfg.model:
            raise UsageError("no model given", hint="pass a model folder (nomoat train MODEL --data FILE)")
        if not cfg.data:
            raise UsageError("no data given", hint="pass --data FILE (JSON, JSONL, CSV or Parquet)")
        check_options(cfg)
        if self.settings.fsdp and cfg.quantize_base:
            raise UsageError("--fsdp shards the base in its own dtype; it cannot shard a quantized base",
                             hint="drop --quantize-base (sharding already divides the base's memory by the processes)")
        if self.settings.fsdp and not self.dist.enabled:
            self.console.print("[yellow]--fsdp: one process, nothing to shard (start it with --nproc N or torchrun)"
                               "[/yellow]")  # fmt: skip
        # Read and validate the data before the (possibly large) model: bad records fail in seconds.
        self.dataset = load_dataset(cfg.data, format=cfg.format, columns=cfg.columns or None, limit=cfg.limit)
        if cfg.method == "sft" and self.dataset.format == "preference":
            raise UsageError(f"{cfg.data[0]} holds preference pairs (prompt/chosen/rejected), not SFT examples",
                             hint="use --method dpo (or ipo, simpo, orpo) to learn from pairs")  # fmt: skip
        if cfg.method == "sft" and self.dataset.format in ("kto", "prompt"):
            what = "unpaired feedback (prompt/completion/label)" if self.dataset.format == "kto" else "prompts only"
            raise UsageError(f"{cfg.data[0]} holds {what}, not SFT examples",
                             hint="use --method kto" if self.dataset.format == "kto" else
                             "use --method grpo or rloo with --reward")  # fmt: skip
        self.check_dataset()
        self.run_dir = self.dist.from_main(self._run_dir)  # rank 0 picks the folder; the others use it
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.name = self.run_dir.name
        self.console.print(f"[bold]model[/bold] {cfg.model}")
        folder = Path(cfg.model).expanduser()
        for f in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
            check_safetensors(f)  # a download cut short says so, not how its offsets disagree
        dtype = torch.bfloat16 if self.autocast else torch.float32
        if cfg.quantize_base == "nf4":  # quantized as it is read: the base never exists in full precision
            self.model = load_model_nf4(cfg.model, dtype=dtype, device=self.device)
        else:
            quantizer = IntQuantizer(cfg.quantize_base, include_lm_head=False) if cfg.quantize_base else None
            self.model = load_model(cfg.model, dtype=dtype, device=self.device, quantize=quantizer)
        self.tokenizer = Tokenizer.from_dir(cfg.model)
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
        self.console.print(f"[bold]LoRA[/bold] r={cfg.lora.r} alpha={cfg.lora.alpha} on {targets}: {trainable:,} "
                           f"trainable of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)")  # fmt: skip
        self._setup_data()

    def check_dataset(self) -> None:
        """A recipe's own checks of the data, run before the model loads (none for SFT)."""

    def _run_dir(self) -> Path:
        cfg = self.cfg
        name = cfg.name or f"{Path(cfg.model).name or 'model'}-{Path(cfg.data[0]).stem if cfg.data else 'data'}"
        run_dir = Path(cfg.output_dir).expanduser() / name
        if not cfg.resume and run_dir.exists() and any(run_dir.iterdir()):
            if cfg.name:
                raise RunExistsError(f"{run_dir} already holds a run",
                                     hint="pass --resume to continue it, or another --name")  # fmt: skip
            i = 2
            while (run_dir.parent / f"{name}-{i}").exists():
                i += 1
            run_dir = run_dir.parent / f"{name}-{i}"
        if cfg.resume and not run_dir.exists():
            raise RunNotFoundError(f"{run_dir}: no run to resume", hint="check --name and --output-dir")
        self.created_run_dir = not run_dir.exists()
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
        self.pad_id = pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        bs, shard = cfg.batch_size * self.dist.world_size, self.dist.shard  # global batches, this rank's share
        if cfg.packing:
            self.stream = BatchStream(pack(tok, cfg.seq_len, seed=cfg.seed), bs, seed=cfg.seed, pad_id=pad,
                                      shard=shard)  # fmt: skip
        else:
            self.stream = BatchStream(length_grouped_batches(tok, bs, seed=cfg.seed), 1, seed=cfg.seed, pad_id=pad,
                                      shard=shard)  # fmt: skip
        if vtok:
            vrows = pack(vtok, cfg.seq_len, seed=cfg.seed) if cfg.packing else [Row.single(t) for t in vtok]
            bs = cfg.batch_size
            self.val_batches = [collate(vrows[i : i + bs], pad) for i in range(0, len(vrows), bs)]
        per_epoch = max(1, len(self.stream) // cfg.grad_accum)
        self.total_steps = cfg.max_steps or max(1, math.ceil(per_epoch * cfg.epochs))

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """The summed next-token loss over the label tokens of one micro-batch, and their count."""
        hidden = self.model(batch["input_ids"], position_ids=batch["position_ids"], segment_ids=batch["segment_ids"],
                            return_hidden=True)  # fmt: skip
        return causal_lm_loss_sum(self.model, hidden, batch["labels"], self.cfg.loss_chunk)

    def step_metrics(self, micro: list[dict[str, Any]], units: int) -> dict[str, Any]:
        """Label tokens of the step and the fractional epoch reached."""
        return {"label_tokens": units, "epoch": round(self.stream.epoch + self.stream.index / len(self.stream), 4)}

    def write_run_config(self) -> None:
        """`config.yaml`: the run's configuration."""
        import yaml

        atomic_write_text(self.run_dir / "config.yaml",
                          yaml.safe_dump(json.loads(json.dumps(self.cfg.to_dict())), sort_keys=False))  # fmt: skip

    @property
    def resume_flags(self) -> str:
        """What to add to the same command to continue an interrupted run."""
        return f"--resume --name {self.name}"

    def finished_output(self) -> Path | None:
        """The adapter of a finished run, if it was written."""
        adapter = self.run_dir / "adapter"
        return adapter if (adapter / "adapter_model.safetensors").is_file() else None

    def finish(self, out: LoopResult) -> TrainResult:
        """Save the adapter and the loss curve, print the summary."""
        result = TrainResult(run_dir=self.run_dir, adapter_dir=self.run_dir / "adapter", steps=out.steps,
                             losses=out.losses, final_loss=out.last.get("loss"), val_loss=out.val_loss,
                             tokens=out.tokens, seconds=out.seconds, metrics=out.last)  # fmt: skip
        with self.full_params():  # sharded (--fsdp): the adapter is gathered whole on rank 0 to be saved
            self.save(result)
        self._summary(result)
        return result

    def save(self, result: TrainResult) -> Path:
        """Save the adapter (PEFT format, provenance in `nomoat.json`) and the loss curve; returns the adapter dir."""
        cfg = self.cfg
        local = Path(local_path(cfg.model)).expanduser().resolve()  # `demo` or a Hub id: the folder it names
        provenance = {
            "base_model": {"path": str(local), "sha256": model_content_hash(local), "family": self.model.config.family},
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
        if not self.dist.is_main:  # rank 0 writes the adapter
            return result.adapter_dir
        if fallback:  # the data was rendered with nomoat's default template: inference must use it too
            provenance["chat_template"] = "nomoat default (ChatML); the base model has none"
        size = sum(p.numel() * p.element_size() for p in self.params.values())
        with disk_errors(result.adapter_dir.parent, "the adapter", lambda: size):
            save_adapter(self.model, result.adapter_dir, cfg.lora, base_model_name_or_path=cfg.model,
                         provenance=provenance)  # fmt: skip
        if fallback:
            atomic_write_text(result.adapter_dir / "chat_template.jinja", DEFAULT_CHAT_TEMPLATE)
        self.write_loss_curve()
        return result.adapter_dir

    def _summary(self, r: TrainResult) -> None:
        first = f"{self.losses[0]:.4f} -> " if self.losses else ""
        final = f"{r.final_loss:.4f}" if r.final_loss is not None else "unknown"
        lines = [
            f"[bold green]done[/bold green]: {r.steps} steps in {r.seconds:.1f} s, {r.tokens:,} tokens "
            f"({r.tokens / max(r.seconds, 1e-9):.0f} tok/s)",
            f"loss {first}{final}" + (f", validation {r.val_loss:.4f}" if r.val_loss is not None else ""),
            f"adapter  {r.adapter_dir}",
            f"metrics  {self.metrics.path}  (loss curve: {self.run_dir / 'loss.png'})",
            f"chat     nomoat chat {self.cfg.model} --adapter {r.adapter_dir}",
        ]
        for line in lines:
            self.console.print(line)


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


__all__ = ["SFTRecipe", "TrainConfig", "TrainResult", "TrainingDivergedError", "model_content_hash", "train"]
