"""Chat templates: nomoat's rendering must equal transformers' `apply_chat_template` on real public templates."""

from __future__ import annotations

import copy
import hashlib
from datetime import datetime
from pathlib import Path

import jinja2
import pytest
from transformers import AutoTokenizer

from nomoat.tokenizer import ChatTemplateError, Tokenizer

from tokenizer_utils import FIXTURES, byte_level_bpe, read_template, template_meta, write_folder

META = template_meta()
NAMES = sorted(META)

SYSTEM = {"role": "system", "content": "You are a terse assistant.\nAnswer in one line."}
CHAT = [
    {"role": "user", "content": "Hi there! Qu'est-ce que c'est ? 日本語 🎉"},
    {"role": "assistant", "content": "  Hello!  How can I help?\n"},
    {"role": "user", "content": "Write `print(1)` in Python.\n\n  Thanks  "},
]
ENDS_WITH_ASSISTANT = [*CHAT, {"role": "assistant", "content": "Sure, here it is: "}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather — in °C",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "City name, e.g. Zürich"}},
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "now", "description": "Current time", "parameters": {}}},
]
TOOL_CHAT = [
    {"role": "user", "content": "What's the weather in Zürich?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}],
    },
    {"role": "tool", "content": '{"temp": 21, "unit": "°C"}'},
    {"role": "assistant", "content": "It is 21 °C in Zürich."},
    {"role": "user", "content": "Thanks!"},
]


def _folder(root: Path, name: str) -> Path:
    meta = META[name]
    specials = {k: meta[k] for k in ("bos_token", "eos_token", "pad_token") if meta.get(k)}
    config = {**specials, "chat_template": read_template(name)}
    gen = {"eos_token_id": meta["generation_eos_token_id"]} if "generation_eos_token_id" in meta else None
    return write_folder(root / name, byte_level_bpe(), config, gen)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Tokenizer, object]]:
    root = tmp_path_factory.mktemp("templates")
    out = {}
    for name in NAMES:
        folder = _folder(root, name)
        out[name] = (Tokenizer.from_dir(folder), AutoTokenizer.from_pretrained(folder))
    return out


def _both(pair: tuple[Tokenizer, object], messages: list[dict], **kwargs: object) -> tuple[str, str]:
    ours, hf = pair
    # Each side gets its own copy so that neither can see the other's edits (continue_final_message tags, ...).
    mine = ours.apply_chat_template(copy.deepcopy(messages), **kwargs)
    ref = hf.apply_chat_template(copy.deepcopy(messages), tokenize=False, **kwargs)
    return mine, ref


