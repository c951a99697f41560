"""Tokenizing examples: label masking hand-checked per chat-template family, ids equal to transformers'."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
import torch
from rich.console import Console
from transformers import AutoTokenizer

from nomoat.data import (
    IGNORE_INDEX,
    Conversation,
    DataError,
    NoTrainableTokensError,
    Preference,
    Source,
    Text,
    Tokenized,
    assert_has_labels,
    load_dataset,
    summarize,
    tokenize_dataset,
    tokenize_example,
    tokenize_preference,
)
from nomoat.tokenizer import Tokenizer

from tokenizer_utils import byte_level_bpe, read_template, sentencepiece_bpe, template_meta, write_folder

META = template_meta()
# The template tokens each real tokenizer marks as special (our test BPE learns them as added special tokens).
TEMPLATE_TOKENS = {
    "llama3_1": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "qwen2_5": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
    "mistral_v0_1": [],
    "gemma2": ["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"],
    "phi3": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"],
    "smollm2": ["<|im_start|>", "<|im_end|>"],
}
SYSTEM = {"role": "system", "content": "You are terse."}
TURNS = [
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "It is Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome, of course."},
]
# Hand-written: the exact text of the trained tokens, one string per trained run.
EXPECTED = {
    "llama3_1": ["It is Paris.<|eot_id|>", "Rome, of course.<|eot_id|>"],
    "qwen2_5": ["It is Paris.<|im_end|>", "Rome, of course.<|im_end|>"],
    "mistral_v0_1": [" It is Paris.</s>", " Rome, of course.</s>"],
    "gemma2": ["It is Paris.<end_of_turn>", "Rome, of course.<end_of_turn>"],
    "phi3": ["It is Paris.<|end|>", "Rome, of course.<|end|>"],
    "smollm2": ["It is Paris.<|im_end|>", "Rome, of course.<|im_end|>"],
}
# Hand-written: the masked text of one family, in full.
QWEN_MASKED = [
    "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
    "<|im_start|>assistant\n",
    "\n<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n",
    "\n",
]


def _folder(root: Path, name: str, specials: bool = True, sp: bool = False) -> Path:
    meta = META[name]
    config = {k: meta[k] for k in ("bos_token", "eos_token", "pad_token") if meta.get(k)}
    config["chat_template"] = read_template(name)
    if specials:
        config["additional_special_tokens"] = TEMPLATE_TOKENS[name]
    return write_folder(root / (name + ("" if specials else "_plain") + ("_sp" if sp else "")),
                        sentencepiece_bpe() if sp else byte_level_bpe(), config)


@pytest.fixture(scope="module")
def toks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Tokenizer]:
    root = tmp_path_factory.mktemp("render")
    return {name: Tokenizer.from_dir(_folder(root, name)) for name in META}


def _chat(name: str) -> list[dict[str, str]]:
    return ([SYSTEM] if META[name]["system"] and name != "mistral_v0_1" else []) + TURNS


def runs(tok: Tokenizer, t: Tokenized) -> tuple[list[str], list[str]]:
    """Decode the trained runs and the masked runs of a sequence."""
    trained: list[str] = []
    masked: list[str] = []
    prev = None
    for i, (tid, label) in enumerate(zip(t.input_ids, t.labels)):
        on = label != IGNORE_INDEX
        assert label in (IGNORE_INDEX, tid)
        if on != prev:
            (trained if on else masked).append([])
            prev = on
        (trained if on else masked)[-1].append(tid)
        assert i > 0 or not on
    return [tok.decode(r) for r in trained], [tok.decode(r) for r in masked]


@pytest.mark.parametrize("name", sorted(META))
def test_assistant_masking_per_template(toks: dict[str, Tokenizer], name: str) -> None:
    tok = toks[name]
    (t,) = tokenize_example(Conversation(_chat(name)), tok, max_length=512)
    assert t.input_ids == tok.apply_chat_template(_chat(name), tokenize=True)
    trained, masked = runs(tok, t)
    assert trained == EXPECTED[name]
    # Masked + trained runs, interleaved, give back the whole rendered text: everything else is masked.
    text = "".join(m + (trained[i] if i < len(trained) else "") for i, m in enumerate(masked))
    assert text == tok.apply_chat_template(_chat(name))
    if name == "qwen2_5":
        assert masked == QWEN_MASKED
    assert t.num_label_tokens == sum(len(tok.encode(s, add_special_tokens=False)) for s in trained)


@pytest.mark.parametrize("name", ["qwen2_5", "llama3_1", "gemma2"])
def test_ids_equal_transformers(toks: dict[str, Tokenizer], tmp_path: Path, name: str) -> None:
    hf = AutoTokenizer.from_pretrained(_folder(tmp_path, name))
    (t,) = tokenize_example(Conversation(_chat(name)), toks[name], max_length=512)
    assert t.input_ids == hf.apply_chat_template(_chat(name), tokenize=True, return_dict=False)


def test_train_on_last_and_all(toks: dict[str, Tokenizer]) -> None:
    tok = toks["qwen2_5"]
    (last,) = tokenize_example(Conversation(_chat("qwen2_5")), tok, 512, train_on="last")
    assert runs(tok, last)[0] == ["Rome, of course.<|im_end|>"]
    (every,) = tokenize_example(Conversation(_chat("qwen2_5")), tok, 512, train_on="all")
    assert every.input_ids == last.input_ids
    assert every.labels == [IGNORE_INDEX, *every.input_ids[1:]]
    with pytest.raises(ValueError, match="train_on"):
        tokenize_example(Conversation(TURNS), tok, 512, train_on="assistants")


def test_end_of_turn_without_special_tokens(tmp_path: Path) -> None:
    """Phi-3 with `<|end|>` not marked special: the turn still ends after it (eos stays only on the last turn)."""
    tok = Tokenizer.from_dir(_folder(tmp_path, "phi3", specials=False))
    (t,) = tokenize_example(Conversation(_chat("phi3")), tok, 512)
    assert runs(tok, t)[0] == ["It is Paris.<|end|>", "Rome, of course.<|end|>\n<|endoftext|>"]


def test_sentencepiece_mistral(tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(_folder(tmp_path, "mistral_v0_1", sp=True))
    (t,) = tokenize_example(Conversation(TURNS), tok, 512)
    text = tok.apply_chat_template(TURNS)
    ids, offsets = tok.encode_with_offsets(text)
    assert t.input_ids == ids
    trained = "".join(text[a:b] for (a, b), label in zip(offsets, t.labels) if label != IGNORE_INDEX)
    assert trained == " It is Paris.</s> Rome, of course.</s>"


def test_truncation_and_dropping(toks: dict[str, Tokenizer], caplog: pytest.LogCaptureFixture) -> None:
    tok = toks["qwen2_5"]
    (full,) = tokenize_example(Conversation(_chat("qwen2_5")), tok, 512)
    (cut,) = tokenize_example(Conversation(_chat("qwen2_5")), tok, len(full) - 3)
    assert cut.truncated and not full.truncated
    assert cut.input_ids == full.input_ids[: len(full) - 3] and cut.labels == full.labels[: len(full) - 3]
    # Cut before the first answer: nothing to train; tokenize_dataset drops it with a warning.
    short = len(tok.apply_chat_template(_chat("qwen2_5")[:2], add_generation_prompt=True, tokenize=True))
    (none,) = tokenize_example(Conversation(_chat("qwen2_5"), source=Source("d.jsonl", 7)), tok, short)
    assert none.num_label_tokens == 0
    with caplog.at_level(logging.WARNING):
        kept = tokenize_dataset([Conversation(_chat("qwen2_5"), source=Source("d.jsonl", 7)), Text("hi")], tok, short)
    assert len(kept) == 1 and kept[0].input_ids == tok.encode("hi", add_special_tokens=False) + [tok.eos_token_id]
    assert "dropped" in caplog.text and "d.jsonl" in caplog.text


def test_text_windows(toks: dict[str, Tokenizer]) -> None:
    tok = toks["llama3_1"]
    text = "The quick brown fox jumps over the lazy dog. " * 6
    ids = [tok.bos_token_id, *tok.encode(text, add_special_tokens=False), tok.eos_token_id]
    chunks = tokenize_example(Text(text), tok, max_length=16)
    assert [i for c in chunks for i in c.input_ids] == ids
    assert all(len(c) <= 16 for c in chunks) and len(chunks) == -(-len(ids) // 16)
    for c in chunks:
        assert c.labels == [IGNORE_INDEX, *c.input_ids[1:]] and not c.truncated
    (whole,) = tokenize_example(Text("hello"), tok, max_length=64, add_eos=False)
    assert whole.input_ids[-1] != tok.eos_token_id and whole.input_ids[0] == tok.bos_token_id


def test_default_template_when_none(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tok = Tokenizer.from_dir(write_folder(tmp_path / "bare", byte_level_bpe(), {"eos_token": "</s>"}))
    with caplog.at_level(logging.WARNING):
        (t,) = tokenize_example(Conversation(TURNS), tok, 512)
    assert "no chat template" in caplog.text
    assert tok.decode(t.input_ids).startswith("<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n")
    # ChatML's end-of-turn is trained, and an eos is appended so the model learns to stop.
    assert runs(tok, t)[0] == ["It is Paris.<|im_end|>", "Rome, of course.<|im_end|>", "</s>"]


def test_template_errors(toks: dict[str, Tokenizer]) -> None:
    with pytest.raises(DataError, match=r"d\.jsonl:3: the chat template rejected this conversation: System role"):
        tokenize_example(Conversation([SYSTEM, *TURNS], source=Source("d.jsonl", 3)), toks["gemma2"], 512)
    odd = "{% for m in messages %}{{ m.content }}|{% endfor %}{% if add_generation_prompt %}GO:{% endif %}"
    with pytest.raises(DataError, match="does not render the conversation up to assistant turn 1 as a prefix"):
        tokenize_example(Conversation(TURNS), toks["qwen2_5"], 512, chat_template=odd)
    with pytest.raises(DataError, match="tokenize_preference"):
        tokenize_example(Preference(TURNS[:1], TURNS[1:2], TURNS[3:4]), toks["qwen2_5"], 512)


def test_preference(toks: dict[str, Tokenizer]) -> None:
    tok = toks["llama3_1"]
    # The prompt has an earlier assistant turn: only the answers are trained.
    pair = Preference(TURNS[:3], [{"role": "assistant", "content": "Rome."}], [{"role": "assistant", "content": "No."}])
    chosen, rejected = tokenize_preference(pair, tok, 512)
    assert runs(tok, chosen)[0] == ["Rome.<|eot_id|>"] and runs(tok, rejected)[0] == ["No.<|eot_id|>"]


def test_assert_has_labels() -> None:
    labels = torch.full((2, 5), IGNORE_INDEX)
    labels[1, 0] = 7  # the first position is never a target
    with pytest.raises(NoTrainableTokensError, match="max_length"):
        assert_has_labels({"labels": labels})
    with pytest.raises(DataError):
        assert_has_labels({"labels": labels, "num_label_tokens": 0})
    labels[1, 3] = 7
    assert_has_labels({"labels": labels})


def test_summary(tmp_path: Path, toks: dict[str, Tokenizer]) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "Capital of France?", "output": "It is Paris."}\n'
                    '{"instruction": "' + "word " * 100 + '", "output": "Yes."}\n')
    ds = load_dataset(path)
    tok = toks["qwen2_5"]
    n = len(tokenize_example(ds.examples[0], tok, 1000)[0]) + 4
    seqs = [t for e in ds.examples for t in tokenize_example(e, tok, n)]
    s = summarize(ds, seqs, n)
    assert (s.examples, s.sequences, s.dropped, s.truncated) == (2, 1, 1, 0)
    assert s.tokens == len(seqs[0]) == s.min_length == s.max_length
    assert s.trainable_tokens == seqs[0].num_label_tokens
    assert sum(c for _, _, c in s.histogram) == 1 and s.histogram[-1][1] > n
    d = s.to_dict()
    assert d["files"][0]["records"] == 2 and d["format"] == "alpaca"
    out = io.StringIO()
    s.render(Console(file=out, width=100))
    assert "trainable tokens" in out.getvalue() and "█" in out.getvalue()
