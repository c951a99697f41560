"""`nomoat eval`: perplexity, multiple choice and task accuracy against hand-computed values and transformers/peft."""

from __future__ import annotations

import json
import math

import peft
import pytest
import torch
from typer.testing import CliRunner

from nomoat.cli import app
from nomoat.data import IGNORE_INDEX, Conversation, DataError, Text, tokenize_example
from nomoat.eval import (
    Columns,
    choice_sequences,
    compare,
    evaluate_perplexity,
    evaluate_tasks,
    load_task_items,
    parse_item,
    perplexity,
    score_answer,
    score_sequences,
)
from nomoat.lora import LoRAConfig, inject_lora
from nomoat.models.checkpoint import load_model
from nomoat.tokenizer import Tokenizer

from hf_models import VOCAB, load_hf, make_hf_model, save_word_tokenizer
from train_utils import make_chat_model, random_adapter

runner = CliRunner()


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A tiny llama with a word tokenizer and no chat template, a LoRA adapter and a DoRA adapter."""
    root = tmp_path_factory.mktemp("plain")
    model_dir = root / "model"
    make_hf_model("llama3", model_dir)
    save_word_tokenizer(model_dir)
    _adapter(model_dir, root / "a", seed=1)
    _adapter(model_dir, root / "d", seed=2, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])
    return model_dir, root


def _load(model_dir):
    return load_model(model_dir, dtype=torch.float32, device="cpu"), Tokenizer.from_dir(model_dir)


def _hf_sum_logprob(hf, ids: list[int], labels: list[int]) -> tuple[float, int]:
    """Reference: sum of log p(labels[t] | ids[:t]) over labelled t, from transformers' logits."""
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), dim=-1)
    picked = [(t, label) for t, label in enumerate(labels) if t > 0 and label != IGNORE_INDEX]
    return sum(float(logp[t - 1, label]) for t, label in picked), len(picked)


# ---- perplexity ------------------------------------------------------------------------------------------------


def test_uniform_model_has_perplexity_vocab_size(plain):
    model, tok = _load(plain[0])
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: the next-token distribution is uniform over the vocabulary
    result = perplexity(model, ["w5 w6 w7 w8", "w9 w10"], tok)
    assert result.tokens == (4 + 2 - 1) + (2 + 2 - 1)  # bos + words + eos, the first token only context
    assert result.nll == pytest.approx(math.log(VOCAB), rel=1e-6)
    assert result.perplexity == pytest.approx(VOCAB, rel=1e-5)


def test_text_perplexity_equals_transformers_loss(plain):
    """Token-weighted NLL over texts of different lengths (padded batches, windows) = transformers' loss."""
    model_dir, _ = plain
    model, tok = _load(model_dir)
    hf = load_hf(model_dir)
    texts = [" ".join(f"w{10 + (i * 7 + j * 13) % 400}" for j in range(n)) for i, n in enumerate([3, 17, 9, 30])]
    max_length = 12  # the 30-word text (32 tokens) is cut into windows of 12, 12 and 8 tokens
    total, count = 0.0, 0
    for text in texts:
        ids = [1, *tok.encode(text, add_special_tokens=False), 2]
        for start in range(0, len(ids), max_length):
            window = torch.tensor([ids[start : start + max_length]])
            with torch.no_grad():
                loss = hf(window, labels=window).loss  # mean over the window's len - 1 predicted tokens
            total += float(loss) * (window.shape[1] - 1)
            count += window.shape[1] - 1
    for budget in (16, 4096):  # one sequence per forward pass, and everything padded into one batch
        result = perplexity(model, texts, tok, max_length=max_length, max_batch_tokens=budget)
        assert result.tokens == count and result.sequences == 1 + 2 + 1 + 3
        assert result.nll == pytest.approx(total / count, rel=1e-5)