@pytest.mark.parametrize("name", NAMES)
def test_fixture_is_the_published_template(name: str) -> None:
    data = (FIXTURES / META[name]["file"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == META[name]["sha256"]


# Gemma 2 rejects system messages: that is tested in test_raise_exception_surfaces_as_chat_template_error.
SYSTEM_CASES = [(n, s) for n in NAMES for s in (False, True) if META[n]["system"] or not s]


@pytest.mark.parametrize(("name", "with_system"), SYSTEM_CASES)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_multi_turn_matches_transformers(
    pairs: dict, name: str, add_generation_prompt: bool, with_system: bool
) -> None:
    messages = [SYSTEM, *CHAT] if with_system else CHAT
    mine, ref = _both(pairs[name], messages, add_generation_prompt=add_generation_prompt)
    assert mine == ref
    assert "Hi there!" in mine


@pytest.mark.parametrize("name", NAMES)
def test_single_user_turn_and_tokenize(pairs: dict, name: str) -> None:
    ours, hf = pairs[name]
    messages = [{"role": "user", "content": "Bonjour — ça va ? 🚀"}]
    mine, ref = _both(pairs[name], messages, add_generation_prompt=True)
    assert mine == ref
    ids = ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert ids == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == ours.encode(mine, add_special_tokens=False)


@pytest.mark.parametrize("name", NAMES)
def test_continue_final_message(pairs: dict, name: str) -> None:
    mine, ref = _both(pairs[name], ENDS_WITH_ASSISTANT, continue_final_message=True)
    assert mine == ref
    assert mine.rstrip().endswith("Sure, here it is:")


@pytest.mark.parametrize("name", ["llama3_1", "qwen2_5"])
def test_tools_and_tool_calls(pairs: dict, name: str) -> None:
    for messages in (TOOL_CHAT, [SYSTEM, *TOOL_CHAT], CHAT):
        for agp in (False, True):
            mine, ref = _both(pairs[name], messages, tools=TOOLS, add_generation_prompt=agp)
            assert mine == ref
            assert "get_weather" in mine
            assert "Zürich" in mine  # tojson keeps non-ASCII text as is


def test_llama31_template_variables(pairs: dict) -> None:
    variants = [
        {"date_string": "05 Mar 2025"},
        {"tools": TOOLS, "tools_in_user_message": False},
        {"builtin_tools": ["brave_search", "wolfram_alpha"], "tools": TOOLS},
    ]
    for kwargs in variants:
        mine, ref = _both(pairs["llama3_1"], [SYSTEM, *TOOL_CHAT], add_generation_prompt=True, **kwargs)
        assert mine == ref
    mine, _ = _both(pairs["llama3_1"], CHAT, date_string="05 Mar 2025")
    assert "Today Date: 05 Mar 2025\n" in mine
    default, _ = _both(pairs["llama3_1"], CHAT)
    assert "Today Date: 26 Jul 2024\n" in default
    assert default.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")


def test_raise_exception_surfaces_as_chat_template_error(pairs: dict) -> None:
    cases = [
        ("gemma2", [SYSTEM, *CHAT], {}, "System role not supported"),
        ("gemma2", [CHAT[0], CHAT[0]], {}, "Conversation roles must alternate"),
        ("mistral_v0_1", [CHAT[1], CHAT[0]], {}, "conversation roles must alternate"),
        ("llama3_1", [SYSTEM], {"tools": TOOLS}, "Cannot put tools in the first user message"),
    ]
    for name, messages, kwargs, message in cases:
        ours, hf = pairs[name]
        with pytest.raises(jinja2.TemplateError, match=message):
            hf.apply_chat_template(messages, tokenize=False, **kwargs)
        with pytest.raises(ChatTemplateError, match=message):
            ours.apply_chat_template(messages, **kwargs)


def test_continue_final_message_errors(pairs: dict) -> None:
    ours, hf = pairs["phi3"]
    cases = [
        ({"add_generation_prompt": True}, ENDS_WITH_ASSISTANT, "not compatible"),
        ({}, [*CHAT[:2], {"role": "assistant"}], "has no \"content\" to continue"),
    ]
    for kwargs, messages, error in cases:
        with pytest.raises(ValueError, match=error):
            hf.apply_chat_template(copy.deepcopy(messages), tokenize=False, continue_final_message=True, **kwargs)
        with pytest.raises(ValueError, match=error):
            ours.apply_chat_template(copy.deepcopy(messages), continue_final_message=True, **kwargs)
    # A template that drops the final message's text cannot be continued.
    drop = "{% for m in messages %}{{ m['role'] }}{% endfor %}{{ 'content' if false }}"
    for side in (ours, hf):
        with pytest.raises(ValueError, match="does not appear in the chat"):
            kwargs = {} if side is ours else {"tokenize": False}
            side.apply_chat_template(copy.deepcopy(ENDS_WITH_ASSISTANT), continue_final_message=True,
                                     chat_template=drop, **kwargs)
    with pytest.raises(ValueError, match="empty conversation"):
        ours.apply_chat_template([])


def test_special_tokens_reach_the_template(pairs: dict) -> None:
    template = "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token }}|{{ custom }}"
    ours, hf = pairs["gemma2"]
    mine = ours.apply_chat_template(CHAT, chat_template=template, custom="x", eos_token="<override>")
    ref = hf.apply_chat_template(CHAT, chat_template=template, custom="x", eos_token="<override>", tokenize=False)
    assert mine == ref == "<bos>|<override>|<pad>||x"


def test_filters_globals_and_extensions_match(pairs: dict) -> None:
    ours, hf = pairs["smollm2"]
    template = (
        "{%- set ns = namespace(n=0) -%}"
        "{%- for m in messages -%}{%- if loop.index > 2 %}{% break %}{% endif -%}"
        "{%- set ns.n = ns.n + 1 -%}{% generation %}{{ m | tojson }}{% endgeneration %}\n{% endfor -%}"
        "{{ tools | tojson(indent=2) }}{{ dict(a=1) | tojson }}{{ documents[0].title }} {{ ns.n }}"
        "{{ ' ' ~ undefined_var ~ '|' }}{{ messages[0].content | trim }}"
    )
    docs = [{"title": "Doc ✓", "text": "body"}]
    mine = ours.apply_chat_template(CHAT, chat_template=template, tools=TOOLS, documents=docs)
    ref = hf.apply_chat_template(CHAT, chat_template=template, tools=TOOLS, documents=docs, tokenize=False)
    assert mine == ref
    assert '"Hi there! Qu\'est-ce que c\'est ? 日本語 🎉"' in mine
    with pytest.raises(ChatTemplateError):
        ours.apply_chat_template(CHAT, chat_template="{% set ns = namespace() %}{% set ns._x = 1 %}")
    with pytest.raises(ChatTemplateError):
        ours.apply_chat_template(CHAT, chat_template="{{ messages.__class__.__mro__ }}{% if %}")


def test_strftime_now(pairs: dict) -> None:
    ours, _ = pairs["smollm2"]
    fmt = "%d %b %Y"
    before = datetime.now().strftime(fmt)
    out = ours.apply_chat_template(CHAT, chat_template="{{ strftime_now('" + fmt + "') }}")
    assert out in {before, datetime.now().strftime(fmt)}
    # The Llama 3.2-style fallback: strftime_now is defined, so it wins over the hard-coded date.
    template = (
        "{%- if not date_string is defined %}{%- if strftime_now is defined %}"
        "{%- set date_string = strftime_now('%d %b %Y') %}{%- else %}{%- set date_string = '26 Jul 2024' %}"
        "{%- endif %}{%- endif %}Today Date: {{ date_string }}"
    )
    out = ours.apply_chat_template(CHAT, chat_template=template)
    assert datetime.strptime(out.removeprefix("Today Date: "), fmt)
    fixed = ours.apply_chat_template(CHAT, chat_template=template, date_string="01 Jan 2030")
    assert fixed == "Today Date: 01 Jan 2030"


def test_batch_of_conversations(pairs: dict) -> None:
    ours, hf = pairs["qwen2_5"]
    batch = [CHAT, [SYSTEM, CHAT[0]]]
    assert ours.apply_chat_template(batch) == hf.apply_chat_template(batch, tokenize=False)
    assert ours.apply_chat_template(batch, tokenize=True) == hf.apply_chat_template(
        batch, tokenize=True, return_dict=False
    )


def test_chat_template_jinja_file(tmp_path: Path) -> None:
    folder = write_folder(tmp_path, byte_level_bpe(), {"bos_token": "<s>", "eos_token": "</s>"},
                          files={"chat_template.jinja": read_template("phi3")})
    ours, hf = Tokenizer.from_dir(folder), AutoTokenizer.from_pretrained(folder)
    assert ours.chat_template == hf.chat_template == read_template("phi3")
    assert ours.apply_chat_template(CHAT) == hf.apply_chat_template(CHAT, tokenize=False)


def test_named_templates(tmp_path: Path) -> None:
    templates = [
        {"name": "default", "template": read_template("smollm2")},
        {"name": "tool_use", "template": read_template("qwen2_5")},
        {"name": "rag", "template": "{% for d in documents %}{{ d.title }}: {{ d.text }}\n{% endfor %}"},
    ]
    folder = write_folder(tmp_path, byte_level_bpe(), {"eos_token": "<|im_end|>", "chat_template": templates})
    ours, hf = Tokenizer.from_dir(folder), AutoTokenizer.from_pretrained(folder)
    assert ours.chat_template == read_template("smollm2")
    assert set(ours.chat_templates) == {"default", "tool_use", "rag"}
    docs = [{"title": "A", "text": "alpha"}, {"title": "B", "text": "βeta"}]
    for kwargs in ({}, {"tools": TOOLS}, {"chat_template": "rag", "documents": docs}):
        mine = ours.apply_chat_template(CHAT, **kwargs)
        assert mine == hf.apply_chat_template(CHAT, tokenize=False, **kwargs)
    assert "<tools>" in ours.apply_chat_template(CHAT, tools=TOOLS)  # "tool_use" is picked when tools are given
    assert ours.apply_chat_template(CHAT, chat_template="rag", documents=docs) == "A: alpha\nB: βeta\n"


def test_additional_chat_templates_folder(tmp_path: Path) -> None:
    folder = write_folder(
        tmp_path, byte_level_bpe(), {"eos_token": "</s>", "chat_template": "ignored: files win"},
        files={"chat_template.jinja": read_template("smollm2"),
               "additional_chat_templates/phi.jinja": read_template("phi3")},
    )
    ours, hf = Tokenizer.from_dir(folder), AutoTokenizer.from_pretrained(folder)
    expected = {"default": read_template("smollm2"), "phi": read_template("phi3")}
    assert ours.chat_templates == hf.chat_template == expected
    for name in (None, "phi"):
        assert ours.apply_chat_template(CHAT, chat_template=name) == hf.apply_chat_template(
            CHAT, chat_template=name, tokenize=False
        )


def test_no_chat_template(tmp_path: Path) -> None:
    ours = Tokenizer.from_dir(write_folder(tmp_path, byte_level_bpe(), {"eos_token": "</s>"}))
    assert ours.chat_template is None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        ours.apply_chat_template(CHAT)
    # An explicit template still works.
    assert ours.apply_chat_template(CHAT, chat_template="{{ messages | length }}") == "3"


def test_rich_inputs_are_made_plain(pairs: dict) -> None:
    ours, hf = pairs["smollm2"]

    class Role(str):
        pass

    messages = [{"role": Role("user"), "content": "hi", "extra": object()}, {"role": "assistant", "content": None}]
    template = "{% for m in messages %}{{ m.role }}:{{ m.content }}:{{ m.extra }};{% endfor %}"
    mine = ours.apply_chat_template(copy.deepcopy(messages), chat_template=template)
    assert mine == hf.apply_chat_template(copy.deepcopy(messages), chat_template=template, tokenize=False)
    assert mine == "user:hi:<object>;assistant::;"


def test_reasoning_fields(pairs: dict) -> None:
    ours, hf = pairs["qwen2_5"]
    template = (
        "{% for m in messages %}{{ m.role }}[{{ m.reasoning_content }}|{{ m.thinking }}]{{ m.content }}\n"
        "{% endfor %}"
    )
    messages = [CHAT[0], {"role": "assistant", "content": "4.", "reasoning": "2+2 is 4 "}]
    for kwargs in ({}, {"continue_final_message": True}, {"continue_final_message": "reasoning_content"}):
        mine = ours.apply_chat_template(copy.deepcopy(messages), chat_template=template, **kwargs)
        assert mine == hf.apply_chat_template(copy.deepcopy(messages), chat_template=template, tokenize=False, **kwargs)
    assert "assistant[2+2 is 4 |2+2 is 4 ]4." in ours.apply_chat_template(messages, chat_template=template)
