"""`--help` of every command and subcommand, enumerated from the typer app so a new command is covered at once."""

from __future__ import annotations

import re

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from nomoat.cli import app

runner = CliRunner()
# " ." or " ," left where text was dropped (e.g. "Rows per micro-batch ." once a default went missing).
DANGLING = re.compile(r"\s[.,;:](\s|$)")


def _commands(command, path: tuple[str, ...] = ()):  # noqa: ANN001, ANN202
    """(path, click command) for the app and every command below it, groups included."""
    yield path, command
    if hasattr(command, "list_commands"):  # a group (typer vendors click, so no isinstance against click.Group)
        for name in command.list_commands(None):
            yield from _commands(command.get_command(None, name), (*path, name))


COMMANDS = list(_commands(get_command(app)))
IDS = [" ".join(path) or "nomoat" for path, _ in COMMANDS]


def test_every_command_is_enumerated():
    """The walk reaches nested groups: a broken walk would make the tests below pass on nothing."""
    paths = {path for path, _ in COMMANDS}
    expected = {(), ("info",), ("train",), ("generate",), ("chat",), ("serve",), ("eval",), ("merge",), ("export",),
                ("demo",), ("pretrain",), ("convert",), ("version",), ("adapters",), ("adapters", "list"),
                ("adapters", "show"), ("adapters", "import"), ("adapters", "export"), ("adapters", "rm")}  # fmt: skip
    assert expected <= paths


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=IDS)
def test_help(path, command):
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
    assert command.help and not DANGLING.search(command.help), f"{IDS}: command help {command.help!r}"
    undescribed = []
    for param in command.params:
        if getattr(param, "hidden", False):
            continue
        text = (getattr(param, "help", None) or "").strip()
        if not text:
            undescribed.append(param.opts[0] if param.opts else param.name)
        assert not DANGLING.search(text), f"{param.name}: dangling punctuation in {text!r}"
    assert not undescribed, f"options without a description: {undescribed}"
    for line in result.output.splitlines():
        assert not DANGLING.search(line.strip(" │")), f"dangling punctuation in the rendered help: {line!r}"
