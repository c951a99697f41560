"""The `nomoat` command line: one subcommand per stage, each a typed function whose docstring is its help.

This package is the only part of nomoat that imports typer, prints for the user or exits. Each module holds one
command group and keeps its commands thin (parse the options, call the library, print); `app` assembles them.
"""

from __future__ import annotations

import typer

from nomoat.cli import (
    adapters,
    demo,
    deploy,
    evaluate,
    export,
    generate,
    hub,
    merge,
    models,
    serve,
    studio,
    synth,
    train,
)
from nomoat.cli._common import Group

app = typer.Typer(
    name="nomoat",
    help="Load open-weight LLMs, fine-tune them with LoRA, keep and stack adapters, serve them privately. Offline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=Group,
)


def version() -> None:
    """Print nomoat's version."""
    from nomoat import __version__

    typer.echo(__version__)


# The order here is the order of `nomoat --help`.
app.command()(hub.pull)
app.command("models")(hub.models)
app.command()(hub.rm)
app.command()(hub.push)
app.command()(models.info)
app.command()(models.convert)
app.command()(generate.generate)
app.command()(generate.chat)
app.command()(train.train)
app.command()(synth.synth)
app.command()(version)
app.add_typer(adapters.app, name="adapters")
app.command()(export.export)
app.command()(demo.demo)
app.command()(train.pretrain)
app.command("eval")(evaluate.evaluate)
app.command("merge")(merge.merge)
app.command()(serve.serve)
app.add_typer(deploy.app, name="deploy")
app.command()(studio.studio)


def main() -> None:
    """Entry point of the `nomoat` console script."""
    app(prog_name="nomoat")
