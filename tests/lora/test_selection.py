"""The one adapter-selection grammar: parsing, errors that say what to write, round trips, folders and the server."""

from __future__ import annotations

import re

import pytest
import torch

from nomoat.lora.bank import AdapterBank, group_rows
from nomoat.lora.selection import AdapterNameError, AdapterSelection, SelectionError, parse_selection
from nomoat.serve.adapters import BadModelError, UnknownModelError, parse_model
from nomoat.util.errors import InputError, UsageError


def _folder(path):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    return path


@pytest.mark.parametrize(
    "text, items",
    [
        ("none", ()),
        ("sql", (("sql", 1.0),)),
        ("sql:0.5", (("sql", 0.5),)),
        ("sql:-1", (("sql", -1.0),)),
        ("sql:1e-3", (("sql", 0.001),)),
        ("a:1+b:0.5", (("a", 1.0), ("b", 0.5))),
        ("a+b:0.5+c", (("a", 1.0), ("b", 0.5), ("c", 1.0))),
        ("  a:2  ", (("a", 2.0),)),
        ("runs/sql/adapter:0.5", (("runs/sql/adapter", 0.5),)),  # a path that does not exist (yet): found later
        ("runs/a/adapter+runs/b/adapter:2", (("runs/a/adapter", 1.0), ("runs/b/adapter", 2.0))),
    ],
)
def test_grammar(text, items):
    selection = parse_selection(text)
    assert selection.items == items
    assert list(selection) == list(items) and len(selection) == len(items) and bool(selection) == bool(items)
    assert AdapterSelection.parse(text) == selection == AdapterSelection(items)
    assert parse_selection(str(selection)) == selection  # the round trip


def test_str_writes_the_grammar_back():
    assert str(AdapterSelection()) == "none"
    assert str(parse_selection("a:1.0+b:0.50+c:2")) == "a+b:0.5+c:2"
    odd = AdapterSelection((("a", 0.1 + 0.2), ("b", 1e-12), ("c", -3.0)))  # weights that need every digit
    assert str(odd) == "a:0.30000000000000004+b:1e-12+c:-3"
    assert parse_selection(str(odd)) == odd


def test_a_folder_may_contain_colon_or_plus_only_when_it_exists(tmp_path):
    odd = _folder(tmp_path / "run:1+best")
    assert parse_selection(str(odd)).items == ((str(odd), 1.0),)
    assert parse_selection(f"{odd}:0.25").items == ((str(odd), 0.25),)  # the text before the last ':' is the folder
    assert parse_selection(str(parse_selection(f"{odd}:0.25"))) == parse_selection(f"{odd}:0.25")
    # Not existing, the same text follows the grammar: '+' splits and the last ':' of each part is its weight.
    assert parse_selection(str(tmp_path / "gone:2+best")).items == ((str(tmp_path / "gone"), 2.0), ("best", 1.0))
    with pytest.raises(SelectionError, match="'x' after the last ':' of .* is not a weight"):
        parse_selection(str(tmp_path / "gone:x"))
    # A folder named like the base is reached through a path.
    _folder(tmp_path / "none")
    assert parse_selection("none") == AdapterSelection()
    assert parse_selection(str(tmp_path / "none")).names == (str(tmp_path / "none"),)


@pytest.mark.parametrize(
    "text, message, hint",
    [
        ("", "is empty", "write NAME, NAME:0.5, a:1+b:0.5"),
        ("   ", "is empty", "write NAME"),
        ("a++b", "has an empty part", "write NAME"),
        ("a+", "has an empty part", "write NAME"),
        ("a:x", "'x' after the last ':' of 'a:x' is not a weight", "write a:0.5"),
        ("a:0.5:0.5", "'a:0.5' is neither an adapter name nor an existing folder", "only when that folder exists"),
        ("x/y:1:2+b", "'x/y:1' is neither", "only when that folder exists"),
        ("a:inf", "'inf' after the last ':'", "write a:0.5"),
        ("a:nan", "'nan' after the last ':'", "write a:0.5"),
        (":0.5", "has a weight but no adapter", "write NAME:0.5"),
        ("a+b:1+a:0.5", "adapter 'a' appears twice", "give it once, with the summed weight"),
        ("none+a", "'none' \\(the base model\\) cannot be stacked", "write ./none for a folder"),
        ("none:0.5", "cannot be stacked or weighted", "leave it out"),
    ],
)
def test_errors_say_what_is_wrong_and_what_to_write(text, message, hint):
    with pytest.raises(SelectionError) as info:
        parse_selection(text)
    error = info.value
    assert isinstance(error, UsageError) and isinstance(error, ValueError)  # the CLI exits 2, servers answer 400
    assert re.search(message, str(error)), str(error)
    if hint:
        assert hint in error.hint


