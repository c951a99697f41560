"""`nomoat chat --server URL`: the terminal chat over a real `nomoat serve` process, checked against openai."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import httpx
import pytest
from typer.testing import CliRunner

from nomoat.cli import app
from nomoat.generate.remote import (
    RemoteChatSession,
    RemoteError,
    normalize_base_url,
    request_body,
    resolve_model,
    sse_data,
)
from nomoat.generate.sampling import SamplingParams
from processes import NomoatServer

from train_utils import make_chat_model, random_adapter

KEY = "test-key-123"
MAX_TOKENS = 10
ANSWER = re.compile(r"bot> (.*?)\n\[(\d+) tokens · ([^·\]]+) · (\w+)\]")
runner = CliRunner()


def start_server(root, api_key: str | None = KEY) -> NomoatServer:
    """`nomoat serve` on a free loopback port with a tiny chat model and one adapter `ad1`, healthy."""
    model_dir = make_chat_model(root / "tiny", seed=0)
    random_adapter(model_dir, root / "ad1", seed=1)
    args = ["serve", str(model_dir), "--adapter", f"ad1={root / 'ad1'}", *(["--api-key", api_key] if api_key else [])]
    return NomoatServer(args, root / "server.log", env={"NOMOAT_HOME": str(root / "home")})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("chat_remote"))
    url = srv.url
    cards = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]
    base = next(c["id"] for c in cards if not c.get("parent"))
    yield url, base
    srv.stop()


def reference(url: str, model: str, messages: list[dict[str, str]]) -> tuple[str, int]:
    """The greedy answer of the official openai client (not streamed), and its completion token count."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    out = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=MAX_TOKENS)
    return out.choices[0].message.content, out.usage.completion_tokens


def _chat(args: list[str], lines: str, env: dict[str, str | None] | None = None):
    env = {"NOMOAT_API_KEY": None, **(env or {})}
    return runner.invoke(app, ["chat", *args, "--temperature", "0", "--max-tokens", str(MAX_TOKENS)], input=lines,
                         env=env)  # fmt: skip


def test_remote_chat_turns_equal_the_openai_client(server):
    url, base = server
    lines = "w5 w77\n/system w9 w10\nw6 \\\nw7\n/bogus\n/reset\nw5 w77\n/exit\n"
    result = _chat(["--server", url, "--api-key", KEY], lines)
    assert result.exit_code == 0, result.output
    answers = ANSWER.findall(result.output)
    assert len(answers) == 3, result.output
    assert "(system prompt set)" in result.output and "(conversation cleared)" in result.output
    assert "unknown command /bogus" in result.output
    first = [{"role": "user", "content": "w5 w77"}]
    a1, n1 = reference(url, base, first)
    second = [{"role": "system", "content": "w9 w10"}, *first, {"role": "assistant", "content": a1},
              {"role": "user", "content": "w6 \nw7"}]  # fmt: skip
    a2, n2 = reference(url, base, second)
    a3, n3 = reference(url, base, [{"role": "system", "content": "w9 w10"}, *first])  # /reset keeps the system prompt
    assert [(text, int(n)) for text, n, _, _ in answers] == [(a1, n1), (a2, n2), (a3, n3)]
    assert a1 and a2 != a3  # the random model says something, and the history changed the second answer
    for _, n, rate, reason in answers:
        assert reason in ("stop", "length")
        assert rate == "-" if int(n) < 2 else re.fullmatch(r"\d+\.\d tok/s ?", rate), rate


def test_remote_chat_picks_adapters_and_stacks(server):
    url, base = server
    messages = [{"role": "user", "content": "w5 w77"}]
    for args, model in [(["ad1"], "ad1"), (["--model", base, "--adapter", "ad1:0.5"], f"{base}+ad1:0.5")]:
        result = _chat(["--server", url, *args], "w5 w77\n", env={"NOMOAT_API_KEY": KEY})
        assert result.exit_code == 0, result.output
        assert f"(model {model} on {url})" in result.output
        (text, n, _, _), *_ = ANSWER.findall(result.output)
        assert (text, int(n)) == reference(url, model, messages)
    assert reference(url, "ad1", messages) != reference(url, base, messages)


