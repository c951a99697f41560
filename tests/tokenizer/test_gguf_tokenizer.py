"""Tokenizers rebuilt from GGUF metadata encode and decode as the tokenizer.json they were written from."""

from __future__ import annotations

from pathlib import Path

import pytest

from gguf_cases import CASES, build
from nomoat.export.gguf import export_gguf
from nomoat.tokenizer import Tokenizer

from tokenizer_utils import CORPUS, TEXTS

CHAT = [
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "<s>[INST] What is 2+2? [/INST] 4</s>",
    "def f(x: int) -> int:\n\treturn x ** 2  # square\n\n\nprint(f(12345))",
    "  multiple   spaces\tand\ttabs\r\nwindows lines",
    "emoji 🙂👍🏽 and CJK 日本語のテキスト 한국어",
    "numbers 1 12 123 1234 12345 3.14159 1e-10",
    "</s><s> specials inside text <pad>",
]
STRINGS = [t for t in TEXTS if t] + CORPUS + CHAT


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, Tokenizer]:
    root = tmp_path_factory.mktemp(request.param)
    model_dir, _ = build(root, request.param)
    out = export_gguf(model_dir, [], root / f"{request.param}.gguf", outtype="f32")
    return Tokenizer.from_dir(model_dir), Tokenizer.from_dir(out)


def test_encode_decode_equal_to_source(pair: tuple[Tokenizer, Tokenizer]) -> None:
    ref, ours = pair
    assert len(STRINGS) >= 30
    for text in STRINGS:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == ref.encode(text, add_special_tokens=special), text
        ids = ref.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == ref.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), text


def test_specials_and_chat_template(pair: tuple[Tokenizer, Tokenizer]) -> None:
    ref, ours = pair
    assert (ours.bos_token_id, ours.eos_token_id) == (ref.bos_token_id, ref.eos_token_id)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert ours.apply_chat_template(messages, tokenize=False) == ref.apply_chat_template(messages, tokenize=False)


def test_saved_as_a_folder_reads_back_in_nomoat_and_transformers(pair, tmp_path: Path) -> None:  # noqa: ANN001
    """A GGUF file's tokenizer written as Hugging Face files (what exporting a GGUF base writes) loses nothing."""
    transformers = pytest.importorskip("transformers")
    ref, ours = pair
    ours.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in STRINGS:
        for special in (True, False):
            expected = ref.encode(text, add_special_tokens=special)
            assert again.encode(text, add_special_tokens=special) == expected, text
            assert hf(text, add_special_tokens=special)["input_ids"] == expected, text
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    rendered = ref.apply_chat_template(messages, tokenize=False)
    assert again.apply_chat_template(messages, tokenize=False) == rendered
    assert hf.apply_chat_template(messages, tokenize=False) == rendered
    assert (again.bos_token_id, again.eos_token_id) == (ref.bos_token_id, ref.eos_token_id)


def test_matches_transformers_gguf_tokenizer(tmp_path: Path) -> None:
    """transformers' own GGUF tokenizer (for the GPT-2 pre-tokenizer it implements) encodes the same ids."""
    transformers = pytest.importorskip("transformers")
    model_dir, _ = build(tmp_path, "llama_bias")
    out = export_gguf(model_dir, [], tmp_path / "m.gguf", outtype="f32")
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    ours = Tokenizer.from_dir(out)
    for text in STRINGS:
        assert ours.encode(text) == ref(text)["input_ids"], text
