"""`nomoat generate --json-schema FILE | --regex R | --grammar FILE`: the printed completion obeys the constraint."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from typer.testing import CliRunner

from nomoat.cli import app
from structured_utils import SCHEMAS, make_structured_model

pytest.importorskip("llguidance")
runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_structured_model(tmp_path_factory.mktemp("cli_constraints") / "m")


def _run(model_dir, *flags: str) -> dict:
    result = runner.invoke(app, ["generate", str(model_dir), "-p", "hi", "--json", "--dtype", "float32",
                                 "--temperature", "1.0", "--seed", "3", "--max-tokens", "200", *flags])  # fmt: skip
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_generate_with_schema_regex_and_grammar(model_dir, tmp_path):
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(SCHEMAS["points"]))
    out = _run(model_dir, "--json-schema", str(schema))
    assert out["finish_reason"] == "stop"
    jsonschema.validate(json.loads(out["text"]), SCHEMAS["points"])
    assert re.fullmatch(r"[a-c]{3}-\d\d", _run(model_dir, "--regex", r"[a-c]{3}-\d\d")["text"])
    grammar = tmp_path / "g.gbnf"
    grammar.write_text('root ::= "ok" [0-9]\n')
    assert re.fullmatch(r"ok\d", _run(model_dir, "--grammar", str(grammar))["text"])


def test_generate_constraint_errors(model_dir, tmp_path):
    result = runner.invoke(app, ["generate", str(model_dir), "-p", "hi", "--regex", "(", "--dtype", "float32"])
    assert result.exit_code != 0 and "regex" in result.output
    result = runner.invoke(app, ["generate", str(model_dir), "-p", "hi", "--regex", "a", "--grammar", "x"])
    assert result.exit_code != 0 and "one of" in result.output
