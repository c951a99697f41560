"""Structured output, tools and the rest of the request surface, through the official `openai` client over a real
socket against a real `nomoat serve` process (a tiny random model with a byte-level tokenizer and Qwen 2.5's chat
template); outputs are checked with `jsonschema`, `re` and the client's own types."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import pytest

from processes import NomoatServer
from structured_utils import SCHEMAS, make_random_adapter, make_structured_model

openai = pytest.importorskip("openai")
pytest.importorskip("llguidance")

SAMPLES = 50  # completions per schema
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}  # fmt: skip
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"], "additionalProperties": False}}}  # fmt: skip
TOOLS = [WEATHER, ADD]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("structured")
    model_dir = make_structured_model(root / "tiny")
    make_random_adapter(model_dir, root / "ad1", seed=1)
    args = ["serve", str(model_dir), "--adapter", f"ad1={root / 'ad1'}", "--name", "tiny", "--dtype", "float32",
            "--max-running", "8", "--max-queue", "256"]  # fmt: skip
    srv = NomoatServer(args, root / "server.log", env={"NOMOAT_HOME": str(root / "home")})
    yield srv.url, model_dir
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="none", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def aclient(server):
    return openai.AsyncOpenAI(base_url=f"{server[0]}/v1", api_key="none", max_retries=0, timeout=600)


def _fmt(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


def test_json_schema_outputs_validate_in_mixed_batches(aclient):
    """50 sampled completions per schema, sent together with free rows and rows on an adapter, all validate."""
    import asyncio

    async def one(i: int):
        kind = ["person", "points", "free"][i % 3]
        model = "ad1" if i % 2 else "tiny"
        kw = {"response_format": _fmt(kind)} if kind != "free" else {}
        out = await aclient.chat.completions.create(model=model, messages=[{"role": "user", "content": f"q{i}"}],
                                                   temperature=1.0, seed=i, max_tokens=200, **kw)  # fmt: skip
        return kind, out.choices[0]

    async def run():
        return await asyncio.gather(*[one(i) for i in range(3 * SAMPLES)])

    results = asyncio.run(run())
    valid = {"person": 0, "points": 0}
    for kind, choice in results:
        if kind == "free" or choice.finish_reason == "length":
            continue
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMAS[kind])
        valid[kind] += 1
    assert valid["person"] >= SAMPLES * 0.8 and valid["points"] >= SAMPLES * 0.8, valid


def test_json_object_regex_grammar_and_completions(client):
    out = client.completions.create(model="tiny", prompt="x", max_tokens=30, seed=1,
                                    extra_body={"response_format": {"type": "regex", "regex": r"[a-c]{3}-\d{2}"}})
    assert re.fullmatch(r"[a-c]{3}-\d{2}", out.choices[0].text)
    grammar = 'start: "yes" | "no" " " NUM\nNUM: /[0-9]{1,3}/\n'
    for seed in range(3):
        out = client.chat.completions.create(model="ad1", messages=[{"role": "user", "content": "?"}], seed=seed,
                                             max_tokens=10, temperature=1.0,
                                             extra_body={"response_format": {"type": "grammar", "grammar": grammar}})
        assert re.fullmatch(r"yes|no \d{1,3}", out.choices[0].message.content)
    out = client.completions.create(model="tiny", prompt="x", max_tokens=300, seed=2,
                                    extra_body={"response_format": _fmt("points")})
    assert out.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.choices[0].text), SCHEMAS["points"])
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "?"}], max_tokens=3,
                                         response_format={"type": "json_object"}, seed=0)
    content = out.choices[0].message.content
    assert content.startswith("{")  # "{}" may end it within 3 tokens; else max_tokens cuts it
    assert out.choices[0].finish_reason == ("stop" if content == "{}" else "length"), content
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "?"}], max_tokens=3,
                                         response_format=_fmt("person"), seed=0)  # needs more than 3 tokens
    assert out.choices[0].finish_reason == "length" and out.choices[0].message.content.startswith("{")
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "?"}], max_tokens=3,
                                         response_format={"type": "text"})
    assert out.choices[0].message.content


def test_bad_constraints_are_400(client):
    for fmt in ({"type": "regex", "regex": "(unclosed"}, {"type": "grammar", "grammar": "start: nothing\n"},
                {"type": "json_schema"}):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "?"}],
                                           extra_body={"response_format": fmt})  # fmt: skip
        assert e.value.body["param"] == "response_format"


def _call(client, choice, **kw):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "weather in Paris?"}],
                                          tools=TOOLS, tool_choice=choice, temperature=1.0, max_tokens=400, **kw)


def test_tools_required_and_named_are_enforced(client):
    for seed in range(4):
        out = _call(client, "required", seed=seed, parallel_tool_calls=False)  # one call: always finishes
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        for call in choice.message.tool_calls:
            tool = {"get_weather": WEATHER, "add": ADD}[call.function.name]
            jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
        named = _call(client, {"type": "function", "function": {"name": "add"}}, seed=seed).choices[0]
        assert [c.function.name for c in named.message.tool_calls] == ["add"]
        jsonschema.validate(json.loads(named.message.tool_calls[0].function.arguments), ADD["function"]["parameters"])


def test_tools_auto_and_none_answer(client):
    """A random model rarely writes a call by itself: with auto its text comes back as content, never a 500."""
    out = _call(client, "auto", seed=0)
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert out.choices[0].message.content or out.choices[0].message.tool_calls
    out = _call(client, "none", seed=0)
    assert out.choices[0].message.tool_calls is None


def test_streamed_tool_calls_reassemble_to_the_plain_answer(client):
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        plain = _call(client, choice, seed=7).choices[0]
        stream = _call(client, choice, seed=7, stream=True)
        calls: dict[int, dict] = {}
        content, finish = "", None
        for chunk in stream:
            delta = chunk.choices[0].delta
            content += delta.content or ""
            for tc in delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                entry["name"] += tc.function.name or ""
                entry["arguments"] += tc.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        assert finish == plain.finish_reason == "tool_calls"
        assert [calls[i] for i in sorted(calls)] == [{"name": c.function.name, "arguments": c.function.arguments}
                                                     for c in plain.message.tool_calls]  # fmt: skip
        assert content == (plain.message.content or "")


def test_tool_round_trip(client):
    """Call, tool result, final answer: the history with assistant tool_calls and a tool message is accepted."""
    first = _call(client, {"type": "function", "function": {"name": "get_weather"}}, seed=3).choices[0]
    call = first.message.tool_calls[0]
    messages = [{"role": "user", "content": "weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp": 21})}]  # fmt: skip
    final = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="none",
                                           max_tokens=8, temperature=0)  # fmt: skip
    assert final.choices[0].message.content and final.choices[0].message.tool_calls is None


def test_prompt_renders_tools_and_history_like_transformers(server):
    """The server's prompt (via /tokenize) is transformers' `apply_chat_template(..., tools=...)` of the same chat."""
    from transformers import AutoTokenizer

    url, model_dir = server
    hf = AutoTokenizer.from_pretrained(model_dir)
    args = {"city": "Paris", "unit": "C"}
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
                    "name": "get_weather", "arguments": json.dumps(args)}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "21"}]  # fmt: skip
    got = httpx.post(f"{url}/tokenize", json={"messages": messages}).json()["tokens"]
    hf_messages = [dict(m) for m in messages]
    hf_messages[2] = {**messages[2], "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                                                      "arguments": args}}]}
    want = hf.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=False)
    assert got == hf.encode(want, add_special_tokens=False)
    # and with tools: the chat completion's prompt token count equals transformers' rendering with tools=
    want_tools = hf.apply_chat_template(hf_messages, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    out = openai.OpenAI(base_url=f"{url}/v1", api_key="none").chat.completions.create(
        model="tiny", messages=messages, tools=TOOLS, tool_choice="none", max_tokens=1)
    assert out.usage.prompt_tokens == len(hf.encode(want_tools, add_special_tokens=False))


def test_n_logit_bias_and_seed(client):
    msgs = [{"role": "user", "content": "hi"}]
    a = client.chat.completions.create(model="tiny", messages=msgs, n=4, seed=11, temperature=1.0, max_tokens=6)
    b = client.chat.completions.create(model="tiny", messages=msgs, n=4, seed=11, temperature=1.0, max_tokens=6)
    assert [c.index for c in a.choices] == [0, 1, 2, 3]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1
    assert 6 < a.usage.completion_tokens <= 24  # summed over the choices
    greedy = client.completions.create(model="tiny", prompt=[[3, 4, 5]], max_tokens=1, temperature=0, logprobs=1)
    top = greedy.choices[0].logprobs.tokens[0]
    tok_id = httpx.post(f"{str(client.base_url).removesuffix('/v1/')}/tokenize",
                        json={"prompt": top, "add_special_tokens": False}).json()["tokens"]  # fmt: skip
    banned = client.completions.create(model="tiny", prompt=[[3, 4, 5]], max_tokens=1, temperature=0, logprobs=1,
                                       logit_bias={str(tok_id[0]): -100})  # fmt: skip
    assert banned.choices[0].logprobs.tokens[0] != top


def test_echo_logprobs_models_tokenize_embeddings(server, client):
    url, _ = server
    prompt = [5, 6, 7, 8, 9]
    out = client.completions.create(model="tiny", prompt=[prompt], max_tokens=1, temperature=0, logprobs=1,
                                    echo=True)  # fmt: skip
    lp = out.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(prompt) + 1
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    score = client.completions.create(model="tiny", prompt=[prompt], max_tokens=0, logprobs=0, echo=True)
    assert score.choices[0].logprobs.token_logprobs == lp.token_logprobs[:-1]
    assert client.models.retrieve("tiny").id == "tiny" and client.models.retrieve("ad1").parent == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    toks = httpx.post(f"{url}/tokenize", json={"prompt": "hello world"}).json()
    assert httpx.post(f"{url}/detokenize", json={"tokens": toks["tokens"]}).json()["prompt"].endswith("hello world")
    emb = client.embeddings.create(model="tiny", input=["hello", "world"])
    assert len(emb.data) == 2 and abs(sum(v * v for v in emb.data[0].embedding) - 1) < 1e-4
    adapted = client.embeddings.create(model="ad1", input="hello").data[0].embedding
    assert adapted != emb.data[0].embedding


def test_refused_fields_name_themselves(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       extra_body={"functions": []})  # fmt: skip
    assert "functions" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], n=2, stream=True)
    assert e.value.body["param"] == "n"