def test_remote_chat_as_a_process_with_piped_stdin(server):
    url, base = server
    env = {**os.environ, "NOMOAT_API_KEY": KEY}
    proc = subprocess.run([sys.executable, "-m", "nomoat.cli", "chat", "--server", f"{url}/v1/", "--temperature", "0",
                           "--max-tokens", str(MAX_TOKENS)], input='"""\nw5\nw77\n"""\n', capture_output=True,
                          text=True, env=env, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (text, _, _, _), *_ = ANSWER.findall(proc.stdout)
    assert text == reference(url, base, [{"role": "user", "content": "w5\nw77"}])[0]


def test_remote_chat_errors_are_clear(server):
    url, _ = server
    missing = _chat(["--server", url], "w5\n")
    assert missing.exit_code == 2 and "HTTP 401" in missing.output and "NOMOAT_API_KEY" in missing.output
    wrong = _chat(["--server", url, "--api-key", "nope"], "w5\n")
    assert wrong.exit_code == 2 and "HTTP 401" in wrong.output
    # An unknown model fails its turn (the server answers 404); the conversation goes on.
    unknown = _chat(["--server", url, "--model", "no-such-adapter", "--api-key", KEY], "w5\n/exit\n")
    assert unknown.exit_code == 0 and "(error: HTTP 404" in unknown.output, unknown.output
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    unreachable = _chat(["--server", dead], "w5\n")
    assert unreachable.exit_code == 2 and "cannot reach" in unreachable.output
    nothing = runner.invoke(app, ["chat"])
    assert nothing.exit_code == 2 and "--server" in nothing.output
    both = _chat(["tiny", "--server", url, "--model", "tiny"], "")
    assert both.exit_code == 2 and "once" in both.output


def test_a_failed_or_stopped_turn_leaves_the_history_as_it_was(server):
    url, base = server
    params = SamplingParams(temperature=0, max_new_tokens=MAX_TOKENS)
    with RemoteChatSession(url, params, api_key=KEY) as session:
        assert session.connect() == base
        events = list(session.send("w5 w77"))
        assert session.messages == [{"role": "user", "content": "w5 w77"},
                                    {"role": "assistant", "content": events[-1].text}]  # fmt: skip
        assert "".join(e.text for e in events[:-1]) == events[-1].text
        stream = session.send("w6")
        next(stream)
        stream.close()  # the user stopped reading mid-answer
        assert len(session.messages) == 2
        session.model = "no-such-adapter"
        with pytest.raises(RemoteError, match="404"):
            list(session.send("w7"))
        assert len(session.messages) == 2


def test_sse_parsing_and_request_shape():
    lines = [": comment", 'data: {"a": 1}', "", "event: x", "data: line1", "data:line2", "", "data: [DONE]"]
    assert list(sse_data(lines)) == ['{"a": 1}', "line1\nline2", "[DONE]"]
    for given in ("localhost:8000", "http://localhost:8000/", "http://localhost:8000/v1", "http://localhost:8000/v1/"):
        assert normalize_base_url(given) == "http://localhost:8000"
    body = request_body("m", [], SamplingParams(temperature=0, max_new_tokens=5, seed=3, top_k=4))
    assert body["stream"] and body["max_tokens"] == 5 and body["seed"] == 3 and body["top_k"] == 4
    assert "min_p" not in body and "stop" not in body  # off: not sent, so strict servers accept the request
    cards = [{"id": "ad1", "parent": "tiny"}, {"id": "tiny"}]
    assert resolve_model(cards, None) == "tiny"
    assert resolve_model(cards, "/models/tiny/") == "tiny"
    assert resolve_model(cards, "tiny", ["ad1", "b:0.5"]) == "tiny+ad1:1.0+b:0.5"
    assert resolve_model(cards, "tiny+ad1:0.3") == "tiny+ad1:0.3"


@pytest.mark.parametrize(
    ("events", "message"),
    [
        (['{"id": "x", "choices": [{"index": 0, "delta": {"content": "w5"}}]}'], "early"),  # cut: no finish, no DONE
        (["not json"], "not JSON"),
        (['{"error": {"message": "engine exploded", "type": "server_error"}}'], "engine exploded"),
    ],
)
def test_broken_streams_are_errors(events, message):
    body = "".join(f"data: {e}\n\n" for e in events).encode()
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body))
    session = RemoteChatSession("http://server", SamplingParams(), model="m")
    session._client = httpx.Client(base_url="http://server", transport=transport)
    with pytest.raises(RemoteError, match=message):
        list(session.send("w5"))
    assert session.messages == []
