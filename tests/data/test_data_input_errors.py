"""Bad input found by hand, each located: non-UTF-8 bytes by line, a JSON array named .jsonl, dropped examples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from nomoat.data import DataError, load_dataset, summarize
from nomoat.data.render import IGNORE_INDEX, Tokenized

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _error(path: Path) -> str:
    with pytest.raises(DataError) as info:
        load_dataset(path)
    return str(info.value)


def test_non_utf8_bytes_are_reported_by_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "fine too"}\n{"text": "caf\xe9"}\n')
    msg = _error(path)
    assert msg.startswith("latin.jsonl:3: not UTF-8 text"), msg
    assert "0xe9" in msg and "column 14" in msg and "Save the file as UTF-8" in msg


def test_non_utf8_after_a_bom_counts_from_the_file_start(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbftext\nok\nbad \xff\n")
    msg = _error(path)
    assert msg.startswith("bom.csv:3: not UTF-8 text (byte 0xff at column 5, byte 15 of the file)"), msg


@pytest.mark.parametrize("indent", [None, 2])
def test_a_json_array_named_jsonl_says_to_name_it_json(tmp_path: Path, indent: int | None) -> None:
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps([CHAT, CHAT], indent=indent))
    msg = _error(path)
    assert "this is one JSON array, not JSON Lines" in msg and "name it chats.json" in msg, msg
    renamed = tmp_path / "chats.json"
    path.rename(renamed)
    assert len(load_dataset(renamed)) == 2  # the hint is right


def test_dropped_examples_are_named_by_line(tmp_path: Path) -> None:
    """An example cut by --seq-len down to nothing trainable is dropped, and the summary says which and why."""
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(CHAT) + "\n" for _ in range(3)))
    ds = load_dataset(path)
    ok = [Tokenized([1, 2, 3], [IGNORE_INDEX, 2, 3], False, e.source) for e in ds.examples]
    ok[1] = Tokenized([1, 2, 3, 4], [IGNORE_INDEX] * 4, True, ds.examples[1].source)  # long: its answer was cut off
    ok[2] = Tokenized([1, 2], [IGNORE_INDEX] * 2, False, ds.examples[2].source)  # nothing to train on
    summary = summarize(ds, ok, 4)
    assert summary.dropped == 2
    assert summary.warnings[0].startswith("chat.jsonl:2: longer than 4 tokens (--seq-len)") and "dropped" in (
        summary.warnings[0])  # fmt: skip
    assert summary.warnings[1] == "chat.jsonl:3: no token to train on (see --train-on): dropped"
    console = Console(record=True, width=300, file=open("/dev/null", "w"))  # noqa: SIM115
    summary.render(console)
    assert "warning: chat.jsonl:2: longer than 4 tokens" in console.export_text()