def test_chat_perplexity_scores_only_assistant_tokens(tmp_path):
    model_dir = make_chat_model(tmp_path / "chat")
    model, tok = _load(model_dir)
    hf = load_hf(model_dir)
    convs = [
        Conversation([{"role": "user", "content": "w10 w11"}, {"role": "assistant", "content": "w12 w13 w14"}]),
        Conversation([{"role": "system", "content": "w20"}, {"role": "user", "content": "w21"},
                      {"role": "assistant", "content": "w22"}, {"role": "user", "content": "w23 w24"},
                      {"role": "assistant", "content": "w25 w26"}]),
    ]  # fmt: skip
    result = perplexity(model, convs, tok)
    assert result.tokens == (3 + 1) + (1 + 1) + (2 + 1)  # each assistant answer and its </s>
    # Reference: transformers on the ids and labels of the data module (the tokens training puts a loss on).
    ref = [_hf_sum_logprob(hf, t.input_ids, t.labels) for c in convs for t in tokenize_example(c, tok, 128)]
    assert sum(n for _, n in ref) == result.tokens
    assert result.nll == pytest.approx(-sum(s for s, _ in ref) / result.tokens, rel=1e-5)


def test_perplexity_with_adapters_equals_peft(plain):
    model_dir, root = plain
    model, tok = _load(model_dir)
    texts = ["w5 w6 w7 w8 w9 w10 w11", "w40 w41 w42"]
    results = evaluate_perplexity(model, tok, texts, adapters={"a": root / "a", "d": root / "d"})
    assert list(results) == ["base", "a", "d"]
    assert len({results[name].nll for name in results}) == 3  # the adapters matter
    for name in ("base", "a", "d"):
        hf = load_hf(model_dir)
        ref_model = peft.PeftModel.from_pretrained(hf, root / name).eval() if name != "base" else hf
        ref = [_hf_sum_logprob(ref_model, ids, ids) for ids in ([1, *tok.encode(t, False), 2] for t in texts)]
        assert results[name].nll == pytest.approx(-sum(s for s, _ in ref) / sum(n for _, n in ref), rel=1e-5)
    # The merged DoRA adapter was taken back out exactly, and the model comes back with plain layers (no bank
    # wrappers): the base scores as before and an adapter can be injected for training.
    assert perplexity(model, texts, tok).nll == results["base"].nll
    assert {type(m).__name__ for m in model.modules()} == {type(m).__name__ for m in _load(model_dir)[0].modules()}
    inject_lora(model, LoRAConfig(r=2, alpha=4))


# ---- multiple choice -------------------------------------------------------------------------------------------


def test_choice_on_uniform_model_acc_and_acc_norm_by_hand(plain):
    """Uniform model: a choice of n tokens has log-likelihood -n log V; acc prefers short, acc_norm per character."""
    model, tok = _load(plain[0])
    with torch.no_grad():
        model.lm_head.weight.zero_()
    item = {"prompt": "w5 w6", "choices": ["w7", "w10 w11 w12"], "answer": 1}
    result = evaluate_tasks(model, tok, [item])
    logprobs = result.items[0].logprobs["base"]
    assert logprobs == pytest.approx([-math.log(VOCAB), -3 * math.log(VOCAB)], rel=1e-6)
    # acc: -1 log V > -3 log V picks "w7" (wrong); acc_norm: -log V / 2 < -3 log V / 11 picks "w10 w11 w12" (right).
    assert result.items[0].predictions["base"] == "w7"
    assert result.metrics["acc"]["base"] == 0.0 and result.metrics["acc_norm"]["base"] == 1.0


def test_choice_loglik_equals_transformers(plain):
    model_dir, root = plain
    model, tok = _load(model_dir)
    item = parse_item({"prompt": "w5 w6 w7", "choices": ["w8", "w9 w30", "w31 w32 w33"], "answer": "w9 w30"})
    assert item.answer == 1
    seqs = choice_sequences(item, tok)
    # Hand-made: the prompt as context (this tokenizer adds no bos), the choice's words (after " ") as labels.
    assert seqs[1] == ([5, 6, 7, 9, 30], [IGNORE_INDEX] * 3 + [9, 30])
    result = evaluate_tasks(model, tok, [item], adapters={"a": root / "a"})
    for name in ("base", "a"):
        hf = load_hf(model_dir)
        ref_model = peft.PeftModel.from_pretrained(hf, root / name).eval() if name != "base" else hf
        ref = [_hf_sum_logprob(ref_model, [5, 6, 7, *c], [IGNORE_INDEX] * 3 + c) for c in ([8], [9, 30], [31, 32, 33])]
        assert result.items[0].logprobs[name] == pytest.approx([s for s, _ in ref], rel=1e-5, abs=1e-5)
        best = max(range(3), key=lambda k: ref[k][0])
        assert result.items[0].correct[name] == (best == 1)


