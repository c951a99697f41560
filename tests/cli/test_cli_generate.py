"""`nomoat generate` and `nomoat chat` end to end on a tiny model, checked against transformers' greedy output."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from nomoat.cli import app
from nomoat.generate.chat import read_message

from hf_models import make_hf_model, save_word_tokenizer
from train_utils import random_adapter

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


# ---- adapters: the engine's bank by default, merged into the base with --merge --------------------------------------


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory):
    path, _ = model_dir
    root = tmp_path_factory.mktemp("adapters")
    return {"a": random_adapter(path, root / "a", seed=1),
            "b": random_adapter(path, root / "b", seed=2, target_modules=["v_proj"]),
            "d": random_adapter(path, root / "d", seed=3, use_dora=True)}  # fmt: skip


def _tokens(path, *args):
    result = runner.invoke(app, ["generate", str(path), "-p", "w5 w77 w300", "--max-tokens", "10", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])["token_ids"]


def _peft_tokens(path, adapter_dir, n=10):
    import peft

    from hf_models import load_hf

    model = peft.PeftModel.from_pretrained(load_hf(path), adapter_dir).eval()
    out = model.generate(torch.tensor([[5, 77, 300]]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                         eos_token_id=2)[0, 3:].tolist()  # fmt: skip
    return out[: out.index(2)] if 2 in out else out


def test_generate_adapter_in_the_bank_equals_merge_and_peft(model_dir, adapters, monkeypatch):
    """The default decodes with the adapter in the engine's bank (nothing is merged); --merge merges first."""
    import nomoat.lora.apply as apply_mod

    path, _ = model_dir
    ref = _peft_tokens(path, adapters["a"])
    assert ref != _tokens(path)  # the adapter changes the output
    merges = []
    real = apply_mod.merge_adapters
    monkeypatch.setattr(apply_mod, "merge_adapters", lambda m, a: merges.append(a) or real(m, a))
    assert _tokens(path, "--adapter", str(adapters["a"])) == ref
    assert merges == []  # the bank applied it
    assert _tokens(path, "--adapter", str(adapters["a"]), "--merge") == ref
    assert merges == [[(adapters["a"], 1.0)]]


def test_generate_stack_bank_equals_merge(model_dir, adapters):
    """A weighted stack, written with + or as repeated options, gives the merged model's greedy tokens."""
    path, _ = model_dir
    a, b = adapters["a"], adapters["b"]
    merged = _tokens(path, "--adapter", f"{a}:0.7", "--adapter", f"{b}:-0.5", "--merge")
    assert merged != _tokens(path, "--adapter", f"{a}:0.7", "--merge")  # the second adapter matters
    assert _tokens(path, "--adapter", f"{a}:0.7+{b}:-0.5") == merged
    assert _tokens(path, "--adapter", f"{a}:0.7", "--adapter", f"{b}:-0.5") == merged
    assert _tokens(path, "--adapter", f"{a}:0") == _tokens(path)  # weight 0 is the base
    assert _tokens(path, "--adapter", "none") == _tokens(path)
    bad = runner.invoke(app, ["generate", str(path), "-p", "w5", "--adapter", f"{a}:x"])
    assert bad.exit_code == 2 and "is not a weight" in bad.output and "write" in bad.output
    twice = runner.invoke(app, ["generate", str(path), "-p", "w5", "--adapter", str(a), "--adapter", str(a)])
    assert twice.exit_code == 2 and "appears twice" in twice.output


def test_generate_dora_adapter_is_merged_with_a_note(model_dir, adapters):
    """The bank cannot apply DoRA per request: the adapters are merged (the note says so), as peft decodes."""
    path, _ = model_dir
    ref = _peft_tokens(path, adapters["d"])
    result = runner.invoke(app, ["generate", str(path), "-p", "w5 w77 w300", "--max-tokens", "10", "--json",
                                 "--adapter", str(adapters["d"])])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "is a DoRA adapter" in result.output and "merging the adapters" in result.output
    assert json.loads(result.output.strip().splitlines()[-1])["token_ids"] == ref
    assert _tokens(path, "--adapter", str(adapters["d"]), "--merge") == ref


def test_generate_quantized_base_with_adapter_in_the_bank(model_dir, adapters):
    path, _ = model_dir
    base = _tokens(path, "--quantize", "int8")
    tuned = _tokens(path, "--quantize", "int8", "--adapter", str(adapters["a"]))
    assert tuned != base and len(tuned) >= 1


def test_chat_with_adapter_bank_equals_merge(model_dir, adapters):
    path, _ = model_dir
    lines = "w5 w6\nw7\n/exit\n"

    def transcript(*args):
        result = runner.invoke(app, ["chat", str(path), "--max-tokens", "6", "--temperature", "0", *args], input=lines)
        assert result.exit_code == 0, result.output
        answers = [part.split("\n[", 1)[0] for part in result.output.split("bot> ")[1:]]
        assert len(answers) == 2
        return answers

    banked = transcript("--adapter", f"{adapters['a']}:0.8")
    assert banked == transcript("--adapter", f"{adapters['a']}:0.8", "--merge")
    assert banked != transcript()


def test_chat_session_runs_its_selection(model_dir, adapters):
    import nomoat
    from nomoat.generate.chat import ChatSession
    from nomoat.generate.engine import Engine
    from nomoat.generate.sampling import SamplingParams
    from nomoat.lora.selection import parse_selection

    path, _ = model_dir
    model, tok = nomoat.load(path, dtype="float32", device="cpu")
    engine = Engine(model, tok, max_running=1, adapters={"a": adapters["a"]})
    params = SamplingParams(temperature=0, max_new_tokens=5)
    tuned = list(ChatSession(model, tok, params, engine=engine, adapter=parse_selection("a")).send("w5"))[-1]
    base = list(ChatSession(model, tok, params, engine=engine).send("w5"))[-1]
    again = list(ChatSession(model, tok, params, engine=engine, adapter=parse_selection("a")).send("w5"))[-1]
    assert tuned.token_ids == again.token_ids != base.token_ids
