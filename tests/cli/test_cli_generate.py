"""`nomoat generate` and `nomoat chat` end to end on a tiny model, checked against transformers' greedy output."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from nomoat.cli import app
from nomoat.generate.chat import read_message

from hf_models import make_hf_model, save_word_tokenizer

TEMPLATE = (
    "{% for m in messages %}{{ '<s>' + m['role'] + ' ' + m['content'] + ' </s>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>' }}{% endif %}"
)
runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2")
    hf = make_hf_model("qwen2", path)
    save_word_tokenizer(path, chat_template=TEMPLATE)
    return path, hf


def test_generate_json_equals_transformers_greedy(model_dir):
    path, hf = model_dir
    result = runner.invoke(app, ["generate", str(path), "--prompt", "w5 w77 w300", "--max-tokens", "12", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output.strip().splitlines()[-1])
    hf.generation_config.eos_token_id = 2
    ref = hf.generate(torch.tensor([[5, 77, 300]]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0, 3:].tolist()
    if 2 in ref:  # transformers keeps the end token; nomoat's record ends before it
        ref = ref[: ref.index(2)]
    assert record["token_ids"] == ref
    assert record["finish_reason"] in ("stop", "length") and record["prompt_tokens"] == 3


def test_generate_streams_text_and_validates(model_dir):
    path, _ = model_dir
    ok = runner.invoke(app, ["generate", str(path), "-p", "w5 w6", "--max-tokens", "4", "--temperature", "0.8",
                             "--seed", "3", "--top-k", "20"])
    assert ok.exit_code == 0 and ok.output.startswith("w")
    bad = runner.invoke(app, ["generate", str(path), "-p", "w5", "--top-p", "1.5"])
    assert bad.exit_code == 2 and "top_p" in bad.output
    missing = runner.invoke(app, ["generate", str(path.parent / "nope"), "-p", "w5"])
    assert missing.exit_code == 2 and "not a folder" in missing.output


def test_chat_session_commands(model_dir):
    path, _ = model_dir
    lines = "w5 w6\n/system w9\nw7 \\\nw8\n/bogus\n/reset\n/exit\n"
    result = runner.invoke(app, ["chat", str(path), "--max-tokens", "5", "--temperature", "0"], input=lines)
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.count("bot> ") == 2 and "tok/s" in out
    assert "(system prompt set)" in out and "(conversation cleared)" in out and "unknown command /bogus" in out


def test_chat_history_is_rendered_with_the_template(model_dir):
    import nomoat
    from nomoat.generate.chat import ChatSession
    from nomoat.generate.sampling import SamplingParams

    path, _ = model_dir
    model, tok = nomoat.load(path, dtype="float32", device="cpu")
    system = " ".join(f"w{i}" for i in range(10, 40))
    session = ChatSession(model, tok, SamplingParams(temperature=0, max_new_tokens=4), system=system)
    first = list(session.send("w5"))[-1]
    second = list(session.send("w6"))[-1]
    assert [m["role"] for m in session.conversation()] == ["system", "user", "assistant", "user", "assistant"]
    assert session.messages[1]["content"] == first.text
    # The second turn's prompt starts with the first turn's: the prefix cache serves its whole 16-token blocks.
    assert first.prompt_tokens > 32
    assert second.cached_prompt_tokens == first.prompt_tokens // 16 * 16


def test_read_message_multiline():
    feed = iter(['"""', "a", "b", '"""'])
    assert read_message(lambda _: next(feed)) == "a\nb"
    feed = iter(["x \\", "y"])
    assert read_message(lambda _: next(feed)) == "x \ny"

    def eof(_):
        raise EOFError

    assert read_message(eof) is None


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_generate_quantized(model_dir, mode):
    path, _ = model_dir
    result = runner.invoke(app, ["generate", str(path), "-p", "w5 w77", "--max-tokens", "6", "--json",
                                 "--quantize", mode])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["completion_tokens"] >= 1
    bad = runner.invoke(app, ["generate", str(path), "-p", "w5", "--quantize", "int3"])
    assert bad.exit_code == 2 and "int3" in bad.output