def test_score_sequences_ignores_padding_and_order(plain):
    model, _ = _load(plain[0])
    seqs = [([1, 5, 6, 7, 8, 9], [IGNORE_INDEX, 5, 6, 7, 8, 9]), ([1, 40], [IGNORE_INDEX, 40]),
            ([1, 3, 4], [IGNORE_INDEX, IGNORE_INDEX, 4])]  # fmt: skip
    together = score_sequences(model, seqs, max_batch_tokens=4096)
    alone = [score_sequences(model, [s])[0] for s in seqs]
    assert [n for _, n in together] == [5, 1, 1]
    for (a, _), (b, _) in zip(together, alone):
        assert a == pytest.approx(b, abs=1e-4)


# ---- answer matching -------------------------------------------------------------------------------------------


def test_score_answer_modes():
    assert score_answer("  Paris\n", "Paris")  # exact compares after stripping
    assert not score_answer("paris", "Paris")  # ... and is case-sensitive
    assert score_answer("paris", "Paris", ignore_case=True)
    assert not score_answer("Paris, France", "Paris")
    assert score_answer("It is Paris, France", "Paris", "contains")
    assert not score_answer("It is PARIS", "Paris", "contains")
    assert score_answer("It is PARIS", " paris ", "contains", ignore_case=True)
    assert score_answer("The answer is 42.", r"\b42\b", "regex")
    assert not score_answer("The answer is 420.", r"\b42\b", "regex")
    assert score_answer("  42  ", r"^42$", "regex")  # the prediction is stripped before searching
    assert score_answer("YES", r"^yes$", "regex", ignore_case=True)
    # extract: the first group that matched (or the whole match) replaces the prediction before matching
    assert score_answer("Reasoning... The answer is 17. Done", "17", extract=r"answer is (\d+)")
    assert score_answer("so: x=3", "x=3", extract=r"x=\d")  # no group: the whole match
    assert score_answer("B", "B", extract=r"answer is (\d+)|^([A-D])$")  # the first group that took part
    assert not score_answer("no number here", "17", extract=r"answer is (\d+)")
    with pytest.raises(ValueError, match="match must be one of"):
        score_answer("a", "a", "fuzzy")


# ---- generation tasks ------------------------------------------------------------------------------------------


def _hf_greedy_texts(model_dir, adapter_dir, prompts: list[list[int]], tok: Tokenizer, n: int) -> list[str]:
    """Reference: transformers' greedy decoding (with the adapter through peft), decoded as the engine does."""
    hf = load_hf(model_dir)
    model = peft.PeftModel.from_pretrained(hf, adapter_dir).eval() if adapter_dir else hf
    return [_greedy(model, ids, tok, n) for ids in prompts]


def _greedy(model, prompt_ids: list[int], tok: Tokenizer, n: int) -> str:
    out = model.generate(input_ids=torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                         eos_token_id=2)  # fmt: skip
    return tok.decode(out[0, len(prompt_ids) :].tolist(), skip_special_tokens=True)


def test_tasks_with_adapters_match_transformers_and_peft(plain):
    model_dir, root = plain
    model, tok = _load(model_dir)
    prompts = ["w5 w17 w99 w3", "w250 w8 w41", "w77 w12 w6 w300 w9"]
    n = 5
    ids = [tok.encode(p) for p in prompts]
    ref = {name: _hf_greedy_texts(model_dir, None if name == "base" else root / name, ids, tok, n)
           for name in ("base", "a", "d")}  # fmt: skip
    assert ref["a"] != ref["base"] and ref["d"] != ref["base"] and ref["d"] != ref["a"]  # the adapters matter
    # Answers are the LoRA adapter's greedy outputs: it scores 1.0; the others score where they agree with it.
    items = [{"prompt": p, "answer": ref["a"][i]} for i, p in enumerate(prompts)]
    items.append({"prompt": prompts[0], "answer": "w-never", "match": "contains"})  # nobody produces this
    result = evaluate_tasks(model, tok, items, adapters={"a": root / "a", "d": root / "d"}, max_new_tokens=n)
    assert result.columns == ["base", "a", "d"]
    for name in ("base", "a", "d"):
        assert [r.predictions[name] for r in result.items[:3]] == ref[name]
        expected = sum(ref[name][i].strip() == ref["a"][i].strip() for i in range(3)) / 4
        assert result.accuracy[name] == pytest.approx(expected)
    assert result.accuracy["a"] == 0.75 and result.metrics["acc"]["a"] is None
    record = result.to_dict()["items"][0]
    assert record["predictions"]["a"] == ref["a"][0] and record["correct"]["a"] is True


