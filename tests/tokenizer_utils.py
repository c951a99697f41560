"""Helpers for the tokenizer tests: small tokenizers trained in-process, saved as Hugging Face model folders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"

# A few KB of varied text: English, accents, CJK, emoji (incl. ZWJ sequences), whitespace runs, code, numbers.
CORPUS = [
    "The quick brown fox jumps over the lazy dog. It wasn't the dog's fault, they'd say; we're all tired.",
    "Hello, world! How are you doing today? I'm fine, thanks... Really?! Yes.",
    "Café, naïve, résumé, façade, jalapeño, Ångström, Øresund, Straße, Ελληνικά, русский язык, עברית, العربية.",
    "日本語のテキストと中文文本，还有한국어 문장도 있습니다。東京は大きな都市です。我爱自然语言处理。",
    "Emoji: 🎉🎉 🚀 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ 🤖💬 — and symbols: € £ ¥ © ® ™ ± × ÷ ≤ ≥ ≠ ∞ √ π.",
    "    indented line\n\ttab\tseparated\tvalues\n\n\nthree newlines   three spaces     five spaces",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }  // C code with {braces} and [brackets]",
    "SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name ORDER BY 2 DESC;",
    "Numbers 0 1 2 3 42 3.14159 1,000,000 2024-07-26 12:34:56 +1 (555) 010-9999 #hashtag @mention",
    "Mixed: naïve café 東京 🚀 code `x = y ** 2` done.\r\nWindows line ending and trailing spaces   ",
    "Une phrase en français, avec des accents : où est la bibliothèque ? À bientôt !",
    "Ein Satz auf Deutsch: Größe, Übung, Ärger — schön. Español: ¿Dónde está? ¡Olé!",
]

TEXTS = [
    "Hello world",
    " leading space and trailing space ",
    "Café naïve résumé Ångström",
    "日本語のテキスト 中文 한국어",
    "🎉🚀👍🏽👨‍👩‍👧‍👦🇫🇷❤️ emoji soup",
    "whitespace    runs\t\ttabs\n\n\nnewlines   \n  end",
    "def f(x):\n    return x ** 2  # comment\n",
    "Rare: ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𓀀 ☃︎ ⅷ Ω",
    "It wasn't me , she said . Really ? Yes !",
    "",
    " ",
    "<s>special in text</s> and <pad> too",
    "Mixed ✨ scripts: Ελληνικά русский עברית العربية",
]

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]


def _train_bpe(pre_tokenizer: Any, vocab_size: int, limit_alphabet: int | None, alphabet: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizer
    limit = {} if limit_alphabet is None else {"limit_alphabet": limit_alphabet}
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False, **limit)
    tok.train_from_iterator(CORPUS * 5, trainer)
    return tok


def byte_level_bpe() -> Tokenizer:
    """A GPT-2/Llama-3-style byte-level BPE with special tokens (multi-byte characters split across tokens)."""
    tok = _train_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), 700, None, pre_tokenizers.ByteLevel.alphabet())
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return tok


def sentencepiece_bpe(legacy: bool = False) -> Tokenizer:
    """A Llama-2/Mistral-style BPE: Metaspace, `byte_fallback=True`, `<0x00>`..`<0xFF>` in the base vocabulary.

    Args:
        legacy: Use the older Llama 2 layout (Prepend/Replace normalizer, no pre-tokenizer) instead of a Metaspace
            pre-tokenizer with `prepend_scheme="first"`.
    """
    trained = _train_bpe(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True), 450, 60, [])
    model = json.loads(trained.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in sorted(model["vocab"], key=model["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if legacy:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tok


def write_folder(
    folder: Path,
    tok: Tokenizer,
    config: dict[str, Any] | None = None,
    generation_config: dict[str, Any] | None = None,
    files: dict[str, Any] | None = None,
) -> Path:
    """Save `tok` as `folder/tokenizer.json` with the given config files (dicts become JSON, strings are written)."""
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    out: dict[str, Any] = dict(files or {})
    if config is not None:
        out["tokenizer_config.json"] = {"tokenizer_class": "PreTrainedTokenizerFast", **config}
    if generation_config is not None:
        out["generation_config.json"] = generation_config
    for name, content in out.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content if isinstance(content, str) else json.dumps(content, ensure_ascii=False, indent=2),
                        encoding="utf-8")
    return folder


def template_meta() -> dict[str, dict[str, Any]]:
    """The fixture templates' metadata (file, source, special tokens), from fixtures/chat_templates/templates.json."""
    return json.loads((FIXTURES / "templates.json").read_text(encoding="utf-8"))["templates"]


def read_template(name: str) -> str:
    """The exact text of a fixture template (read without newline translation)."""
    with open(FIXTURES / template_meta()[name]["file"], encoding="utf-8", newline="") as f:
        return f.read()
