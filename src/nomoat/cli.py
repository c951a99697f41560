"""The `nomoat` command line: one subcommand per stage, each a typed function whose docstring is its help."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from nomoat.commands._common import (
    Adapter,
    Compile,
    Device,
    Dtype,
    MaxTokens,
    Merge,
    MinP,
    Model,
    Quantize,
    Seed,
    Stop,
    Temperature,
    TopK,
    TopP,
)
from nomoat.commands._common import (
    engine_for as _engine_for,
)
from nomoat.commands._common import (
    fail as _fail,
)
from nomoat.commands._common import (
    human as _human,
)
from nomoat.commands._common import (
    load_with_adapters as _load_with_adapters,
)
from nomoat.commands._common import (
    resolve_adapters as _resolve_adapters,
)
from nomoat.commands._common import (
    sampling as _sampling,
)

app = typer.Typer(
    name="nomoat",
    help="Load open-weight LLMs, fine-tune them with LoRA, keep and stack adapters, serve them privately. Offline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def info(
    path: Annotated[Path, typer.Argument(help="A Hugging Face-format model folder (config.json + safetensors).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Describe a model folder: family, parameters, dtype, context length, vocabulary, chat template."""
    from nomoat.models.checkpoint import CheckpointError, checkpoint_summary, load_config
    from nomoat.models.families import UnsupportedModelError

    try:
        cfg = load_config(path)
        summary = checkpoint_summary(path)
    except (CheckpointError, UnsupportedModelError) as e:
        _fail(str(e))
    chat_template, tokenizer_error = _chat_template_state(path)
    report = {
        "path": str(path),
        "family": cfg.family,
        "architecture": (cfg.hf_config.get("architectures") or [None])[0],
        "parameters": summary["parameters"],
        "dtype": max(summary["dtypes"], key=summary["dtypes"].get) if summary["dtypes"] else None,
        "size_bytes": summary["bytes"],
        "context_length": cfg.max_position_embeddings,
        "vocab_size": cfg.vocab_size,
        "layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "heads": cfg.num_heads,
        "kv_heads": cfg.num_kv_heads,
        "tied_embeddings": cfg.tie_word_embeddings,
        "sliding_window": cfg.sliding_window if "sliding_attention" in cfg.layer_types else None,
        "rope": cfg.rope["full_attention"]["rope_type"] if "full_attention" in cfg.rope else None,
        "chat_template": chat_template,
        "tokenizer_error": tokenizer_error,
    }
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    rows = [
        ("family", f"{report['family']} ({report['architecture']})"),
        ("parameters", f"{_human(report['parameters'])} ({report['parameters']:,})"),
        ("dtype", f"{report['dtype']} ({_human(report['size_bytes'], 'B')})"),
        ("context length", f"{report['context_length']:,}"),
        ("vocabulary", f"{report['vocab_size']:,}"),
        ("layers", f"{cfg.num_layers} x hidden {cfg.hidden_size}, {cfg.num_heads} heads / {cfg.num_kv_heads} kv"),
        ("embeddings", "tied" if cfg.tie_word_embeddings else "untied"),
        ("rope", report["rope"]),
        ("sliding window", report["sliding_window"] or "none"),
        ("chat template", "yes" if chat_template else f"no{f' ({tokenizer_error})' if tokenizer_error else ''}"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value}")


def _chat_template_state(path: Path) -> tuple[bool, str | None]:
    """Whether the folder's tokenizer has a chat template, and why not when it cannot be read."""
    from nomoat.tokenizer import Tokenizer

    try:
        return Tokenizer.from_dir(path).chat_template is not None, None
    except Exception as e:  # a model without a usable tokenizer is still worth describing
        return False, f"tokenizer: {str(e).splitlines()[0]}"


@app.command()
def convert(
    path: Annotated[Path, typer.Argument(help="Model folder whose weights are pickle files (*.bin, *.pt).")],
    out: Annotated[Path | None, typer.Option(help="Write the converted folder here (default: in place).")] = None,
    trust_pickle: Annotated[
        bool, typer.Option("--trust-pickle", help="Confirm that you trust these pickle files (required).")
    ] = False,
) -> None:
    """Convert pickle weights to safetensors, once, for a folder you trust."""
    from nomoat.models.checkpoint import CheckpointError, convert_pickle_checkpoint

    if not trust_pickle:
        _fail(
            "pickle files can run arbitrary code when loaded. Pass --trust-pickle if you trust "
            f"{path}; tensors are then read with torch.load(weights_only=True)."
        )
    try:
        dest = convert_pickle_checkpoint(path, out)
    except (CheckpointError, OSError) as e:
        _fail(str(e))
    except Exception as e:  # torch's weights_only unpickler refusing a global, for instance
        _fail(f"could not read the pickle weights safely: {str(e).splitlines()[0]}")
    typer.echo(f"wrote {dest / 'model.safetensors'}")


@app.command()
def generate(
    model: Model,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt text.")],
    max_tokens: MaxTokens = 128,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    top_k: TopK = 0,
    min_p: MinP = 0.0,
    seed: Seed = None,
    stop: Stop = None,
    adapter: Adapter = None,
    merge: Merge = False,
    quantize: Quantize = None,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt as a user message in the chat template.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON record instead of streaming text.")] = False,
    dtype: Dtype = "auto",
    device: Device = "auto",
    compile_decode: Compile = False,
) -> None:
    """Generate a completion for one prompt, streamed to the terminal."""
    from nomoat.generate.engine import Completion

    params = _sampling(max_tokens, temperature, top_p, top_k, min_p, seed, stop)
    m, tok, adapters = _load_with_adapters(model, quantize, dtype, device, adapter, merge)
    text = prompt
    if chat:
        if tok.chat_template is None:
            _fail(f"{model} has no chat template; run without --chat")
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=not chat)
    engine = _engine_for(m, tok, adapters, max_running=1, prefix_cache_bytes=0, compile=compile_decode)
    try:
        handle = engine.submit(ids, params, adapter=adapters.selection)
    except ValueError as e:
        _fail(str(e))
    for event in handle:
        if isinstance(event, Completion):
            if as_json:
                record = {k: v for k, v in vars(event).items() if k != "logprobs"}
                typer.echo(json.dumps(record, ensure_ascii=False))
            else:
                typer.echo()
                rate = f"{event.decode_tokens_per_s:.1f} tok/s" if event.decode_tokens_per_s else "-"
                typer.secho(f"[{event.completion_tokens} tokens, {event.finish_reason}, {rate}]", dim=True, err=True)
        elif not as_json:
            typer.echo(event.text, nl=False)


