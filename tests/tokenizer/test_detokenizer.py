"""Streaming detokenizer: the concatenated deltas equal transformers' full decode, and no delta splits a character."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers
from transformers import AutoTokenizer

from nomoat.tokenizer import IncrementalDetokenizer, Tokenizer

from tokenizer_utils import CORPUS, TEXTS, byte_level_bpe, sentencepiece_bpe, write_folder

KINDS = ["byte_level", "sentencepiece", "sentencepiece_legacy"]
CONFIG = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


@pytest.fixture(scope="module", params=KINDS)
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, object]:
    tok = {"byte_level": byte_level_bpe, "sentencepiece": sentencepiece_bpe,
           "sentencepiece_legacy": lambda: sentencepiece_bpe(legacy=True)}[request.param]()
    folder = write_folder(tmp_path_factory.mktemp(request.param), tok, CONFIG)
    return Tokenizer.from_dir(folder), AutoTokenizer.from_pretrained(folder)


def _stream(det: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [det.add(i) for i in ids] + [det.flush()]


def _check(ours: Tokenizer, hf: object, ids: list[int], skip: bool, det: IncrementalDetokenizer | None = None) -> None:
    det = det or ours.stream_decoder(skip_special_tokens=skip)
    deltas = _stream(det, ids)
    full = hf.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) == full, (ids, deltas, full)
    pos = 0
    for delta in deltas:
        assert isinstance(delta, str)
        delta.encode("utf-8")  # no lone surrogates: every delta is valid text
        # A U+FFFD may only be emitted where the full decode has one (never for a held-back partial character).
        for i, ch in enumerate(delta):
            assert ch != "\ufffd" or full[pos + i] == "\ufffd"
        pos += len(delta)


def _byte_ids(ours: Tokenizer) -> list[int]:
    """Byte-fallback tokens, or for byte-level BPE the single-byte tokens that are not whole characters."""
    if ours._byte_ids:
        return sorted(ours._byte_ids)
    return [i for i in range(len(ours)) if "\ufffd" in ours.decode([i])]


@pytest.mark.parametrize("skip", [False, True])
def test_random_token_sequences(pair: tuple[Tokenizer, object], skip: bool) -> None:
    ours, hf = pair
    rng = random.Random(1234)
    vocab, special, byte_ids = len(ours), ours.all_special_ids, _byte_ids(ours)
    assert len(byte_ids) > 50
    for _ in range(400):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 60))]
        _check(ours, hf, ids, skip)
    for _ in range(400):  # dense in partial characters and special tokens
        ids = []
        for _ in range(rng.randrange(1, 60)):
            r = rng.random()
            ids.append(rng.choice(byte_ids) if r < 0.6 else rng.choice(special) if r < 0.75 else rng.randrange(vocab))
        _check(ours, hf, ids, skip)


@pytest.mark.parametrize("skip", [False, True])
def test_real_text_streams_without_replacement_chars(pair: tuple[Tokenizer, object], skip: bool) -> None:
    ours, hf = pair
    rng = random.Random(7)
    for text in [*TEXTS, *CORPUS]:
        ids = ours.encode(text)
        _check(ours, hf, ids, skip)
        deltas = _stream(ours.stream_decoder(skip), ids)
        assert not any("\ufffd" in d for d in deltas)
    for _ in range(200):  # chat-like: text pieces separated by special tokens, cut anywhere (mid-character too)
        ids = []
        for _ in range(rng.randrange(1, 5)):
            piece = ours.encode(rng.choice(TEXTS + CORPUS), add_special_tokens=rng.random() < 0.5)
            ids += piece[: rng.randrange(len(piece) + 1)] + [rng.choice(ours.all_special_ids)]
        _check(ours, hf, ids, skip)


def test_partial_characters_are_held_back(pair: tuple[Tokenizer, object]) -> None:
    ours, _ = pair
    ids = ours.encode("ok 🎉東京", add_special_tokens=False)
    det = ours.stream_decoder()
    deltas = [det.add(i) for i in ids]
    assert any(d == "" for d in deltas)  # some tokens hold only part of a character
    assert "".join(deltas) + det.flush() == "ok 🎉東京"
    assert all(ch not in d for d in deltas for ch in ("\ufffd",))


def test_leading_space_after_skipped_special_token(pair: tuple[Tokenizer, object]) -> None:
    # Decoders that strip the first leading space must not strip it after a skipped special token.
    ours, hf = pair
    ids = [ours.bos_token_id, *ours.encode("Hello", add_special_tokens=False), ours.eos_token_id,
           *ours.encode(" world and   more", add_special_tokens=False), ours.eos_token_id]
    for skip in (False, True):
        _check(ours, hf, ids, skip)


def test_window_stays_small(pair: tuple[Tokenizer, object]) -> None:
    ours, hf = pair
    ids = ours.encode(" ".join(CORPUS * 3))
    assert len(ids) > 1000
    det = ours.stream_decoder()
    out, longest = [], 0
    for i in ids:
        out.append(det.add(i))
        longest = max(longest, len(det._ids))
    assert "".join(out) + det.flush() == hf.decode(ids)
    # Each step decodes the last delta's tokens plus the pending ones, never the whole sequence: with byte-level
    # BPE that is a handful of tokens; a byte-fallback run is cut once it reaches max_byte_run (64) tokens, plus
    # the tokens of the last delta (the test vocabulary is trained anew each run, so that part varies a little).
    assert longest <= (64 + 16 if ours._byte_ids else 12)


def test_flush_resets(pair: tuple[Tokenizer, object]) -> None:
    ours, _ = pair
    det = ours.stream_decoder()
    for text in ("first 🎉", "second 東京"):
        ids = ours.encode(text, add_special_tokens=False)
        assert "".join(_stream(det, ids)) == ours.decode(ids)


def test_long_byte_runs(tmp_path: Path) -> None:
    ours = Tokenizer.from_dir(write_folder(tmp_path, sentencepiece_bpe(), CONFIG))
    text = "東京🎉ꙮ" * 30  # 390 byte-fallback tokens in one run
    ids = [ours.token_to_id(f"<0x{b:02X}>") for b in text.encode("utf-8")]
    assert ours.decode(ids) == text
    det = ours.stream_decoder()
    deltas, longest = [], 0
    for i in ids:
        deltas.append(det.add(i))
        longest = max(longest, len(det._ids))
    assert sum(1 for d in deltas if d) >= 5  # a long valid run still streams...
    assert longest <= 64 + 4 + 1  # ...and is cut into windows of max_byte_run tokens (plus one character)
    assert "".join(deltas) + det.flush() == text
    # A run that turns invalid at its end: ByteFallback decodes the whole run to U+FFFD. Unbounded mode is exact.
    bad = [*ids, ours.token_to_id("<0xF0>")]
    exact = IncrementalDetokenizer(ours, max_byte_run=None, max_pending=None)
    assert "".join(_stream(exact, bad)) == ours.decode(bad)
    assert set(ours.decode(bad)) == {"\ufffd"}


def test_clean_up_tokenization_spaces_stream(tmp_path: Path) -> None:
    # Non-BPE tokenizers with clean_up_tokenization_spaces: decode() rewrites " ," -> "," etc. over the whole text.
    words = ["[UNK]", "hello", "world", ".", ",", "it", "'s", "n't", "do", "?", "!", "'", "n", "'m", "'ve", "'re"]
    backend = BackendTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = write_folder(tmp_path, backend, {"unk_token": "[UNK]", "clean_up_tokenization_spaces": True})
    ours, hf = Tokenizer.from_dir(folder), AutoTokenizer.from_pretrained(folder)
    rng = random.Random(3)
    for _ in range(500):
        _check(ours, hf, [rng.randrange(len(words)) for _ in range(rng.randrange(1, 30))], skip=False)
    ids = [words.index(w) for w in ("hello", ",", "it", "'s", "'", "n't", "world", ".")]
    assert "".join(_stream(ours.stream_decoder(), ids)) == hf.decode(ids) == "hello, it's'n't world."
