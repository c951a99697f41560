"""The error hierarchy: library exceptions are NomoatErrors of the right kind and keep their built-in bases."""

from __future__ import annotations

import pytest

from nomoat.data import DataError
from nomoat.export.merged import ExportError
from nomoat.lora.combine import CombineError
from nomoat.lora.peft_format import AdapterError
from nomoat.lora.registry import AdapterNotFoundError
from nomoat.serve.adapters import AdapterBusyError, AdapterConflictError, BadModelError, UnknownModelError
from nomoat.tokenizer import ChatTemplateError, TokenizerNotFoundError
from nomoat.util import errors


@pytest.mark.parametrize(
    ("cls", "kind", "builtin"),
    [
        (AdapterError, errors.InputError, ValueError),
        (CombineError, errors.InputError, ValueError),
        (ExportError, errors.ModelError, ValueError),
        (TokenizerNotFoundError, errors.ModelError, FileNotFoundError),
        (ChatTemplateError, errors.InputError, ValueError),
        (DataError, errors.DataError, ValueError),
        (AdapterNotFoundError, errors.NotFoundError, KeyError),
        (UnknownModelError, errors.NotFoundError, LookupError),
        (BadModelError, errors.UsageError, ValueError),
        (AdapterBusyError, errors.BusyError, RuntimeError),
        (AdapterConflictError, errors.NomoatError, RuntimeError),
    ],
)
def test_library_errors_are_nomoat_errors_and_keep_their_bases(cls, kind, builtin):
    assert issubclass(cls, kind) and issubclass(cls, errors.NomoatError) and issubclass(cls, builtin)


def test_message_hint_and_str():
    e = errors.ModelError("no config.json in m/", hint="give a Hugging Face model folder")
    assert str(e) == e.message == "no config.json in m/" and e.hint == "give a Hugging Face model folder"
    assert e.exit_code == 2
    assert str(AdapterNotFoundError("no adapter named 'x'")) == "no adapter named 'x'"  # not KeyError's repr


def test_data_error_lists_its_problems_and_is_the_kind():
    e = DataError(["a.jsonl:1: bad", "a.jsonl:2: bad"])
    assert isinstance(e, errors.DataError) and e.errors == ["a.jsonl:1: bad", "a.jsonl:2: bad"]
    assert str(e).startswith("2 problems in the data:") and e.hint is None