@app.command()
def chat(
    model: Annotated[
        Path | None,
        typer.Argument(help="A Hugging Face-format model folder; with --server, a model name on the server."),
    ] = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    adapter: Adapter = None,
    merge: Merge = False,
    max_tokens: MaxTokens = 512,
    temperature: Temperature = 0.7,
    top_p: TopP = 0.95,
    top_k: TopK = 0,
    min_p: MinP = 0.0,
    seed: Seed = None,
    quantize: Quantize = None,
    dtype: Dtype = "auto",
    device: Device = "auto",
    compile_decode: Compile = False,
    server: Annotated[
        str | None,
        typer.Option(help="Chat with a running `nomoat serve` (or any OpenAI-compatible server) at this URL."),
    ] = None,
    server_model: Annotated[
        str | None,
        typer.Option("--model", help="With --server: the base (default), an adapter, or a stack base+a:1.0+b:0.5."),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(help="With --server: the server's API key.", envvar="NOMOAT_API_KEY", show_envvar=True),
    ] = None,
) -> None:
    """Chat with a model in the terminal, with its chat template, streaming and history.

    Type a message and press Enter. End a line with a backslash to continue on the next line, or wrap a block in
    triple quotes. Commands: /reset (forget the conversation), /system TEXT (set the system prompt), /exit.

    With --server URL the model runs on that server (`nomoat serve`), not here: MODEL or --model names it there,
    --adapter names adapters there to stack on it.
    """
    from nomoat.generate.chat import ChatSession, run_terminal_chat

    params = _sampling(max_tokens, temperature, top_p, top_k, min_p, seed, None)
    if server:
        from nomoat.generate.remote import RemoteChatSession, RemoteError

        if quantize or compile_decode or merge or dtype != "auto" or device != "auto":
            typer.secho("note: --quantize, --compile, --merge, --dtype and --device are the server's business; ignored",
                        dim=True, err=True)  # fmt: skip
        if model is not None and server_model is not None:
            _fail("give the server's model once: as MODEL or as --model")
        wanted = server_model if server_model is not None else (str(model) if model is not None else None)
        with RemoteChatSession(server, params, system=system, api_key=api_key) as session:
            try:
                name = session.connect(wanted, adapter)
            except RemoteError as e:
                _fail(str(e))
            typer.secho(f"(model {name} on {session.base_url})", dim=True, err=True)
            run_terminal_chat(session)
        return
    if model is None:
        _fail("give a model folder, or --server URL to chat with a running server")
    if server_model is not None:
        _fail("--model picks a model on a server: use it with --server (a local model is the MODEL argument)")
    m, tok, adapters = _load_with_adapters(model, quantize, dtype, device, adapter, merge)
    if tok.chat_template is None:
        _fail(f"{model} has no chat template (tokenizer_config.json or chat_template.jinja); use `nomoat generate`")
    engine = _engine_for(m, tok, adapters, max_running=1, compile=compile_decode)
    run_terminal_chat(ChatSession(m, tok, params, system=system, engine=engine, adapter=adapters.selection))


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


