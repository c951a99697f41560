"""`nomoat export`: a merged Hugging Face folder, a merged GGUF file, or one adapter as a GGUF LoRA."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nomoat.cli._common import Adapter, Model
from nomoat.cli._common import fail as _fail
from nomoat.cli._common import resolve_adapters as _resolve_adapters


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
    from nomoat.export.merged import export_merged

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
    except (ValueError, OSError) as e:  # ExportError (a NomoatError) goes on as it is
        _fail(e)
    typer.echo(f"wrote {written}")
