"""The one error handler: a NomoatError from the library or a command becomes `error:` + `hint:` and its exit code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nomoat.cli import app
from nomoat.cli._common import CommandError, fail
from nomoat.lora.registry import Registry
from nomoat.util.errors import InputError, NomoatError, NotFoundError

runner = CliRunner()
SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("NOMOAT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_library_error_is_message_then_hint_and_its_exit_code(home, monkeypatch):
    def broken(self):  # noqa: ANN001, ANN202
        raise InputError("adapters folder is unreadable", hint="check the permissions of $NOMOAT_HOME")

    monkeypatch.setattr(Registry, "list", broken)
    result = runner.invoke(app, ["adapters", "list"])
    assert result.exit_code == 2
    assert result.stderr == "error: adapters folder is unreadable\nhint: check the permissions of $NOMOAT_HOME\n"
    assert result.stdout == ""
    assert isinstance(result.exception, SystemExit)  # exited, no exception escaped the command


def test_exit_code_comes_from_the_exception(home, monkeypatch):
    class Gone(NotFoundError):
        exit_code = 5

    def show(self, name):  # noqa: ANN001, ANN202
        raise Gone(f"no {name} here")

    monkeypatch.setattr(Registry, "show", show)
    result = runner.invoke(app, ["adapters", "show", "x"])
    assert result.exit_code == 5 and result.stderr == "error: no x here\n"


def test_an_error_that_is_not_a_nomoat_error_is_not_swallowed(home, monkeypatch):
    """Only NomoatErrors are the user's to fix: a bug still surfaces as an exception (exit 1)."""

    def show(self, name):  # noqa: ANN001, ANN202
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(Registry, "show", show)
    result = runner.invoke(app, ["adapters", "show", "x"])
    assert result.exit_code == 1 and isinstance(result.exception, ZeroDivisionError)


def test_real_library_error_in_a_real_process(tmp_path):
    """`nomoat adapters show` of an unknown name: the registry's AdapterNotFoundError, printed cleanly, exit 2."""
    env = {**os.environ, "NOMOAT_HOME": str(tmp_path), "PYTHONPATH": str(SRC)}
    r = subprocess.run([sys.executable, "-m", "nomoat.cli", "adapters", "show", "nope"], env=env,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: no adapter named 'nope' in the registry")
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_fail_is_not_caught_by_a_commands_own_except_valueerror():
    with pytest.raises(CommandError) as info:
        try:
            fail("--x and --y cannot go together", hint="drop one")
        except ValueError:  # pragma: no cover - the point is that this does not run
            pytest.fail("fail() was caught as a ValueError")
    assert info.value.message == "--x and --y cannot go together" and info.value.hint == "drop one"
    assert info.value.exit_code == 2


def test_fail_passes_a_nomoat_error_on_unchanged():
    error = InputError("bad file", hint="fix it")
    with pytest.raises(InputError) as info:
        fail(error)
    assert info.value is error
    with pytest.raises(CommandError, match="^plain$"):
        fail(ValueError("plain"))
    assert issubclass(CommandError, NomoatError) and not issubclass(CommandError, ValueError)
