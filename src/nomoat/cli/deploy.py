"""`nomoat deploy vllm`: the command that serves a base model with registry adapters on vLLM, printed or written."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from nomoat.cli._common import fail, resolve_adapters

app = typer.Typer(help="Hand adapters to a serving engine that runs at scale (vLLM).", no_args_is_help=True)


def _served(spec: str):  # noqa: ANN202
    """`[NAME=]ADAPTER[:WEIGHT][+ADAPTER[:WEIGHT]...]` -> a ServedAdapter (registry names or folders)."""
    from nomoat.export.vllm import ServedAdapter

    name, sep, rest = spec.partition("=")
    if not sep or "/" in name or not name:
        name, rest = "", spec
    parts = resolve_adapters([p for p in rest.split("+") if p])
    if not parts:
        fail(f"adapter {spec!r}: nothing to serve")
    if not name:
        names = []
        for (folder, _), raw in zip(parts, rest.split("+"), strict=False):
            plain = raw.rpartition(":")[0] if ":" in raw else raw
            if Path(plain).expanduser().is_dir():  # a folder: its name (a run's `NAME/adapter` gives NAME)
                plain = folder.parent.name if folder.name == "adapter" else folder.name
            names.append(plain)
        name = "+".join(names)
    return ServedAdapter(name=name, parts=parts)


@app.command()
def vllm(
    base: Annotated[str, typer.Argument(help="Base model folder (or Hub id) that vLLM loads.")],
    adapters: Annotated[
        list[str] | None,
        typer.Argument(help="Registry names or adapter folders, each as [NAME=]ADAPTER (NAME: what requests use).",
                       show_default=False),  # fmt: skip
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the command as a shell script here.")] = None,
    max_loras: Annotated[
        int | None, typer.Option("--max-loras", min=1, help="Adapters active in one batch.", show_default="all")
    ] = None,
) -> None:
    """Print the `vllm serve` command (and its LoRA module list) that serves BASE with the adapters.

    vLLM reads nomoat's PEFT adapter folders as they are. What it cannot serve (DoRA, fully trained modules, a rank
    above 512, a weighted adapter or a stack) is refused with the reason and the alternative: `nomoat merge` into
    one adapter, or `nomoat export` a merged model that vLLM serves as a plain model.
    """
    from nomoat.export.vllm import vllm_command
    from nomoat.util.files import atomic_write_text, current_umask

    command = vllm_command(base, [_served(s) for s in adapters or []], max_loras=max_loras)
    script = command.script()
    if out is None:
        typer.echo(script, nl=False)
        return
    atomic_write_text(out, script)
    os.chmod(out, 0o777 & ~current_umask())  # a script to run
    typer.echo(f"wrote {out}")
