"""`nomoat demo`: the whole path on the embedded tiny model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from nomoat.cli._common import fail


def demo(
    quick: Annotated[
        bool, typer.Option("--quick", help="A smaller run (fewer facts and steps), under a minute.")
    ] = False,
    name: Annotated[str, typer.Option(help="Registry name of the trained adapter (replaced if present).")] = (
        "demo-handbook"
    ),
    model: Annotated[Path | None, typer.Option(
        help="Base model: a Hub id ORG/NAME, a folder or a .gguf file (default: demo, the embedded tiny model)."
    )] = None,
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
    from nomoat.models.checkpoint import gguf_source  # loads torch: not at import, for a quick --help
    from nomoat.util.hub import local_path

    if model is not None:
        found = local_path(model)  # `demo` and Hub ids name folders too
        if gguf_source(found) is None and not (Path(found) / "config.json").is_file():
            fail(f"{model} is not a model folder (no config.json), a .gguf file, a pulled Hub id or ollama:NAME")
    result = run_demo(quick=quick, name=name, model_dir=model, settings=settings)
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