def test_constructor_checks_weights_and_names():
    with pytest.raises(SelectionError, match="not a finite number") as info:
        AdapterSelection((("a", float("inf")),))
    assert "a:0.5" in info.value.hint
    with pytest.raises(SelectionError, match="empty name"):
        AdapterSelection((("", 1.0),))
    assert AdapterSelection((("a", 1),)).items == (("a", 1.0),)  # weights are floats
    assert AdapterSelection.of(None) == AdapterSelection() == AdapterSelection.of("none")
    assert AdapterSelection.of([("a", 0.5)]) == parse_selection("a:0.5") == AdapterSelection.of("a:0.5")
    assert parse_selection("a") + parse_selection("b:2") == parse_selection("a+b:2")
    assert parse_selection("a+b:2").renamed({"a": "a@1", "b": "b@2"}).items == (("a@1", 1.0), ("b@2", 2.0))
    assert hash(parse_selection("a:0.5")) == hash(AdapterSelection((("a", 0.5),)))  # usable as a key


def test_names_only_where_paths_are_not_allowed():
    assert parse_selection("a:1+b_2.x-y:0.5", paths=False).names == ("a", "b_2.x-y")
    for bad in ("runs/a", "../a", ".hidden", "-a", "a b", "x" * 65):
        with pytest.raises(AdapterNameError, match="is not an adapter name") as info:
            parse_selection(bad, paths=False)
        assert "a name, never a path" in info.value.hint


def test_server_model_field_keeps_what_clients_send():
    """`parse_model` reads the server's `model` field with the same grammar, names only, the base's name allowed."""
    assert list(parse_model("tiny", "tiny")) == []
    assert list(parse_model("none", "tiny")) == []
    assert list(parse_model("sql", "tiny")) == [("sql", 1.0)]
    assert list(parse_model("sql:0.5", "tiny")) == [("sql", 0.5)]
    assert list(parse_model("tiny+a:1.0+b:0.5", "tiny")) == [("a", 1.0), ("b", 0.5)]
    assert list(parse_model("a+b:0.5", "tiny")) == [("a", 1.0), ("b", 0.5)]
    assert parse_model("org/model+a", "org/model").items == (("a", 1.0),)  # a base name with '/' is no path here
    for model in ("nope/x", "tiny+../etc", "a+/abs"):
        with pytest.raises(UnknownModelError, match=re.escape(f"The model `{model}` does not exist")):
            parse_model(model, "tiny")
    for model, text in (("a:x", "'x' after the last ':'"), ("a+", "an empty part"), ("a:inf", "'inf'"),
                        ("a+a", "appears twice")):  # fmt: skip
        with pytest.raises(BadModelError, match=text) as info:
            parse_model(model, "tiny")
        assert str(info.value).startswith(f"model {model!r}: ")


def test_folders_finds_folders_then_registry_names(tmp_path, monkeypatch):
    from nomoat.lora.registry import Registry

    monkeypatch.setenv("NOMOAT_HOME", str(tmp_path / "home"))
    src = _folder(tmp_path / "src" / "adapter")
    registry = Registry()
    tuned = _folder(registry.adapters_dir / "tuned")
    selection = parse_selection(f"{src}:0.5+tuned")
    assert selection.folders(registry) == [(src, 0.5), (tuned, 1.0)]
    assert selection.folders() == selection.folders(registry)  # the default registry is $NOMOAT_HOME's
    with pytest.raises(InputError, match="adapter 'tunde' not found: it is not a folder, and no adapter named 'tunde'"
                       ".*did you mean 'tuned'"):  # fmt: skip
        parse_selection("tunde").folders(registry)
    with pytest.raises(InputError, match="adapter '.*nope' not found: give the adapter folder"):
        parse_selection(str(tmp_path / "nope")).folders(registry)


def test_bank_checks_selections_and_groups_rows():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    bank = AdapterBank(model)
    bank.tensors["a"] = {}
    bank.tensors["b"] = {}
    assert bank.check(parse_selection("a:0.5+b")) == (("a", 0.5), ("b", 1.0))
    assert bank.check([("a", 1)]) == (("a", 1.0),)
    with pytest.raises(SelectionError, match="unknown adapter 'zz' \\(loaded: a, b\\)"):
        bank.check(parse_selection("zz"))
    with pytest.raises(ValueError, match="not a finite number"):
        bank.check([("a", float("nan"))])
    sel = parse_selection("a:0.5")
    plan = group_rows([sel, AdapterSelection(), (("a", 0.5),), sel], torch.device("cpu"))
    assert len(plan) == 1 and plan[0][1] == (("a", 0.5),)  # a selection and its pairs are the same group
    assert plan[0][0].tolist() == [0, 2, 3]
