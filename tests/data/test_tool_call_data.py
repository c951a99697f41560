"""SFT data with tool calls: records with `tools`, assistant `tool_calls` and `tool` results render as transformers
renders them (`apply_chat_template(..., tools=...)`), and the loss falls on the assistant's calls and answers only."""

from __future__ import annotations

import json
import sys

import pytest
import transformers

from nomoat.data import load_dataset
from nomoat.data.formats import FORMATS, RecordError, Source, parse_record
from nomoat.data.render import tokenize_example
from nomoat.tokenizer import Tokenizer
from nomoat.tokenizer.tool_calls import template_messages
from structured_utils import make_structured_model

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]  # fmt: skip
RECORD = {
    "tools": TOOLS,
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": '{"temp_c": 21}'},
        {"role": "assistant", "content": "It is 21 C in Paris."},
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_structured_model(tmp_path_factory.mktemp("tools") / "m")


def test_tool_call_records_render_as_transformers_and_train_on_the_calls(model_dir):
    conv = parse_record(FORMATS["messages"], RECORD, Source("t.jsonl", 1))
    tok = Tokenizer.from_dir(model_dir)
    (seq,) = tokenize_example(conv, tok, max_length=1024)
    hf = transformers.AutoTokenizer.from_pretrained(model_dir)
    expected = hf.apply_chat_template(template_messages(RECORD["messages"]), tools=TOOLS, tokenize=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert seq.input_ids == list(expected)
    trained = tok.decode([t for t, lab in zip(seq.input_ids, seq.labels) if lab != -100])
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
    assert trained == call + "It is 21 C in Paris.<|im_end|>"
    assert "get_weather" in hf.decode(seq.input_ids[: seq.labels.index(next(x for x in seq.labels if x != -100))])


def test_malformed_tool_calls_are_located():
    bad = {"messages": [{"role": "user", "content": "q"},
                        {"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": "{}"}}]}]}
    with pytest.raises(RecordError) as err:
        parse_record(FORMATS["messages"], bad, Source("t.jsonl", 1))
    assert err.value.problem.startswith('t.jsonl:1: field "messages[1].tool_calls[0]" must be {"type": "function"')
    empty = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}
    with pytest.raises(RecordError, match="is empty"):
        parse_record(FORMATS["messages"], empty, Source("t.jsonl", 1))


def test_nomoat_train_learns_tool_calls(model_dir, tmp_path):
    from typer.testing import CliRunner

    from nomoat.cli import app

    data = tmp_path / "tools.jsonl"
    data.write_text("".join(json.dumps(RECORD) + "\n" for _ in range(4)))
    assert load_dataset([str(data)]).format == "messages"
    out = CliRunner().invoke(app, ["train", str(model_dir), "--data", str(data), "--max-steps", "2", "--batch-size",
                                   "2", "--output-dir", str(tmp_path / "runs"), "--name", "t", "--no-progress"])
    assert out.exit_code == 0, out.output
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "t" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in m for m in metrics)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