def test_chat_prompts_system_and_multi_turn(tmp_path):
    """Items are rendered with the chat template and a generation prompt; the engine continues that exact text."""
    model_dir = make_chat_model(tmp_path / "chat")
    model, tok = _load(model_dir)
    items = [{"prompt": "w10 w11", "answer": "x"},
             {"messages": [{"role": "user", "content": "w12"}, {"role": "assistant", "content": "w13"}],
              "prompt": "w14", "answer": "x", "system": "w15"}]  # fmt: skip
    result = evaluate_tasks(model, tok, items, system="w16", max_new_tokens=4)
    expected = ["w5 w16 w3 w10 w11 w4", "w5 w15 w3 w12 w4 w13 </s> w3 w14 w4"]  # the item's system wins
    ref = _hf_greedy_texts(model_dir, None, [tok.encode(t, add_special_tokens=False) for t in expected], tok, 4)
    assert [item.predictions["base"] for item in result.items] == ref


# ---- files, CLI and errors -------------------------------------------------------------------------------------


def _write(path, lines) -> str:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return str(path)


def test_file_defaults_line_sets_match_mode(tmp_path):
    f = _write(tmp_path / "t.jsonl", [{"match": "contains", "ignore_case": True},
                                      {"prompt": "q1", "answer": "A"},
                                      {"prompt": "q2", "answer": "^b$", "match": "regex"}])  # fmt: skip
    items = load_task_items(f)
    assert [(i.match, i.ignore_case, str(i.source)) for i in items] == [
        ("contains", True, "t.jsonl:2"), ("regex", True, "t.jsonl:3")]  # fmt: skip
    assert load_task_items(f, limit=1)[0].prompt == "q1"


def test_bad_task_data_is_reported_with_file_and_line(tmp_path):
    f = _write(tmp_path / "bad.jsonl", [
        {"prompt": "ok", "answer": "x"},
        {"prompt": "no answer"},
        {"prompt": "q", "answer": "(unclosed", "match": "regex"},
        {"prompt": "q", "choices": ["a", "b"], "answer": 2},
        "{not json",
        {"prompt": "q", "answer": "x", "match": "fuzzy"},
        {"answer": "x"},
    ])  # fmt: skip
    with pytest.raises(DataError) as info:
        load_task_items(f)
    errors = info.value.errors
    assert len(errors) == 6
    assert errors[0].startswith('bad.jsonl:2: field "answer" is missing. Add the expected answer')
    assert errors[1].startswith('bad.jsonl:3: field "answer" is not a valid regular expression')
    assert errors[2].startswith('bad.jsonl:4: field "answer" is 2, but there are 2 choices (indices 0 to 1)')
    assert errors[3].startswith("bad.jsonl:5: not valid JSON")
    assert errors[4] == "bad.jsonl:6: field \"match\" is 'fuzzy'; use one of exact, contains, regex"
    assert errors[5].startswith('bad.jsonl:7: field "prompt" is missing (found keys: answer). Each item needs')


