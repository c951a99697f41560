"""Preference pairs: both record forms load, bad pairs name file and line, tokenization trains only the answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nomoat.data import IGNORE_INDEX, DataError, Preference, load_dataset, tokenize_preference
from nomoat.tokenizer import Tokenizer

from train_utils import make_chat_model


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_string_and_conversational_pairs_load_alike(tmp_path):
    plain = {"prompt": "w10 w11", "chosen": "w20 w21", "rejected": "w30"}
    chat = {"prompt": [{"role": "user", "content": "w10 w11"}], "chosen": [{"role": "assistant", "content": "w20 w21"}],
            "rejected": [{"role": "assistant", "content": "w30"}]}  # fmt: skip
    ds = load_dataset(_write(tmp_path / "p.jsonl", [plain, chat]))
    assert ds.format == "preference"
    a, b = ds.examples
    assert isinstance(a, Preference) and (a.prompt, a.chosen, a.rejected) == (b.prompt, b.chosen, b.rejected)


@pytest.mark.parametrize(
    ("record", "words"),
    [
        ({"prompt": "w10", "chosen": "w20", "rejected": "  "}, "empty"),
        ({"prompt": "w10", "chosen": [], "rejected": "w20"}, "empty"),
    ],
)
def test_bad_pairs_name_file_and_line(tmp_path, record, words):
    good = {"prompt": "w10", "chosen": "w20", "rejected": "w30"}
    with pytest.raises(DataError) as err:
        load_dataset(_write(tmp_path / "pairs.jsonl", [good, record]), format="preference")
    assert "pairs.jsonl:2" in str(err.value)
    assert words in str(err.value)


def test_tokenized_pairs_train_only_the_answers(tmp_path):
    model = make_chat_model(tmp_path / "m")
    tok = Tokenizer.from_dir(model)
    ds = load_dataset(_write(tmp_path / "p.jsonl", [{"prompt": "w10 w11", "chosen": "w20 w21", "rejected": "w30"}]))
    chosen, rejected = tokenize_preference(ds.examples[0], tok, 64)
    prompt_ids = tok.encode("w3 w10 w11 w4", add_special_tokens=False)
    for seq, answer in ((chosen, "w20 w21"), (rejected, "w30")):
        assert seq.input_ids[: len(prompt_ids)] == prompt_ids[: len(seq.input_ids)]
        trained = [t for t in seq.labels if t != IGNORE_INDEX]
        assert tok.decode(trained).split()[: len(answer.split())] == answer.split()
        assert all(label == IGNORE_INDEX for label in seq.labels[: len(prompt_ids)])
