"""`nomoat train` (LoRA fine-tuning from options and/or a YAML run file) and `nomoat pretrain` (all weights)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from nomoat.cli._common import fail as _fail


def _parse_columns(columns: list[str] | None) -> dict[str, str] | None:
    if not columns:
        return None
    out = {}
    for item in columns:
        field, sep, column = item.partition("=")
        if not sep or not field or not column:
            _fail(f"--columns {item!r}: expected FIELD=COLUMN, e.g. --columns output=answer")
        out[field] = column
    return out


Opt = typer.Option


def _launch(nproc: int) -> None:
    """Run this same command in `nproc` processes through torchrun, and exit with its status."""
    import subprocess
    import sys

    from nomoat.train.distributed import strip_option, torchrun_command

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _fail("--nproc inside a torchrun process", hint="give the process count to torchrun, or --nproc alone")
    proc = subprocess.Popen(torchrun_command(nproc, strip_option(sys.argv[1:], "--nproc")))
    while True:
        try:
            raise typer.Exit(proc.wait())
        except KeyboardInterrupt:  # torchrun and its workers got Ctrl-C too: wait while they checkpoint and stop
            continue


def engine_sampler(model: Any, tokenizer: Any, rows: int, max_seq_len: int) -> Any:
    """RL rollouts through nomoat's engine over the trained model itself.

    The engine's decode model (`nomoat.inference.prepare`) runs each LoRA layer as it is at each call, so every rollout
    uses the adapter as the last optimizer step left it, with no copy of weights per step. Its prompt-prefix cache is
    off: cached keys and values would hold an earlier step's adapter (a step's completions of one prompt still share
    its prefill).
    """
    from nomoat.generate.engine import Engine
    from nomoat.generate.sampling import SamplingParams

    engine = Engine(model, tokenizer, max_running=min(rows, 64), max_queue=max(rows, 256),
                    max_seq_len=max_seq_len, prefix_cache_bytes=0)  # fmt: skip

    def sample(requests: list[tuple[list[int], int]], temperature: float, max_new_tokens: int) -> list[Any]:
        handles = [engine.submit(ids, SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens,
                                                     seed=seed)) for ids, seed in requests]  # fmt: skip
        done = [h.result() for h in handles]
        return [(c.token_ids, c.text, c.finish_reason) for c in done]

    return sample


def _recipe(method: str) -> type:
    """The recipe class of a training method."""
    if method in ("grpo", "rloo"):
        from nomoat.train.rl import RLRecipe

        return RLRecipe
    from nomoat.train.preference import KTORecipe, PreferenceRecipe
    from nomoat.train.sft import SFTRecipe

    return {"sft": SFTRecipe, "kto": KTORecipe}.get(method, PreferenceRecipe)


def train(
    model: Annotated[
        str | None,
        typer.Argument(help="Base model folder (Hugging Face format); or set `model:` in --config."),
    ] = None,
    data: Annotated[
        list[str] | None,
        Opt("--data", "-d", help="Dataset file: JSON, JSONL, CSV or Parquet (repeatable)."),
    ] = None,
    config: Annotated[Path | None, Opt("--config", "-c", help="YAML run file; options given here override it.")] = None,
    format: Annotated[str | None, Opt(help="Data format: auto, alpaca, dolly, sharegpt, messages, text.")] = None,
    columns: Annotated[
        list[str] | None,
        Opt("--columns", help="Map a format field to your column: FIELD=COLUMN (repeatable)."),
    ] = None,
    name: Annotated[str | None, Opt(help="Run name (folder under --output-dir); needed to --resume.")] = None,
    output_dir: Annotated[
        str | None, Opt("--output-dir", help="Parent folder of run folders.", show_default="runs")
    ] = None,
    rank: Annotated[int | None, Opt("--rank", "-r", help="LoRA rank.", show_default="16", min=1)] = None,
    alpha: Annotated[float | None, Opt(help="LoRA alpha.", show_default="32")] = None,
    dropout: Annotated[float | None, Opt(help="LoRA dropout.", show_default="0")] = None,
    target: Annotated[
        list[str] | None,
        Opt(
            "--target",
            help="Module name to adapt (repeatable), or all-linear.",
            show_default="attention and MLP projections",
        ),
    ] = None,
    dora: Annotated[
        bool | None,
        Opt("--dora/--no-dora", help="Weight-decomposed LoRA (DoRA).", show_default=False),
    ] = None,
    rslora: Annotated[
        bool | None,
        Opt("--rslora/--no-rslora", help="Rank-stabilised scaling alpha/sqrt(r).", show_default=False),
    ] = None,
    train_module: Annotated[
        list[str] | None,
        Opt("--train-module", help="Also train this module fully: embed_tokens or lm_head (repeatable)."),
    ] = None,
    seq_len: Annotated[
        int | None, Opt("--seq-len", help="Longest training row in tokens.", show_default="1024", min=2)
    ] = None,
    packing: Annotated[
        bool | None,
        Opt("--packing/--no-packing", help="Pack short examples into full rows.", show_default="on"),
    ] = None,
    batch_size: Annotated[int | None, Opt("--batch-size", "-b", help="Rows per micro-batch.", show_default="4")] = None,
    grad_accum: Annotated[
        int | None,
        Opt("--grad-accum", help="Micro-batches per optimizer step.", show_default="1"),
    ] = None,
    epochs: Annotated[float | None, Opt(help="Passes over the data.", show_default="1")] = None,
    max_steps: Annotated[int | None, Opt("--max-steps", help="Optimizer steps (overrides --epochs).")] = None,
    lr: Annotated[float | None, Opt(help="Peak learning rate.", show_default="2e-4")] = None,
    schedule: Annotated[str | None, Opt(help="cosine, linear or constant.", show_default="cosine")] = None,
    warmup_steps: Annotated[
        int | None, Opt("--warmup-steps", help="Warmup steps.", show_default="3% of the steps")
    ] = None,
    weight_decay: Annotated[float | None, Opt("--weight-decay", help="AdamW weight decay.", show_default="0")] = None,
    max_grad_norm: Annotated[
        float | None,
        Opt("--max-grad-norm", help="Gradient clipping norm, 0 to disable.", show_default="1"),
    ] = None,
    grad_checkpointing: Annotated[
        bool | None,
        Opt(
            "--grad-checkpointing/--no-grad-checkpointing",
            help="Recompute activations in backward: less memory, slower.",
            show_default=False,
        ),
    ] = None,
    train_on: Annotated[
        str | None,
        Opt("--train-on", help="Tokens with a loss: assistant, all or last.", show_default="assistant"),
    ] = None,
    val_fraction: Annotated[
        float | None,
        Opt("--val-fraction", help="Fraction of examples held out for validation."),
    ] = None,
    val_size: Annotated[int | None, Opt("--val-size", help="Number of examples held out for validation.")] = None,
    eval_every: Annotated[int | None, Opt("--eval-every", help="Steps between validation losses.")] = None,
    save_every: Annotated[
        int | None,
        Opt("--save-every", help="Steps between checkpoints (0: only at the end)."),
    ] = None,
    seed: Annotated[int | None, Opt(help="Seed for initialisation, dropout and data order.", show_default="42")] = None,
    dtype: Annotated[str | None, Opt(help="auto (fp32 on CPU, bf16 autocast on CUDA), float32 or bfloat16.")] = None,
    device: Annotated[str | None, Opt(help="auto, cpu or cuda.")] = None,
    quantize_base: Annotated[
        str | None,
        Opt("--quantize-base", help="QLoRA: quantize the frozen base to int8, int4 or nf4."),
    ] = None,
    limit: Annotated[int | None, Opt(help="Use only the first N examples.")] = None,
    resume: Annotated[
        bool,
        Opt("--resume", help="Continue the run named by --name from its newest checkpoint."),
    ] = False,
    progress: Annotated[bool, Opt("--progress/--no-progress", help="Show the live progress bar.")] = True,
    nproc: Annotated[
        int, Opt("--nproc", help="Data-parallel processes on this machine (started with torchrun).", min=1)
    ] = 1,
    method: Annotated[
        str | None,
        Opt("--method", help="sft; dpo, ipo, simpo, orpo (prompt/chosen/rejected pairs); kto (prompt/completion/"
            "label); grpo, rloo (prompts and --reward).", show_default="sft"),
    ] = None,
    beta: Annotated[
        float | None,
        Opt("--beta", help="Preference/RL: beta (default 0.1; simpo 2.0; grpo 0, rloo 0.05: the KL weight)."),
    ] = None,
    precompute_ref: Annotated[
        bool,
        Opt("--precompute-ref", help="DPO/IPO: compute the reference log-probabilities once before training."),
    ] = False,
    fsdp: Annotated[
        bool,
        Opt("--fsdp", help="With several processes: shard the frozen base and the adapter over them (FSDP2)."),
    ] = False,
    reward: Annotated[
        list[str] | None,
        Opt("--reward", help="GRPO/RLOO: a reward (repeatable): exact_match, digit_match, numeric_match, json_valid, "
            "regex=P, length=N, or MODULE:FUNC / file.py:FUNC."),
    ] = None,
    reward_weight: Annotated[
        list[float] | None, Opt("--reward-weight", help="GRPO/RLOO: one weight per --reward (repeatable).")
    ] = None,
    num_generations: Annotated[
        int | None, Opt("--num-generations", help="GRPO/RLOO: completions per prompt.", show_default="8")
    ] = None,
    max_new_tokens: Annotated[
        int | None, Opt("--max-new-tokens", help="GRPO/RLOO: longest completion.", show_default="128")
    ] = None,
    temperature: Annotated[
        float | None, Opt("--temperature", help="GRPO/RLOO: sampling temperature.", show_default="1")
    ] = None,
    loss_type: Annotated[
        str | None, Opt("--loss-type", help="GRPO: grpo, dr_grpo or dapo.", show_default="dapo")
    ] = None,
    epsilon: Annotated[float | None, Opt("--epsilon", help="GRPO/RLOO: ratio clipping.", show_default="0.2")] = None,
    filter_groups: Annotated[
        bool | None,
        Opt("--filter-groups/--no-filter-groups", help="GRPO/RLOO: leave out of the loss the groups whose completions "
            "all got the same reward (no gradient), as DAPO's dynamic sampling.", show_default=False),
    ] = None,
    refill_rounds: Annotated[
        int | None,
        Opt("--refill-rounds", help="GRPO/RLOO with --filter-groups: up to N more rollout batches of the next "
            "prompts per micro-batch, to refill the step with groups that teach.", show_default="0", min=0),
    ] = None,
    desirable_weight: Annotated[
        float | None, Opt("--desirable-weight", help="KTO: weight of desirable examples.", show_default="1")
    ] = None,
    undesirable_weight: Annotated[
        float | None, Opt("--undesirable-weight", help="KTO: weight of undesirable examples.", show_default="1")
    ] = None,
    init_adapter: Annotated[
        str | None,
        Opt("--init-adapter", help="Preference/RL: start from this adapter; its frozen weights are the reference."),
    ] = None,
) -> None:
    """Fine-tune a LoRA adapter on your data: instructions, preferences (DPO, KTO...), rewards (GRPO, RLOO), raw text.

    Writes the run folder (checkpoints, metrics.jsonl, loss.png, TensorBoard events) and the adapter in PEFT's format
    with a nomoat.json provenance record. Every option can also be set in a YAML file given with --config.
    """
    if nproc > 1:
        _launch(nproc)
    from nomoat.config.train import ConfigError, load_train_config
    from nomoat.models.checkpoint import CheckpointError
    from nomoat.models.families import UnsupportedModelError
    from nomoat.train import TrainingDivergedError

    lora = {"r": rank, "alpha": alpha, "dropout": dropout, "target_modules": target, "use_dora": dora,
            "use_rslora": rslora, "modules_to_save": train_module}  # fmt: skip
    options = dict(
        model=model, data=data, format=format, columns=_parse_columns(columns), name=name, output_dir=output_dir,
        lora=lora, seq_len=seq_len, packing=packing, batch_size=batch_size, grad_accum=grad_accum, epochs=epochs,
        max_steps=max_steps, lr=lr, schedule=schedule, warmup_steps=warmup_steps, weight_decay=weight_decay,
        max_grad_norm=max_grad_norm, grad_checkpointing=grad_checkpointing, train_on=train_on,
        val_fraction=val_fraction, val_size=val_size, eval_every=eval_every, save_every=save_every, seed=seed,
        dtype=dtype, device=device, quantize_base=quantize_base, limit=limit, resume=resume or None,
        method=method, beta=beta, precompute_ref=precompute_ref or None, init_adapter=init_adapter, reward=reward,
        reward_weights=reward_weight, num_generations=num_generations, max_new_tokens=max_new_tokens,
        temperature=temperature, loss_type=loss_type, epsilon=epsilon, filter_groups=filter_groups,
        refill_rounds=refill_rounds, desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight, fsdp=fsdp or None,
    )  # fmt: skip
    try:
        cfg = load_train_config(config, **options)
        extra = {"sampler": engine_sampler} if cfg.method in ("grpo", "rloo") else {}
        recipe = _recipe(cfg.method)(cfg, progress=progress, **extra)
        recipe.run()
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except (ConfigError, CheckpointError, UnsupportedModelError, TrainingDivergedError, FileExistsError,
            FileNotFoundError, ValueError) as e:  # fmt: skip
        _fail(e)  # a NomoatError (DataError, AdapterError...) goes on as it is, with its hint


def pretrain(
    data: Annotated[list[Path], typer.Option("--data", help="Dataset file (text and/or chats); repeat for more.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The model folder to write.")],
    model: Annotated[Path | None, typer.Option(help="Continue training this model folder (all its weights).")] = None,
    config: Annotated[
        Path | None, typer.Option(help="A Hugging Face config.json to train from scratch (with --tokenizer).")
    ] = None,
    tokenizer: Annotated[Path | None, typer.Option(help="Folder with tokenizer.json (from scratch).")] = None,
    run_dir: Annotated[Path | None, typer.Option(help="Checkpoints and metrics (default: OUT.run).")] = None,
    seq_len: Annotated[int, typer.Option(help="Longest training sequence in tokens.", min=2)] = 256,
    batch_size: Annotated[int, typer.Option(help="Sequences per micro-batch.", min=1)] = 32,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.", min=1)] = 1,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps (default: --epochs over the data).")] = None,
    epochs: Annotated[float, typer.Option(help="Passes over the data when --max-steps is not given.")] = 1.0,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-3,
    warmup_steps: Annotated[int, typer.Option(help="Linear warmup steps.")] = 100,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay on matrices.")] = 0.0,
    packing: Annotated[bool, typer.Option(help="Pack examples into full rows instead of padding.")] = False,
    train_on: Annotated[str, typer.Option(help="Chats: assistant, last or all tokens.")] = "assistant",
    save_dtype: Annotated[str, typer.Option(help="Dtype of the saved weights.")] = "bfloat16",
    save_every: Annotated[int, typer.Option(help="Steps between checkpoints (0: only at the end).")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of initialisation and data order.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run's newest checkpoint.")] = False,
    nproc: Annotated[int, Opt("--nproc", help="Data-parallel processes on this machine (started with torchrun).",
                              min=1)] = 1,  # fmt: skip
) -> None:
    """Full-parameter training: from scratch (--config + --tokenizer) or continued from a model folder (--model).

    Reads text (`{"text": ...}`) and chat (`{"messages": [...]}`) files, trains every weight with AdamW and a
    cosine schedule, checkpoints atomically (resume with --resume), and writes a Hugging Face model folder.
    """
    if nproc > 1:
        _launch(nproc)
    from nomoat.train.pretrain import PretrainConfig, PretrainRecipe

    if (model is None) == (config is None):
        _fail("give --model (continue training) or --config with --tokenizer (from scratch)")
    try:
        cfg = PretrainConfig(model=str(model or ""), model_config=str(config) if config else None,
                             tokenizer=str(tokenizer or ""), data=[str(d) for d in data], output=str(out),
                             run_dir=str(run_dir) if run_dir else None, seq_len=seq_len, batch_size=batch_size,
                             grad_accum=grad_accum, max_steps=max_steps, epochs=epochs, lr=lr,
                             warmup_steps=warmup_steps, weight_decay=weight_decay, packing=packing, train_on=train_on,
                             save_dtype=save_dtype, save_every=save_every, seed=seed, device=device,
                             resume=resume)  # fmt: skip
        PretrainRecipe(cfg).run()
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        _fail(e)