@app.command()
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
    output_dir: Annotated[str | None, Opt("--output-dir", help="Parent folder of run folders [default: runs].")] = None,
    rank: Annotated[int | None, Opt("--rank", "-r", help="LoRA rank [default: 16].")] = None,
    alpha: Annotated[float | None, Opt(help="LoRA alpha [default: 32].")] = None,
    dropout: Annotated[float | None, Opt(help="LoRA dropout [default: 0].")] = None,
    target: Annotated[
        list[str] | None,
        Opt(
            "--target",
            help="Module name to adapt (repeatable), or all-linear [default: attention and MLP projections].",
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
    seq_len: Annotated[int | None, Opt("--seq-len", help="Longest training row in tokens [default: 1024].")] = None,
    packing: Annotated[
        bool | None,
        Opt("--packing/--no-packing", help="Pack short examples into full rows [default: on].", show_default=False),
    ] = None,
    batch_size: Annotated[int | None, Opt("--batch-size", "-b", help="Rows per micro-batch [default: 4].")] = None,
    grad_accum: Annotated[
        int | None,
        Opt("--grad-accum", help="Micro-batches per optimizer step [default: 1]."),
    ] = None,
    epochs: Annotated[float | None, Opt(help="Passes over the data [default: 1].")] = None,
    max_steps: Annotated[int | None, Opt("--max-steps", help="Optimizer steps (overrides --epochs).")] = None,
    lr: Annotated[float | None, Opt(help="Peak learning rate [default: 2e-4].")] = None,
    schedule: Annotated[str | None, Opt(help="cosine, linear or constant [default: cosine].")] = None,
    warmup_steps: Annotated[int | None, Opt("--warmup-steps", help="Warmup steps [default: 3% of the steps].")] = None,
    weight_decay: Annotated[float | None, Opt("--weight-decay", help="AdamW weight decay [default: 0].")] = None,
    max_grad_norm: Annotated[
        float | None,
        Opt("--max-grad-norm", help="Gradient clipping norm, 0 to disable [default: 1]."),
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
        Opt("--train-on", help="Tokens with a loss: assistant, all or last [default: assistant]."),
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
    seed: Annotated[int | None, Opt(help="Seed for initialisation, dropout and data order [default: 42].")] = None,
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
) -> None:
    """Fine-tune a LoRA adapter on your data (instruction tuning or continued pretraining).

    Writes the run folder (checkpoints, metrics.jsonl, loss.png, TensorBoard events) and the adapter in PEFT's format
    with a nomoat.json provenance record. Every option can also be set in a YAML file given with --config.
    """
    from nomoat.config.train import ConfigError, load_train_config
    from nomoat.data import DataError
    from nomoat.lora import AdapterError
    from nomoat.models.checkpoint import CheckpointError
    from nomoat.models.families import UnsupportedModelError
    from nomoat.tokenizer import ChatTemplateError, TokenizerNotFoundError
    from nomoat.train import SFTRecipe, TrainingDivergedError

    lora = {"r": rank, "alpha": alpha, "dropout": dropout, "target_modules": target, "use_dora": dora,
            "use_rslora": rslora, "modules_to_save": train_module}  # fmt: skip
    options = dict(
        model=model, data=data, format=format, columns=_parse_columns(columns), name=name, output_dir=output_dir,
        lora=lora, seq_len=seq_len, packing=packing, batch_size=batch_size, grad_accum=grad_accum, epochs=epochs,
        max_steps=max_steps, lr=lr, schedule=schedule, warmup_steps=warmup_steps, weight_decay=weight_decay,
        max_grad_norm=max_grad_norm, grad_checkpointing=grad_checkpointing, train_on=train_on,
        val_fraction=val_fraction, val_size=val_size, eval_every=eval_every, save_every=save_every, seed=seed,
        dtype=dtype, device=device, quantize_base=quantize_base, limit=limit, resume=resume or None,
    )  # fmt: skip
    try:
        cfg = load_train_config(config, **options)
        SFTRecipe(cfg, progress=progress).run()
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except (ConfigError, DataError, AdapterError, CheckpointError, UnsupportedModelError, TokenizerNotFoundError,
            ChatTemplateError, TrainingDivergedError, FileExistsError, FileNotFoundError, ValueError) as e:  # fmt: skip
        _fail(str(e))


@app.command()
def version() -> None:
    """Print nomoat's version."""
    from nomoat import __version__

    typer.echo(__version__)


# ---- nomoat adapters: the local adapter registry under $NOMOAT_HOME (default ~/.nomoat) ---------------------------

adapters_app = typer.Typer(
    help="Keep named adapters in the local registry ($NOMOAT_HOME/adapters, default ~/.nomoat): list, show, import, "
    "export, rm. A registry name works wherever --adapter takes a folder.",
    no_args_is_help=True,
)
AdapterName = Annotated[str, typer.Argument(help="The adapter's name in the registry (see `nomoat adapters list`).")]


def _registry_call(fn, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
    """Run a registry operation, turning its errors into clean `error:` lines (exit code 2)."""
    from nomoat.lora.registry import AdapterNotFoundError

    try:
        return fn(*args, **kwargs)
    except AdapterNotFoundError as e:
        _fail(str(e))
    except (ValueError, OSError) as e:  # AdapterError is a ValueError; FileExistsError an OSError
        _fail(str(e))


def _fmt(value: object, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


@adapters_app.command("list")
def adapters_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """List the adapters in the registry: base model, rank, alpha, DoRA, size, creation time, final loss."""
    from rich.console import Console
    from rich.table import Table

    from nomoat.lora.registry import Registry

    reg = Registry()
    infos = _registry_call(reg.list)
    if as_json:
        typer.echo(json.dumps([i.to_dict() for i in infos], indent=2))
        return
    if not infos:
        typer.echo(f"no adapters in {reg.adapters_dir}; add one with `nomoat adapters import DIR`")
        return
    table = Table(title=f"adapters in {reg.adapters_dir}")
    for column in ("name", "base model", "r", "alpha", "dora", "size", "created (UTC)", "final loss"):
        table.add_column(column, overflow="fold")
    for i in infos:
        base = Path(i.base_model).name if i.base_model and "/" in i.base_model else i.base_model
        table.add_row(
            i.name,
            _fmt(base) if not i.error else f"unreadable: {i.error}",
            _fmt(i.r),
            _fmt(i.alpha),
            "yes" if i.dora else "no",
            _human(i.size_bytes, "B"),
            _fmt(i.created),
            _fmt(i.final_loss),
        )
    Console(width=max(120, Console().width)).print(table)


def _show_lines(report: dict) -> list[tuple[str, str]]:
    """The human-readable rows of `nomoat adapters show`: provenance, training configuration, metrics."""
    config, prov = report["adapter_config"], report["provenance"]
    base = prov.get("base_model") if isinstance(prov.get("base_model"), dict) else {}
    rows = [("name", report["name"]), ("path", report["path"]),
            ("base model", str(base.get("path") or config.get("base_model_name_or_path") or "-"))]  # fmt: skip
    if base.get("sha256"):
        rows.append(("base sha256", base["sha256"]))
    if base.get("family"):
        rows.append(("family", base["family"]))
    targets = config.get("target_modules")
    rows.append(("adapter", f"{'DoRA' if config.get('use_dora') else 'LoRA'} r={config.get('r')} "
                 f"alpha={config.get('lora_alpha')} rslora={bool(config.get('use_rslora'))} "
                 f"targets={','.join(targets) if isinstance(targets, list) else targets}"))  # fmt: skip
    if config.get("modules_to_save"):
        rows.append(("trained fully", ", ".join(config["modules_to_save"])))
    for i, d in enumerate(prov.get("data") or []):
        records = f", {d['records']} records" if d.get("records") is not None else ""
        rows.append(("data" if i == 0 else "", f"{d.get('path')} (sha256 {d.get('sha256')}{records})"))
    if prov.get("data_format"):
        rows.append(("data format", str(prov["data_format"])))
    training = prov.get("training") or {}
    keys = ("seq_len", "packing", "batch_size", "grad_accum", "epochs", "max_steps", "lr", "schedule", "warmup_steps",
            "weight_decay", "train_on", "seed", "dtype", "quantize_base")  # fmt: skip
    summary = " ".join(f"{k}={training[k]}" for k in keys if training.get(k) is not None)
    if summary:
        rows.append(("training", summary))
    if prov.get("parents"):  # a `nomoat merge` result: what it was combined from, and how
        parents = ", ".join(f"{q.get('name')} (w {q.get('weight')})" for q in prov["parents"])
        opts = " ".join(f"{k}={prov[k]}" for k in ("density", "seed", "majority_sign") if prov.get(k) is not None)
        rows.append(("merged from", f"{parents} by {prov.get('method')}" + (f" ({opts})" if opts else "")))
    metrics = prov.get("metrics") or {}
    if metrics:
        rows.append(("metrics", " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())))
    for key, label in (("imported_from", "imported from"), ("run_dir", "run folder"), ("nomoat_version", "nomoat"),
                       ("created_utc", "created (UTC)"), ("imported_utc", "imported (UTC)")):  # fmt: skip
        if prov.get(key):
            rows.append((label, str(prov[key])))
    rows.append(("size", f"{_human(report['size_bytes'], 'B')} in {len(report['files'])} files"))
    return rows


@adapters_app.command("show")
def adapters_show(
    name: AdapterName,
    as_json: Annotated[bool, typer.Option("--json", help="Print adapter_config.json and nomoat.json in full.")] = False,
) -> None:
    """Show one adapter: base model and its SHA-256, data files and hashes, training configuration, metrics."""
    from nomoat.lora.registry import Registry

    report = _registry_call(Registry().show, name)
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
        return
    rows = _show_lines(report)
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value}")


@adapters_app.command("import")
def adapters_import(
    folder: Annotated[Path, typer.Argument(help="A PEFT LoRA adapter folder, e.g. runs/NAME/adapter.")],
    name: Annotated[
        str | None, typer.Option(help="Registry name [default: the folder's name, or NAME for runs/NAME/adapter].")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an adapter of the same name.")] = False,
) -> None:
    """Copy an adapter folder (made by `nomoat train`, by peft, or downloaded) into the registry, atomically."""
    from nomoat.lora.registry import Registry

    dest = _registry_call(Registry().import_adapter, folder, name=name, overwrite=force)
    typer.echo(f"imported {folder} as {dest.name!r} ({dest})")


@adapters_app.command("export")
def adapters_export(
    name: AdapterName,
    folder: Annotated[Path, typer.Argument(help="Destination folder (new or empty).")],
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty destination folder.")] = False,
) -> None:
    """Copy an adapter out of the registry as a plain PEFT folder (loads in peft and in nomoat)."""
    from nomoat.lora.registry import Registry

    dest = _registry_call(Registry().export, name, folder, overwrite=force)
    typer.echo(f"exported {name!r} to {dest}")


@adapters_app.command("rm")
def adapters_rm(
    name: AdapterName,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Delete without asking.")] = False,
) -> None:
    """Delete an adapter from the registry (asks first unless --yes)."""
    from nomoat.lora.registry import Registry

    reg = Registry()
    path = _registry_call(reg.path, name)
    if not yes:
        if not sys.stdin.isatty():
            _fail(f"not deleting {name!r} without confirmation: there is no terminal to ask; pass --yes")
        if not typer.confirm(f"delete adapter {name!r} ({path})?", default=False):
            typer.echo("kept")
            raise typer.Exit(1)
    _registry_call(reg.remove, name)
    typer.echo(f"removed {name!r}")


app.add_typer(adapters_app, name="adapters")


@app.command()
def export(
    model: Model,
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="hf: the folder to write; gguf, gguf-lora: the .gguf file to write."),
    ],
    adapter: Adapter = None,
    format: Annotated[
        str,
        typer.Option(
            help="hf (merged Hugging Face folder), gguf (merged GGUF for llama.cpp/Ollama) or gguf-lora "
            "(one adapter as a GGUF LoRA, for llama.cpp --lora / Ollama ADAPTER)."
        ),
    ] = "hf",
    dtype: Annotated[str, typer.Option(help="hf only: auto (the checkpoint's dtype), float32, bfloat16, float16.")] = (
        "auto"
    ),
    outtype: Annotated[
        str | None, typer.Option("--outtype", help="gguf, gguf-lora: f32, f16 (default) or q8_0.")
    ] = None,
    tokenizer_pre: Annotated[
        str | None,
        typer.Option("--tokenizer-pre", help="gguf: llama.cpp pre-tokenizer name, overriding the detection."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing folder or file.")] = False,
) -> None:
    """Write the base model with adapters merged in (a Hugging Face folder or a GGUF file), or an adapter as GGUF.

    Adapters merge in order, each scaled by its weight (`--adapter a --adapter b:0.5`). `--format hf` keeps the
    tokenizer files and chat template (an adapter's own template when the base has none); `--format gguf` writes
    them into the file. `--format gguf-lora` writes one adapter (`--adapter`) for a GGUF of the same base model.
    """
    from nomoat.export.merged import ExportError, export_merged

    formats = ("hf", "gguf", "gguf-lora")
    if format not in formats:
        _fail(f"unknown format {format!r}; use one of {', '.join(formats)}")
    if format == "hf" and (outtype is not None or tokenizer_pre is not None):
        _fail("--outtype and --tokenizer-pre are for GGUF; with --format hf use --dtype")
    if format != "hf" and dtype != "auto":
        _fail("--dtype is for --format hf; GGUF uses --outtype f32, f16 or q8_0")
    if format == "gguf-lora" and tokenizer_pre is not None:
        _fail("--tokenizer-pre is for --format gguf (a GGUF LoRA has no tokenizer)")
    if format == "hf":
        if out.exists() and any(out.iterdir()) and not force:
            _fail(f"{out} exists and is not empty; choose another --out or pass --force")
    elif out.is_dir():
        _fail(f"{out} is a folder; GGUF export writes one file, e.g. --out {out / 'model.gguf'}")
    elif out.exists() and not force:
        _fail(f"{out} exists; choose another --out or pass --force")
    adapters = _resolve_adapters(adapter)
    if format == "gguf-lora" and len(adapters) != 1:
        _fail("--format gguf-lora writes exactly one adapter: pass one --adapter (to stack several, merge them with "
              "--format gguf)")  # fmt: skip
    try:
        if format == "hf":
            written = export_merged(model, adapters, out, dtype=dtype)
        else:
            from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

            from nomoat.export.gguf import export_gguf
            from nomoat.export.gguf_lora import export_gguf_lora

            columns = ("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TimeRemainingColumn())
            with Progress(*columns, transient=True) as bar:
                task = bar.add_task(f"writing {out.name}", total=None)

                def progress(done: int, total: int) -> None:
                    bar.update(task, completed=done, total=total)

                if format == "gguf":
                    written = export_gguf(model, adapters, out, outtype=outtype or "f16", tokenizer_pre=tokenizer_pre,
                                          progress=progress)  # fmt: skip
                else:
                    ((folder, weight),) = adapters
                    written = export_gguf_lora(model, folder, out, outtype=outtype or "f16", scale=weight,
                                               progress=progress)  # fmt: skip
    except (ExportError, ValueError, OSError) as e:
        _fail(str(e))
    typer.echo(f"wrote {written}")


# Commands that live in their own modules (each has `register(app)`).
from nomoat.commands import demo as _demo_cmd  # noqa: E402
from nomoat.commands import evaluate as _eval_cmd  # noqa: E402
from nomoat.commands import merge as _merge_cmd  # noqa: E402
from nomoat.commands import serve as _serve_cmd  # noqa: E402

for _mod in (_demo_cmd, _eval_cmd, _merge_cmd, _serve_cmd):
    _mod.register(app)


def main() -> None:
    """Entry point of the `nomoat` console script."""
    app(prog_name="nomoat")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
