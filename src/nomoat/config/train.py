"""The training run configuration: every knob of `nomoat train`, as plain data that round-trips through YAML.

A run is described by one `TrainConfig`. The command line, a YAML file and the Python function `nomoat.train(...)`
all build the same object: YAML values first, then explicit options on top. Unknown keys are errors with a
suggestion, never silently ignored; nothing in a config is executed or imported.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nomoat.config.lora import LoRAConfig

SCHEDULES = ("cosine", "linear", "constant")
TRAIN_ON = ("assistant", "all", "last")
QUANTIZE_BASE = (None, "int8", "int4", "nf4")
METHODS = ("sft", "dpo", "ipo", "simpo", "orpo", "kto", "grpo", "rloo")
RL_LOSS_TYPES = ("grpo", "dr_grpo", "dapo")


class ConfigError(ValueError):
    """A configuration value or file is invalid; the message says which key and what is expected."""


@dataclass
class TrainConfig:
    """Everything a supervised fine-tuning run needs.

    Attributes:
        model: Base model folder (Hugging Face format).
        data: Dataset files (JSON, JSONL, CSV, Parquet).
        format: Dataset format name, or `auto` to detect it from the records.
        columns: Maps the format's field names to the file's column names (`{"output": "answer"}`).
        name: Run name; the run folder is `output_dir/name`. Default: derived from the data file and the time.
        output_dir: Parent folder of run folders.
        lora: The adapter to train.
        seq_len: Longest training row in tokens; longer examples are truncated (text is cut into windows).
        packing: Pack short examples into rows of `seq_len` tokens (attention never crosses examples); when
            False, batches group examples of similar length and pad them.
        batch_size: Rows per micro-batch.
        grad_accum: Micro-batches per optimizer step; the loss is normalised over all of their label tokens.
        epochs: Passes over the training data (ignored when `max_steps` is set).
        max_steps: Optimizer steps to run; None runs `epochs` epochs.
        lr: Peak learning rate.
        schedule: `cosine`, `linear` (both decay to `min_lr_ratio * lr`) or `constant`.
        warmup_steps: Linear warmup steps; None uses `warmup_ratio` of all steps.
        warmup_ratio: Fraction of the steps spent warming up when `warmup_steps` is None.
        min_lr_ratio: Final learning rate as a fraction of `lr`.
        weight_decay: AdamW weight decay (decoupled).
        betas: AdamW betas.
        eps: AdamW epsilon.
        max_grad_norm: Clip the global gradient norm to this; 0 disables clipping.
        grad_checkpointing: Recompute each layer's activations in the backward pass (less memory, ~30% slower).
        loss_chunk: Label tokens per chunk of the cross-entropy; full-vocabulary logits never exist for more.
        train_on: `assistant` (assistant turns only), `all` (every token) or `last` (the last assistant turn).
        val_fraction: Fraction of the examples held out for validation (0 for none).
        val_size: A number of examples to hold out instead of a fraction.
        eval_every: Optimizer steps between validation losses (0: only at the end).
        save_every: Optimizer steps between checkpoints (0: only at the end).
        keep_checkpoints: Most recent checkpoints kept on disk.
        log_every: Optimizer steps between lines of `metrics.jsonl`.
        seed: Seed of the adapter's initialisation, dropout, data order and validation split.
        dtype: `auto` (bf16 autocast on CUDA; on CPU bf16 autocast for a checkpoint saved in bf16/fp16 where the
            CPU has native bf16 products, found at run time, else fp32; `NOMOAT_CPU_BF16=0/1` overrides),
            `float32`, or `bfloat16` (bf16 autocast over a bf16 frozen base, adapters and optimizer in fp32).
        device: `auto`, `cpu` or `cuda[:N]`.
        method: `sft` (supervised) or a preference method on prompt/chosen/rejected pairs: `dpo`, `ipo`, `simpo`,
            `orpo`.
        beta: The preference method's beta (unset: 0.1 for dpo, ipo and orpo, 2.0 for simpo).
        precompute_ref: DPO/IPO: compute the reference log-probabilities once before training (kept in the run
            folder) instead of a reference forward pass every step.
        init_adapter: Preference and RL methods: an adapter folder (e.g. from SFT) the trained adapter starts from;
            its frozen weights over the base are also the reference.
        desirable_weight: KTO: weight of the losses of desirable (label true) completions.
        undesirable_weight: KTO: weight of the losses of undesirable completions.
        reward: GRPO/RLOO: reward functions, each a built-in name or `module:function` (or `path.py:function`).
        reward_weights: GRPO/RLOO: one weight per reward function (default: 1 each).
        num_generations: GRPO/RLOO: completions sampled per prompt (a group).
        max_new_tokens: GRPO/RLOO: longest sampled completion in tokens.
        temperature: GRPO/RLOO: sampling temperature of the rollouts.
        loss_type: GRPO: `grpo` (per-sequence mean), `dr_grpo` (sum over sequences x max_new_tokens) or `dapo`
            (token-level over the step).
        epsilon: GRPO/RLOO: clipping range of the probability ratio.
        filter_groups: GRPO/RLOO: leave out of the loss the groups whose completions all got the same reward (their
            advantages are 0: no gradient), so the step's normalisation counts only groups that teach (DAPO's
            dynamic sampling, with `refill_rounds`).
        refill_rounds: GRPO/RLOO with `filter_groups`: up to this many more rollout batches per micro-batch, of the
            next prompts, to refill it with groups that teach (0: filter only).
        quantize_base: Quantize the frozen base (`int8`, `int4`, `nf4`) while the adapter trains in full precision.
        limit: Use only the first N examples of the data (quick experiments).
        resume: Continue the run from its newest checkpoint.
        fsdp: With several processes (`--nproc`, torchrun): shard the frozen base and the adapter over them (FSDP2).
    """

    model: str = ""
    data: list[str] = field(default_factory=list)
    format: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    name: str | None = None
    output_dir: str = "runs"
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    seq_len: int = 1024
    packing: bool = True
    batch_size: int = 4
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = None
    lr: float = 2e-4
    schedule: str = "cosine"
    warmup_steps: int | None = None
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    grad_checkpointing: bool = False
    loss_chunk: int = 256
    train_on: str = "assistant"
    val_fraction: float = 0.0
    val_size: int | None = None
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 42
    dtype: str = "auto"
    device: str = "auto"
    quantize_base: str | None = None
    limit: int | None = None
    resume: bool = False
    method: str = "sft"
    beta: float | None = None
    precompute_ref: bool = False
    init_adapter: str | None = None
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    reward: list[str] = field(default_factory=list)
    reward_weights: list[float] = field(default_factory=list)
    num_generations: int = 8
    max_new_tokens: int = 128
    temperature: float = 1.0
    loss_type: str = "dapo"
    epsilon: float = 0.2
    filter_groups: bool = False
    refill_rounds: int = 0
    fsdp: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoRAConfig.from_dict(self.lora)
        if isinstance(self.data, (str, Path)):
            self.data = [str(self.data)]
        self.data = [str(d) for d in self.data]
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        self.validate()

    def validate(self) -> None:
        """Check value ranges and choices.

        Raises:
            ConfigError: Naming the first key whose value is out of range, and what is allowed.
        """
        positive = ("seq_len", "batch_size", "grad_accum", "loss_chunk", "log_every", "keep_checkpoints")
        for key in positive:
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be at least 1 (or unset), got {self.max_steps}")
        if self.epochs <= 0:
            raise ConfigError(f"epochs must be positive, got {self.epochs}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.train_on not in TRAIN_ON:
            raise ConfigError(f"train_on must be one of {', '.join(TRAIN_ON)}, got {self.train_on!r}")
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.beta is not None and not (self.beta > 0 or (self.beta == 0 and self.method in ("grpo", "rloo"))):
            raise ConfigError(f"beta must be positive (or unset; 0 for grpo and rloo), got {self.beta}")
        if self.loss_type not in RL_LOSS_TYPES:
            raise ConfigError(f"loss_type must be one of {', '.join(RL_LOSS_TYPES)}, got {self.loss_type!r}")
        if self.num_generations < 2 or self.max_new_tokens < 1 or not self.temperature >= 0 or self.epsilon < 0:
            raise ConfigError("num_generations must be at least 2, max_new_tokens at least 1, temperature and "
                              "epsilon not negative")  # fmt: skip
        if self.refill_rounds < 0:
            raise ConfigError(f"refill_rounds must not be negative, got {self.refill_rounds}")
        if self.desirable_weight < 0 or self.undesirable_weight < 0:
            raise ConfigError("desirable_weight and undesirable_weight must not be negative")
        if self.quantize_base not in QUANTIZE_BASE:
            raise ConfigError(f"quantize_base must be int8, int4 or nf4 (or unset), got {self.quantize_base!r}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0 <= self.warmup_ratio < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("warmup_ratio must be in [0, 1) and min_lr_ratio in [0, 1]")
        if self.max_grad_norm < 0 or self.weight_decay < 0:
            raise ConfigError("max_grad_norm and weight_decay must not be negative")
        if not isinstance(self.fsdp, bool):
            raise ConfigError(f"fsdp must be true or false, got {self.fsdp!r}")
        if self.dtype not in ("auto", "float32", "fp32", "bfloat16", "bf16"):
            raise ConfigError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON/YAML-serialisable), with the LoRA section nested."""
        out = dataclasses.asdict(self)
        out["lora"] = self.lora.to_dict()
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build a config from plain data, refusing unknown keys.

        Args:
            data: Keys of `TrainConfig` (the `lora` key holds a dict of `LoRAConfig` keys).
            source: Where the data came from, for error messages (a file name).

        Raises:
            ConfigError: An unknown key (with the closest known one) or a bad value.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of option names to values, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                hint = difflib.get_close_matches(str(key), sorted(known), n=1)
                did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise ConfigError(
                    f"{source}: unknown option {key!r}{did_you_mean}. Known options: {', '.join(sorted(known))}"
                )
        try:
            return cls(**data)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: {exc}") from None


def load_train_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Read a YAML run file (if any) and apply overrides on top.

    Args:
        path: A YAML file of `TrainConfig` keys, or None.
        **overrides: Keys to set over the file's values; None values are ignored (an option not given). A `lora`
            override is a dict merged key by key into the file's `lora` section.

    Returns:
        The validated config.

    Raises:
        ConfigError: The file is missing, not YAML, not a mapping, or has unknown keys or bad values.
    """
    data: dict[str, Any] = {}
    source = "options"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of option names to values, got {type(loaded).__name__}")
        data = loaded
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "lora" and isinstance(value, dict):
            base = data.get("lora") or {}
            if not isinstance(base, dict):
                raise ConfigError(f"{source}: 'lora' must be a mapping")
            data["lora"] = {**base, **{k: v for k, v in value.items() if v is not None}}
        else:
            data[key] = value
    return TrainConfig.from_dict(data, source=source)