def test_cli_eval_writes_table_json_and_png(plain, tmp_path):
    model_dir, root = plain
    tasks = _write(tmp_path / "qa.jsonl", [{"prompt": "w5 w17 w99", "answer": "w1000"},
                                           {"prompt": "w7", "answer": "w", "match": "contains"}])  # fmt: skip
    choice = _write(tmp_path / "mc.jsonl", [{"prompt": "w5 w6", "choices": ["w7", "w8 w9"], "answer": 0}])
    text = _write(tmp_path / "val.jsonl", [{"text": "w5 w6 w7 w8"}, {"text": "w9 w10 w11"}, {"text": "w12 w13"}])
    out, png = tmp_path / "out" / "eval.json", tmp_path / "eval.png"
    args = ["eval", str(model_dir), "--adapter", f"{root / 'a'}:0.5", "--adapter", str(root / "d"), "--data", tasks,
            "--data", choice, "--data", text, "--limit", "2", "--max-tokens", "3", "--json", str(out), "--plot",
            str(png), "--no-progress"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.output and "base" in result.output
    report = json.loads(out.read_text())
    assert report["columns"] == ["base", "a:0.5", "d"]
    rows = {(r["data"], r["metric"]): r for r in report["results"]}
    assert set(rows) == {("qa.jsonl", "accuracy"), ("mc.jsonl", "acc"), ("mc.jsonl", "acc_norm"),
                         ("val.jsonl", "perplexity")}  # fmt: skip
    assert rows[("qa.jsonl", "accuracy")]["values"]["base"] == 0.5  # any output contains "w"; none is "w1000"
    assert rows[("qa.jsonl", "accuracy")]["n"] == 2 and rows[("val.jsonl", "perplexity")]["n"] == 5 + 4
    # The CLI's numbers are the API's: perplexity of the first two texts (--limit 2) with each column.
    model, tok = _load(model_dir)
    api = evaluate_perplexity(model, tok, [Text("w5 w6 w7 w8"), Text("w9 w10 w11")],
                              adapters={"a:0.5": (root / "a", 0.5), "d": root / "d"})  # fmt: skip
    for name, value in rows[("val.jsonl", "perplexity")]["values"].items():
        assert value == pytest.approx(api[name].perplexity, rel=1e-5)
    assert len(report["details"]["qa.jsonl"]) == 2 and report["details"]["qa.jsonl"][0]["source"] == "qa.jsonl:1"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_cli_eval_errors(plain, tmp_path):
    model_dir, root = plain
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "q", "answer": "x"}, {"prompt": "q", "choices": "ab",
                                                                           "answer": 0}])  # fmt: skip
    result = runner.invoke(app, ["eval", str(model_dir), "--data", bad, "--no-progress"])
    assert result.exit_code == 2
    assert 'bad.jsonl:2: field "choices" must be a list of at least two non-empty strings' in result.output
    result = runner.invoke(app, ["eval", str(model_dir), "--data", bad, "--adapter", "no-such-adapter"])
    assert result.exit_code == 2 and "adapter 'no-such-adapter' not found" in result.output
    result = runner.invoke(app, ["eval", str(model_dir), "--data", str(tmp_path / "missing.jsonl")])
    assert result.exit_code == 2 and "missing.jsonl: file not found" in result.output
    text = _write(tmp_path / "t.jsonl", [{"text": "w5"}])
    result = runner.invoke(app, ["eval", str(model_dir), "--data", text, "--adapter", f"{root / 'd'}:0.5"])
    assert result.exit_code == 2 and "a DoRA adapter cannot be weighted" in result.output
    result = runner.invoke(app, ["eval", str(model_dir), "--data", text, "--kind", "choice", "--no-progress"])
    assert result.exit_code == 2 and 't.jsonl:1: field "prompt" is missing' in result.output


def test_columns_reject_an_adapter_named_base(plain):
    model, tok = _load(plain[0])
    with pytest.raises(ValueError, match="cannot be named 'base'"):
        Columns(model, tok, {"base": plain[1] / "a"})
    with pytest.raises(ValueError, match="kind must be one of"):
        compare(model, tok, [], kind="vibes")


