"""Dataset formats and loading: every format from every file type, detection, column mapping, precise errors."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nomoat.data import FORMATS, Conversation, DataError, Preference, Text, detect_format, load_dataset
from nomoat.data.formats import Source, register_format

DATA = Path(__file__).resolve().parents[1] / "fixtures" / "data"

SYS = {"role": "system", "content": "Be brief."}
Q = {"role": "user", "content": "Capital of France?"}
A = {"role": "assistant", "content": "Paris."}

# format -> (records, the first record's expected example)
CASES: dict[str, tuple[list[dict[str, Any]], Any]] = {
    "alpaca": (
        [{"instruction": "Translate to German.", "input": "Good morning", "output": "Guten Morgen.", "system": "S"},
         {"instruction": "Capital of France?", "input": "", "output": "Paris."}],
        Conversation([{"role": "system", "content": "S"},
                      {"role": "user", "content": "Translate to German.\n\nGood morning"},
                      {"role": "assistant", "content": "Guten Morgen."}]),
    ),
    "dolly": (
        [{"instruction": "Summarize.", "context": "A long text.", "response": "Short.", "category": "summarization"},
         {"instruction": "Capital of France?", "context": "", "response": "Paris."}],
        Conversation([{"role": "user", "content": "Summarize.\n\nA long text."},
                      {"role": "assistant", "content": "Short."}]),
    ),
    "sharegpt": (
        [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Capital of France?"},
                            {"from": "gpt", "value": "Paris."}]},
         {"conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello"}]}],
        Conversation([SYS, Q, A]),
    ),
    "messages": (
        [{"messages": [SYS, {"role": "user", "content": [{"type": "text", "text": "Capital of "},
                                                         {"type": "text", "text": "France?"}]}, A]},
         {"messages": [Q, A, {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "Welcome"}]}],
        Conversation([SYS, Q, A]),
    ),
    "preference": (
        [{"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."},
         {"prompt": [SYS, Q], "chosen": [A], "rejected": [{"role": "assistant", "content": "Rome."}]}],
        Preference([Q], [A], [{"role": "assistant", "content": "Lyon."}]),
    ),
    "text": (
        [{"text": "Once upon a time, there was a fox.\nThe end."}, {"text": "Second document."}],
        Text("Once upon a time, there was a fox.\nThe end."),
    ),
}


def _flat(record: dict[str, Any]) -> dict[str, Any]:
    """CSV cells are strings: nested values are written as JSON."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in record.items()}


