"""Tokenizer loading, special tokens, encode and decode, compared with transformers on the same folders."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from nomoat.tokenizer import Tokenizer, TokenizerNotFoundError

from tokenizer_utils import CORPUS, TEXTS, byte_level_bpe, sentencepiece_bpe, write_folder

KINDS = ["byte_level", "sentencepiece", "sentencepiece_legacy"]
CONFIG = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "clean_up_tokenization_spaces": False}


def _backend(kind: str) -> BackendTokenizer:
    return {"byte_level": byte_level_bpe, "sentencepiece": sentencepiece_bpe,
            "sentencepiece_legacy": lambda: sentencepiece_bpe(legacy=True)}[kind]()


@pytest.fixture(scope="module", params=KINDS)
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, object]:
    kind = request.param
    config = {**CONFIG, "pad_token": "<pad>"} if kind == "byte_level" else CONFIG
    folder = write_folder(tmp_path_factory.mktemp(kind), _backend(kind), config, {"eos_token_id": [2, 7, 2, 9]})
    return Tokenizer.from_dir(folder), AutoTokenizer.from_pretrained(folder)


def test_encode_matches_transformers(pair: tuple[Tokenizer, object]) -> None:
    ours, hf = pair
    texts = [*TEXTS, *CORPUS, "".join(CORPUS)]
    for text in texts:
        for add in (True, False):
            assert ours.encode(text, add_special_tokens=add) == hf.encode(text, add_special_tokens=add), text
    assert ours.encode_batch(texts) == hf(texts)["input_ids"]
    assert ours.encode_batch(texts, add_special_tokens=False) == hf(texts, add_special_tokens=False)["input_ids"]


def test_multibyte_characters_are_split(pair: tuple[Tokenizer, object]) -> None:
    # The point of these tokenizers: some characters span several tokens, which decoding must reassemble.
    ours, _ = pair
    encoding = ours.backend.encode("東京 🎉")
    if ours.id_to_token(3) == "<0x00>":
        assert "<0xF0>" in encoding.tokens and "<0xE6>" in encoding.tokens  # outside the vocab: byte fallback
    assert any("\ufffd" in ours.decode([i]) for i in encoding.ids)  # a token holding part of a character


def test_decode_matches_transformers(pair: tuple[Tokenizer, object]) -> None:
    ours, hf = pair
    for text in [*TEXTS, *CORPUS]:
        ids = hf.encode(text)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    rng = random.Random(0)
    special = ours.all_special_ids
    for _ in range(300):
        ids = [rng.choice(special) if rng.random() < 0.1 else rng.randrange(len(ours))
               for _ in range(rng.randrange(30))]
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), ids
    assert ours.decode(ids[0] if ids else 0) == hf.decode(ids[0] if ids else 0)


def test_round_trip_text(pair: tuple[Tokenizer, object]) -> None:
    ours, _ = pair
    for text in [*CORPUS, "Ünïcödé 🎉 東京  spaces\n\ttabs"]:
        if ours.id_to_token(3) == "<0x00>" and text[0].isspace():
            continue  # Metaspace adds no "▁" before a leading space, yet the decoder strips one: not reversible
        assert ours.decode(ours.encode(text), skip_special_tokens=True) == text


def test_special_tokens_match_transformers(pair: tuple[Tokenizer, object]) -> None:
    ours, hf = pair
    assert ours.vocab_size == len(ours) == len(hf)
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (hf.bos_token, hf.eos_token, hf.pad_token)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (hf.bos_token_id, hf.eos_token_id,
                                                                         hf.pad_token_id)
    assert sorted(ours.all_special_ids) == sorted(hf.all_special_ids)
    assert ours.special_tokens_map == hf.special_tokens_map
    # The tokenizer's own eos first, then generation_config.json's, without duplicates.
    assert ours.eos_token_ids == list(dict.fromkeys([hf.eos_token_id, 2, 7, 9]))


def test_special_token_forms(tmp_path: Path) -> None:
    added = {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False, "rstrip": False,
             "single_word": False, "special": True}
    config = {"bos_token": added, "eos_token": {"content": "<|im_end|>"}, "pad_token": None,
              "additional_special_tokens": ["<|im_start|>"]}
    folder = write_folder(tmp_path / "dicts", byte_level_bpe(), config, {"eos_token_id": 5})
    ours = Tokenizer.from_dir(folder)
    assert (ours.bos_token, ours.eos_token, ours.pad_token, ours.pad_token_id) == ("<s>", "<|im_end|>", None, None)
    assert ours.eos_token_ids == [ours.token_to_id("<|im_end|>"), 5]
    assert ours.token_to_id("<|im_start|>") in ours.all_special_ids
    # Legacy folders keep the special tokens in special_tokens_map.json (dicts without "__type" there).
    legacy = {"bos_token": {"content": "<s>", "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False}, "eos_token": "</s>", "pad_token": "<pad>",
              "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}
    folder = write_folder(tmp_path / "legacy", byte_level_bpe(), {}, files={"special_tokens_map.json": legacy})
    ours, hf = Tokenizer.from_dir(folder), AutoTokenizer.from_pretrained(folder)
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (hf.bos_token, hf.eos_token, hf.pad_token)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (hf.bos_token_id, hf.eos_token_id,
                                                                         hf.pad_token_id)
    assert ours.eos_token_ids == [hf.eos_token_id]
    assert sorted(ours.all_special_ids) == sorted(hf.all_special_ids)
    assert ours.token_to_id("<|im_end|>") in ours.all_special_ids


def test_generation_config_only_eos(tmp_path: Path) -> None:
    folder = write_folder(tmp_path, byte_level_bpe(), {"bos_token": "<s>"}, {"eos_token_id": [3, 4]})
    ours = Tokenizer.from_dir(folder)
    assert ours.eos_token is None and ours.eos_token_id is None
    assert ours.eos_token_ids == [3, 4]


def test_missing_special_token_is_added_like_transformers(tmp_path: Path) -> None:
    folder = write_folder(tmp_path, byte_level_bpe(), {**CONFIG, "pad_token": "<|new_pad|>", "image_token": "<img>"})
    ours, hf = Tokenizer.from_dir(folder), AutoTokenizer.from_pretrained(folder)
    assert len(ours) == len(hf) == byte_level_bpe().get_vocab_size() + 2
    assert ours.pad_token_id == hf.pad_token_id
    assert ours.special_tokens_map == hf.special_tokens_map
    text = "a<|new_pad|>b <img>"
    assert ours.encode(text) == hf.encode(text)
    assert ours.decode(ours.encode(text), skip_special_tokens=True) == hf.decode(hf.encode(text),
                                                                                skip_special_tokens=True)


def test_config_added_tokens_decoder_applies(tmp_path: Path) -> None:
    # tokenizer_config.json's added_tokens_decoder is applied over tokenizer.json, as transformers does.
    tok = byte_level_bpe()
    entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    decoder = {str(tok.token_to_id("<|im_start|>")): {"content": "<|im_start|>", **entry, "special": False},
               str(tok.get_vocab_size()): {"content": "<|tool|>", **entry, "special": True},
               str(tok.get_vocab_size() + 1): {"content": "<think>", **entry, "special": False}}
    folder = write_folder(tmp_path, tok, {**CONFIG, "added_tokens_decoder": decoder})
    ours, hf = Tokenizer.from_dir(folder), AutoTokenizer.from_pretrained(folder)
    assert len(ours) == len(hf) == tok.get_vocab_size() + 2
    text = "<|im_start|>user <|tool|> hi<think>x"
    ids = ours.encode(text)
    assert ids == hf.encode(text)
    assert ours.token_to_id("<|tool|>") in ids and ours.token_to_id("<think>") in ids
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("flags", [{"add_bos_token": True}, {"add_bos_token": True, "add_eos_token": True},
                                   {"add_eos_token": True}, {}])
def test_add_bos_eos_flags_without_post_processor(tmp_path: Path, flags: dict) -> None:
    # Llama-style folders without a post-processor in tokenizer.json rely on add_bos_token/add_eos_token.
    tok = sentencepiece_bpe()
    tok.post_processor = None
    folder = write_folder(tmp_path, tok, {**CONFIG, **flags})
    ours = Tokenizer.from_dir(folder)
    ref = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **CONFIG, **flags)
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text)
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    assert (ours.encode("hi")[0] == ours.bos_token_id) == bool(flags.get("add_bos_token"))
    assert (ours.encode("hi")[-1] == ours.eos_token_id) == bool(flags.get("add_eos_token"))


def test_post_processor_in_tokenizer_json_wins(tmp_path: Path) -> None:
    folder = write_folder(tmp_path, sentencepiece_bpe(), {**CONFIG, "add_bos_token": False, "add_eos_token": True})
    ours, hf = Tokenizer.from_dir(folder), AutoTokenizer.from_pretrained(folder)
    assert ours.encode("hello") == hf.encode("hello")
    assert ours.encode("hello")[0] == ours.bos_token_id


def test_truncation_and_padding_in_tokenizer_json_are_ignored(tmp_path: Path) -> None:
    tok = byte_level_bpe()
    tok.enable_truncation(max_length=4)
    tok.enable_padding(length=64, pad_id=tok.token_to_id("<pad>"), pad_token="<pad>")
    folder = write_folder(tmp_path, tok, {**CONFIG, "pad_token": "<pad>"})
    ours, hf = Tokenizer.from_dir(folder), AutoTokenizer.from_pretrained(folder)
    text = CORPUS[0]
    assert ours.encode(text) == hf.encode(text)
    assert len(ours.encode(text)) > 4


@pytest.mark.parametrize("cleanup", [False, True])
def test_clean_up_tokenization_spaces(tmp_path: Path, cleanup: bool) -> None:
    words = ["[UNK]", "hello", "world", ".", ",", "it", "'s", "n't", "do", "?", "!"]
    wordlevel = BackendTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    wordlevel.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe = byte_level_bpe()
    bpe.decoder = None  # BPE models never get the clean-up, even when asked
    for name, tok in (("wordlevel", wordlevel), ("bpe", bpe)):
        folder = write_folder(tmp_path / name, tok, {"unk_token": "[UNK]", "clean_up_tokenization_spaces": cleanup})
        ours, hf = Tokenizer.from_dir(folder), AutoTokenizer.from_pretrained(folder)
        ids = ours.encode("hello , world . it 's do n't ? !")
        assert ours.decode(ids) == hf.decode(ids)
    assert (Tokenizer.from_dir(tmp_path / "wordlevel").decode([1, 4, 2, 3]) == "hello, world.") == cleanup


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(b"\x00")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(TokenizerNotFoundError, match="tokenizer.json") as info:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(info.value) and "save_pretrained" in str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        Tokenizer.from_dir(tmp_path / "nope")


def test_metaspace_decoder_only(tmp_path: Path) -> None:
    # A pure Metaspace decoder (no byte fallback): leading-space handling must still match.
    tok = sentencepiece_bpe()
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    folder = write_folder(tmp_path, tok, CONFIG)
    ours, hf = Tokenizer.from_dir(folder), AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
        ids = hf.encode(text)
        assert ours.decode(ids) == hf.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
