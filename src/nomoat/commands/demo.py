"""`nomoat demo` (the whole path on the embedded tiny model) and `nomoat pretrain` (full-parameter training)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from nomoat.commands._common import fail


def demo(
    quick: Annotated[
        bool, typer.Option("--quick", help="A smaller run (fewer facts and steps), under a minute.")
    ] = False,
    name: Annotated[str, typer.Option(help="Registry name of the trained adapter (replaced if present).")] = (
        "demo-handbook"
    ),
    model: Annotated[Path | None, typer.Option(help="Base model folder (default: the embedded tiny model).")] = None,
    steps: Annotated[int | None, typer.Option(help="LoRA training steps (default: 320, with --quick 120).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Also print the measurements as one JSON line.")] = False,
) -> None:
    """See the whole path in minutes: a tiny model answers, learns a new task with LoRA, and is saved for serving.

    The embedded model (about 5M parameters, trained from scratch by nomoat on generated tasks) is scored on
    questions about a company handbook it has never seen, fine-tuned with a LoRA adapter on that handbook, scored
    again on held-out phrasings, and the adapter is saved in the registry ($NOMOAT_HOME, default ~/.nomoat).
    """
    import dataclasses

    from nomoat.demo.run import FULL, QUICK, run_demo

    settings = QUICK if quick else FULL
    if steps is not None:
        if steps < 1:
            fail("--steps must be at least 1")
        settings = dataclasses.replace(settings, steps=steps)
    if model is not None and not (model / "config.json").is_file():
        fail(f"{model} is not a model folder (no config.json)")
    result = run_demo(quick=quick, name=name, model_dir=model, settings=settings)
    if as_json:
        typer.echo(json.dumps(result.to_dict()))


def pretrain(
    data: Annotated[list[Path], typer.Option("--data", help="Dataset file (text and/or chats); repeat for more.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The model folder to write.")],
    model: Annotated[Path | None, typer.Option(help="Continue training this model folder (all its weights).")] = None,
    config: Annotated[
        Path | None, typer.Option(help="A Hugging Face config.json to train from scratch (with --tokenizer).")
    ] = None,
    tokenizer: Annotated[Path | None, typer.Option(help="Folder with tokenizer.json (from scratch).")] = None,
    run_dir: Annotated[Path | None, typer.Option(help="Checkpoints and metrics (default: OUT.run).")] = None,
    seq_len: Annotated[int, typer.Option(help="Longest training sequence in tokens.")] = 256,
    batch_size: Annotated[int, typer.Option(help="Sequences per micro-batch.")] = 32,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
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
) -> None:
    """Full-parameter training: from scratch (--config + --tokenizer) or continued from a model folder (--model).

    Reads text (`{"text": ...}`) and chat (`{"messages": [...]}`) files, trains every weight with AdamW and a
    cosine schedule, checkpoints atomically (resume with --resume), and writes a Hugging Face model folder.
    """
    from nomoat.train.pretrain import PretrainConfig, PretrainRecipe

    if (model is None) == (config is None):
        fail("give --model (continue training) or --config with --tokenizer (from scratch)")
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
        fail(str(e))


def register(app: typer.Typer) -> None:
    """Add this module's command(s) to the `nomoat` app."""
    app.command()(demo)
    app.command()(pretrain)