def write(path: Path, records: list[Any]) -> Path:
    """Write records in the file type named by the suffix."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    elif path.suffix == ".csv":
        keys = list(dict.fromkeys(k for r in records for k in r))
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, keys)
            w.writeheader()
            w.writerows(_flat(r) for r in records)
    else:
        keys = list(dict.fromkeys(k for r in records for k in r))
        # Parquet columns need one type: nested values go in as JSON strings when they mix shapes.
        rows = [{k: r.get(k) for k in keys} for r in records]
        try:
            table = pa.Table.from_pylist(rows)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            table = pa.Table.from_pylist([{k: v if v is None or isinstance(v, str) else json.dumps(v)
                                           for k, v in r.items()} for r in rows])
        pq.write_table(table, path)
    return path


def _strip(example: Any) -> Any:
    example.source = None
    return example


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_every_format_from_every_file_type(tmp_path: Path, name: str, suffix: str) -> None:
    records, expected = CASES[name]
    path = write(tmp_path / f"data{suffix}", records)
    for fmt in (name, "auto"):
        ds = load_dataset(path, format=fmt)
        assert ds.format == name and len(ds) == 2
        first = ds.examples[0]
        unit = {".parquet": "row"}.get(suffix, "line")
        start = {".jsonl": 1, ".json": 2, ".csv": 2, ".parquet": 0}[suffix]
        assert first.source == Source("data" + suffix, start, unit)
        assert _strip(first) == expected
        assert ds.files == [{"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                             "records": 2}]


def test_sources_point_at_lines(tmp_path: Path) -> None:
    records = CASES["alpaca"][0] * 2
    path = tmp_path / "d.json"
    write(path, records)
    lines = path.read_text().splitlines()
    for ex in load_dataset(path).examples:
        assert lines[ex.source.index - 1].strip() == "{"
    # CSV: a quoted multi-line cell moves the next record's line; the header is line 1.
    path = tmp_path / "d.csv"
    path.write_text('instruction,output\n"two\nlines",a\nq,b\n', encoding="utf-8")
    assert [str(e.source) for e in load_dataset(path).examples] == ["d.csv:2", "d.csv:4"]
    # A .json file holding one object per line (what `datasets` writes) reads as JSONL; {"data": [...]} works.
    path.with_suffix(".json").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert len(load_dataset(path.with_suffix(".json"))) == 4
    (tmp_path / "w.json").write_text(json.dumps({"data": records}))
    ds = load_dataset(tmp_path / "w.json")
    assert str(ds.examples[3].source) == "w.json data record 4"


def test_fixture_files_folder_and_limit(tmp_path: Path) -> None:
    ds = load_dataset(DATA / "alpaca_sample.jsonl")
    assert ds.format == "alpaca" and len(ds) == 3
    assert ds.examples[2].messages[0] == {"role": "system", "content": "You are a calculator."}
    ds = load_dataset(DATA / "sharegpt_sample.json")
    assert ds.format == "sharegpt"
    assert [m["role"] for m in ds.examples[1].messages] == ["system", "user", "assistant", "user", "assistant"]
    (tmp_path / "folder" / "sub").mkdir(parents=True)
    for part in ("a.jsonl", "b.json", "sub/c.parquet"):
        write(tmp_path / "folder" / part, CASES["text"][0])
    (tmp_path / "folder" / "notes.txt").write_text("ignored")
    ds = load_dataset(tmp_path / "folder")
    assert len(ds) == 6 and len(ds.files) == 3
    assert len(load_dataset(tmp_path / "folder", limit=3)) == 3
    assert len(load_dataset([DATA / "alpaca_sample.jsonl", DATA / "alpaca_sample.jsonl"])) == 6


def test_detect_format() -> None:
    for name, (records, _) in CASES.items():
        assert detect_format(records[0]) == name
    assert detect_format({"instruction": "q", "response": "a"}) == "dolly"
    assert detect_format({"question": "q", "answer": "a"}, {"instruction": "question", "output": "answer"}) == "alpaca"
    with pytest.raises(DataError) as e:
        detect_format({"question": "q", "answer": "a"})
    msg = str(e.value)
    assert "answer, question" in msg and "alpaca (instruction, output)" in msg and "--columns" in msg


def test_column_mapping(tmp_path: Path) -> None:
    path = write(tmp_path / "qa.csv", [{"question": "Capital of France?", "answer": "Paris.", "id": "1"}])
    ds = load_dataset(path, columns={"instruction": "question", "output": "answer"})
    assert ds.format == "alpaca" and _strip(ds.examples[0]) == Conversation([Q, A])
    path = write(tmp_path / "chat.jsonl", [{"dialog": [Q, A]}])
    assert load_dataset(path, format="messages", columns={"messages": "dialog"}).examples[0].messages == [Q, A]
    # Mapping a field away from a column that has the field's own name hides the original.
    path = write(tmp_path / "x.jsonl", [{"text": "old", "body": "new"}])
    assert load_dataset(path, columns={"text": "body"}).examples[0].text == "new"


def test_register_format(tmp_path: Path) -> None:
    @register_format("qa_test", required=("q", "a"))
    def parse_qa(record: dict) -> Conversation:
        return Conversation([{"role": "user", "content": record["q"]}, {"role": "assistant", "content": record["a"]}])

    try:
        path = write(tmp_path / "qa.jsonl", [{"q": "x", "a": "y"}])
        assert load_dataset(path).format == "qa_test"
    finally:
        del FORMATS["qa_test"]


def _error(tmp_path: Path, name: str, content: str | list[Any], **kwargs: Any) -> str:
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        write(path, content)
    with pytest.raises(DataError) as e:
        load_dataset(path, **kwargs)
    return str(e.value)


ALP = {"instruction": "q", "output": "a"}


def test_errors_name_file_line_and_field(tmp_path: Path) -> None:
    # The example of the design brief, at line 3.
    msg = _error(tmp_path, "data.jsonl", [ALP, ALP, {"instruction": "q", "response": "a"}], format="alpaca")
    assert msg == ('data.jsonl:3: field "output" is missing (alpaca records need instruction and output; found keys: '
                   'instruction, response). Use --format dolly or --columns output=response.')
    msg = _error(tmp_path, "bad.jsonl", '{"instruction": "q", "output": "a"}\n{"instruction": "q", "output": }\n')
    assert msg.startswith("bad.jsonl:2: not valid JSON: Expecting value (column 32)")
    msg = _error(tmp_path, "list.jsonl", [ALP, ["q", "a"]])
    assert msg == "list.jsonl:2: expected an object with fields, got a list"
    msg = _error(tmp_path, "empty.jsonl", [ALP, {"instruction": "q", "output": "  "}])
    assert msg.startswith('empty.jsonl:2: field "output" is empty')
    msg = _error(tmp_path, "num.jsonl", [ALP, {"instruction": "q", "output": 42}])
    assert msg.startswith('num.jsonl:2: field "output" must be a string, got a int (42)')
    msg = _error(tmp_path, "null.parquet", [ALP, ALP, {"instruction": None, "output": "a"}])
    assert msg.startswith('null.parquet row 2: field "instruction" is null')
    msg = _error(tmp_path, "roles.jsonl", [{"messages": [Q, A]}, {"messages": [{"role": "bot", "content": "x"}, A]}])
    assert msg == ("roles.jsonl:2: field \"messages[0].role\" has unknown role 'bot' "
                   "(allowed: system, user, assistant, tool)")
    msg = _error(tmp_path, "sg.json", [{"conversations": [{"from": "human", "value": "x"}]}])
    assert msg.startswith('sg.json:2: field "conversations" has no assistant turn, so there is nothing to train on')
    assert "--format text" in msg
    msg = _error(tmp_path, "parts.jsonl", [{"messages": [{"role": "user", "content": [{"type": "image_url"}]}, A]}])
    assert msg.startswith("parts.jsonl:1: field \"messages[0].content\" has a content part of type 'image_url'")
    msg = _error(tmp_path, "cells.csv", "instruction,output\nq,a\nq,a,extra\n")
    assert msg.startswith("cells.csv:3: has 3 cells but the header has 2 columns")
    msg = _error(tmp_path, "mapped.csv", [{"question": "q", "answer": ""}], columns={"instruction": "question",
                                                                                     "output": "answer"})
    assert msg.startswith('mapped.csv:2: field "output" (column "answer") is empty')


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        load_dataset(tmp_path / "nope.jsonl")
    assert _error(tmp_path, "e.jsonl", "") == f"{tmp_path / 'e.jsonl'}: file is empty"
    assert _error(tmp_path, "h.csv", "instruction,output\n").endswith("no records in the file (only a header)")
    assert "unsupported file type '.txt'" in _error(tmp_path, "d.txt", "hello")
    assert _error(tmp_path, "broken.json", '[\n {"a": 1},\n {"a": 2\n]').startswith("broken.json:4: not valid JSON")
    assert "unknown format 'alpacca'" in _error(tmp_path, "ok.jsonl", [ALP], format="alpacca")
    msg = _error(tmp_path, "keys.jsonl", [{"question": "q", "reply": "a"}])
    assert "could not detect the data format from the keys question, reply" in msg


def test_many_errors_are_collected(tmp_path: Path) -> None:
    # The first record fits no format: detection looks further (at the first 20 records).
    records = [ALP if i % 3 else {"instruction": "q"} for i in range(60)]
    with pytest.raises(DataError) as e:
        load_dataset(write(tmp_path / "many.jsonl", records), max_errors=10)
    assert len(e.value.errors) == 10
    lines = str(e.value).splitlines()
    assert lines[0] == "10 problems in the data (stopped after the first 10):"
    assert lines[1].startswith('  many.jsonl:1: field "output" is missing') and lines[2].startswith("  many.jsonl:4:")
    with pytest.raises(DataError) as e:
        load_dataset(write(tmp_path / "few.jsonl", records[:7]))
    assert len(e.value.errors) == 3 and str(e.value).startswith("3 problems in the data:")


def test_preference_details(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Anthropic-HH style: full conversations, the shared start becomes the prompt.
    hh = {"chosen": [Q, A], "rejected": [Q, {"role": "assistant", "content": "Rome."}]}
    same = {"prompt": "q", "chosen": "a", "rejected": "a"}
    ds = load_dataset(write(tmp_path / "p.jsonl", [hh, same]))
    assert _strip(ds.examples[0]) == Preference([Q], [A], [{"role": "assistant", "content": "Rome."}])
    assert ds.warnings == ["p.jsonl:2: chosen and rejected are identical; the pair teaches nothing"]
    assert "identical" in caplog.text
    msg = _error(tmp_path, "pm.jsonl", [{"chosen": "a", "rejected": "b"}])
    assert msg.startswith('pm.jsonl:1: field "prompt" is missing')


def test_line_separators_inside_values(tmp_path: Path) -> None:
    """U+2028 inside a JSON string and a CR/LF inside a quoted CSV cell stay within their record."""
    record = {"instruction": "a\u2028b", "output": "c\r\nd"}
    path = tmp_path / "sep.jsonl"
    path.write_text(json.dumps(record, ensure_ascii=False) + "\r\n" + json.dumps(ALP) + "\n", encoding="utf-8")
    ds = load_dataset(path)
    assert ds.examples[0].messages[0]["content"] == "a\u2028b" and str(ds.examples[1].source) == "sep.jsonl:2"
    ds = load_dataset(write(tmp_path / "sep.csv", [record, ALP]))
    assert ds.examples[0].messages[1]["content"] == "c\r\nd" and str(ds.examples[1].source) == "sep.csv:4"
