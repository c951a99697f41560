"""Tool-call formats: parsers per template family on recorded outputs (well-formed and malformed), the family read
off real chat templates, forced-call grammars that parse back, and prompts with tools rendered like transformers."""

from __future__ import annotations

import json

import pytest

from nomoat.tokenizer import Tokenizer
from nomoat.tokenizer.tool_calls import ToolCall, family_of, parse_tool_calls, template_messages, tool_grammar

from tokenizer_utils import byte_level_bpe, read_template, write_folder

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip
PARIS = ToolCall("get_weather", '{"city": "Paris"}')

RECORDED = [
    # (family, model output, expected content, expected calls)
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', None, [PARIS]),
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
               '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>',
     "Let me check.\n", [PARIS, ToolCall("get_weather", '{"city": "Rome"}')]),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par', None, None),  # cut off
    ("hermes", "<tool_call>\nnot json\n</tool_call>", None, None),
    ("hermes", "The weather is fine.", None, None),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [PARIS]),
    ("llama3", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [PARIS]),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_weather", "parameters": '
               '{"city": "Rome"}}', None, [PARIS, ToolCall("get_weather", '{"city": "Rome"}')]),
    ("llama3", '{"name": "get_weather", "parameters": "{\\"city\\": \\"Paris\\"}"}', None, [PARIS]),
    ("llama3", '{"answer": 42}', None, None),
    ("llama3", "{ broken", None, None),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]', None, [PARIS]),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', None, [PARIS]),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": ', None, None),
    ("mistral", "Sure, it is sunny.", None, None),
    ("json", '{"name": "get_weather", "arguments": {"city": "Paris"}}', None, [PARIS]),
    ("json", '[{"name": "get_weather", "arguments": {"city": "Paris"}}]', None, [PARIS]),
    ("json", "[1, 2, 3]", None, None),
]


@pytest.mark.parametrize(("family", "text", "content", "calls"), RECORDED)
def test_parsers_on_recorded_outputs(family, text, content, calls):
    got_content, got_calls = parse_tool_calls(text, family)
    if calls is None:  # malformed or no call: the whole text is the content, no call is invented
        assert (got_content, got_calls) == (text, [])
    else:
        assert got_calls == calls and got_content == content
        assert all(isinstance(json.loads(c.arguments), dict) for c in got_calls)


def test_family_of_real_templates():
    assert family_of(read_template("qwen2_5")) == "hermes"
    assert family_of(read_template("llama3_1")) == "llama3"
    assert family_of(read_template("smollm2")) == "json"
    assert family_of(None) == "json"


@pytest.mark.parametrize("family", ["hermes", "llama3", "mistral", "json"])
@pytest.mark.parametrize("parallel", [True, False])
def test_forced_grammars_compile_and_accept_their_own_format(family, parallel):
    llguidance = pytest.importorskip("llguidance")
    grammar = tool_grammar(family, [WEATHER], parallel)
    text = {"hermes": '<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris"}}\n</tool_call>',
            "llama3": '{"name":"get_weather","parameters":{"city":"Paris"}}',
            "mistral": '[TOOL_CALLS][{"name":"get_weather","arguments":{"city":"Paris"}}]',
            "json": ('[{"name":"get_weather","arguments":{"city":"Paris"}}]' if parallel
                     else '{"name":"get_weather","arguments":{"city":"Paris"}}')}[family]  # fmt: skip
    tok = byte_level_bpe()
    lltok = llguidance.LLTokenizer(tok.to_str(), eos_token=tok.token_to_id("</s>"))
    compiled = llguidance.LLMatcher.grammar_from_lark(grammar)
    matcher = llguidance.LLMatcher(lltok, compiled)
    assert not matcher.is_error(), matcher.get_error()
    assert matcher.consume_tokens(tok.encode(text, add_special_tokens=False).ids), matcher.get_error()
    assert matcher.is_accepting()
    other = llguidance.LLMatcher(lltok, compiled)  # a call of another function is refused
    assert not other.consume_tokens(tok.encode('{"name":"other"', add_special_tokens=False).ids)
    assert parse_tool_calls(text, family)[1] == [PARIS]


@pytest.mark.parametrize("template", ["qwen2_5", "llama3_1"])
def test_tools_and_tool_history_render_like_transformers(template, tmp_path):
    """nomoat renders tools, assistant tool_calls (arguments sent as JSON text) and tool results as transformers."""
    from transformers import AutoTokenizer

    folder = write_folder(tmp_path / template, byte_level_bpe(), config={"chat_template": read_template(template),
                                                                         "eos_token": "<|im_end|>"})  # fmt: skip
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
                    "name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
                {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'}]  # fmt: skip
    as_transformers = json.loads(json.dumps(messages))
    as_transformers[2]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}
    kwargs = {"tools": [WEATHER], "add_generation_prompt": True, "tokenize": False,
              "date_string": "26 Jul 2024"}  # fmt: skip
    want = AutoTokenizer.from_pretrained(folder).apply_chat_template(as_transformers, **kwargs)
    got = Tokenizer.from_dir(folder).apply_chat_template(template_messages(messages), **kwargs)
    assert got == want
    assert "get_weather" in got and "Paris" in got