def test_cli_eval_registry_adapter_is_a_column(plain, tmp_path, monkeypatch):
    from nomoat.lora.registry import Registry

    model_dir, root = plain
    monkeypatch.setenv("NOMOAT_HOME", str(tmp_path / "home"))
    Registry().import_adapter(root / "a", name="sql")
    choice = _write(tmp_path / "mc.jsonl", [{"prompt": "w5 w6", "choices": ["w7", "w8 w9"], "answer": 0}])
    out = tmp_path / "r.json"
    args = ["eval", str(model_dir), "--adapter", "sql", "--data", choice, "--json", str(out), "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["columns"] == ["base", "sql"] and report["adapters"]["sql"]["weight"] == 1.0
    # The registry copy scores as the folder it came from.
    model, tok = _load(model_dir)
    api = evaluate_tasks(model, tok, [{"prompt": "w5 w6", "choices": ["w7", "w8 w9"], "answer": 0}], {"a": root / "a"})
    assert report["details"]["mc.jsonl"][0]["logprobs"]["sql"] == pytest.approx(api.items[0].logprobs["a"], abs=1e-6)


def test_adapters_are_never_merged_unless_asked(plain, tmp_path, monkeypatch):
    """By default plain adapters decode from the engine's bank, DoRA in LoRA layers, and scoring runs LoRA layers:
    nothing is merged. `merge=True` (`--merge`) merges each adapter in its turn, with the same results."""
    import nomoat.eval.columns as columns_mod

    model_dir, root = plain
    model, tok = _load(model_dir)
    tasks = _write(tmp_path / "qa.jsonl", [{"prompt": "w5 w17 w99", "answer": "w1"},
                                           {"prompt": "w7 w8", "answer": "x"}])  # fmt: skip
    choice = _write(tmp_path / "mc.jsonl", [{"prompt": "w5 w6", "choices": ["w7", "w8 w9"], "answer": 0}])
    text = _write(tmp_path / "val.jsonl", [{"text": "w5 w6 w7 w8"}, {"text": "w9 w10 w11"}])
    specs = {"a": (root / "a", 0.5), "d": root / "d"}
    merges = []
    real = columns_mod.merge_adapters
    monkeypatch.setattr(columns_mod, "merge_adapters", lambda m, a: merges.append(a) or real(m, a))
    banked = compare(model, tok, [tasks, choice, text], specs, max_new_tokens=4)
    assert merges == []
    merged = compare(model, tok, [tasks, choice, text], specs, max_new_tokens=4, merge=True)
    assert len(merges) == 2 * 3  # each adapter, once per file
    for a, b in zip(banked.rows, merged.rows):
        assert (a.data, a.metric) == (b.data, b.metric)
        for name in ("base", "a", "d"):
            assert a.values[name] == pytest.approx(b.values[name], rel=1e-5), (a.metric, name)
    assert banked.details["qa.jsonl"][0]["predictions"] == merged.details["qa.jsonl"][0]["predictions"]
    assert perplexity(model, ["w5 w6 w7 w8", "w9 w10 w11"], tok).perplexity == banked.rows[-1].values["base"]
    result = runner.invoke(app, ["eval", str(model_dir), "--adapter", str(root / "a"), "--merge", "--data", text,
                                 "--no-progress"])  # fmt: skip
    assert result.exit_code == 0, result.output
    stack = runner.invoke(app, ["eval", str(model_dir), "--adapter", f"{root / 'a'}+{root / 'd'}", "--data", text])
    assert stack.exit_code == 2 and "a stack; give one adapter here" in stack.output


def test_fully_trained_module_adapter_scores_as_peft_and_leaves_the_base(plain, tmp_path):
    """An adapter with `modules_to_save` (lm_head trained fully) is scored in LoRA layers, as peft scores it, and
    the model's own lm_head comes back unchanged (merged or not)."""
    model_dir, _ = plain
    _adapter(model_dir, tmp_path / "m", seed=4, modules_to_save=["lm_head"])
    with torch.no_grad():  # give the fully trained lm_head different values, so that it matters
        from safetensors.torch import load_file, save_file

        tensors = load_file(tmp_path / "m" / "adapter_model.safetensors")
        for key in tensors:
            if "lm_head" in key:
                tensors[key] = tensors[key] + 0.05 * torch.randn(tensors[key].shape,
                                                                 generator=torch.Generator().manual_seed(5))
        save_file(tensors, tmp_path / "m" / "adapter_model.safetensors", metadata={"format": "pt"})
    model, tok = _load(model_dir)
    head = model.lm_head.weight.detach().clone()
    texts = ["w5 w6 w7 w8 w9", "w40 w41 w42"]
    layers = evaluate_perplexity(model, tok, texts, adapters={"m": tmp_path / "m"})
    merged = evaluate_perplexity(model, tok, texts, adapters={"m": tmp_path / "m"}, merge=True)
    assert torch.equal(model.lm_head.weight, head)
    ref_model = peft.PeftModel.from_pretrained(load_hf(model_dir), tmp_path / "m").eval()
    ref = [_hf_sum_logprob(ref_model, ids, ids) for ids in ([1, *tok.encode(t, False), 2] for t in texts)]
    expected = -sum(s for s, _ in ref) / sum(n for _, n in ref)
    assert layers["m"].nll == pytest.approx(expected, rel=1e-5) and merged["m"].nll == pytest.approx(expected, rel=1e-5)
    assert layers["m"].nll != layers["base"].nll
    assert perplexity(model, texts, tok).nll == layers["base"].nll


def _adapter(model_dir, out, seed: int, **cfg):  # noqa: ANN001, ANN003, ANN202
    return random_adapter(model_dir, out, seed, scale=0.4, **cfg)
