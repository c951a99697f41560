"""A GGUF file's tokenizer (the `tokenizer.ggml.*` metadata) rebuilt as a `tokenizers` tokenizer.

`backend_from_metadata` builds the byte-level BPE (`gpt2` kind: merges, the pre-tokenizer llama.cpp names in
`tokenizer.ggml.pre`) or the SentencePiece-style BPE (`llama` kind: merges ordered by token scores, byte fallback,
`▁` for spaces); `gguf_tokenizer_parts` adds the special tokens, bos/eos flags and chat templates
(`tokenizer.chat_template`) that `Tokenizer.from_gguf` wraps it with.
"""

from __future__ import annotations

import os
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from nomoat.util.errors import ModelError

# llama.cpp pre-tokenizer names -> the split regex of the model's tokenizer.json (None: GPT-2's byte-level regex).
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
           r"\s*[\r\n]+|\s+(?!\S)|\s+")  # fmt: skip
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
           r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|"
           r"\s*[\r\n]+|\s+(?!\S)|\s+")  # fmt: skip
SPLIT_REGEXES = {"llama-bpe": _LLAMA3, "llama3": _LLAMA3, "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2,
                 "tekken": _TEKKEN}  # fmt: skip
BPE_PRE = ("default", "gpt-2", "smollm", "starcoder", *SPLIT_REGEXES)
CONTROL, USER_DEFINED, UNUSED = 3, 4, 5


class GGUFTokenizerError(ModelError):
    """A GGUF tokenizer nomoat cannot rebuild (an unknown tokenizer model or pre-tokenizer)."""


def _byte_level(pre: str, path: Any) -> tuple[Any, list[Any]]:
    """The pre-tokenizer and normalizers of a byte-level BPE named `pre` by llama.cpp."""
    if pre in ("default", "gpt-2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), []
    if pre in ("smollm", "starcoder"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]), []
    if pre in SPLIT_REGEXES:
        split = pre_tokenizers.Split(Regex(SPLIT_REGEXES[pre]), behavior="isolated")
        norm = [normalizers.NFC()] if pre.startswith(("qwen2", "deepseek")) else []
        return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), norm
    raise GGUFTokenizerError(
        f"{path}: GGUF pre-tokenizer {pre!r} is not supported", hint=f"supported: {', '.join(BPE_PRE)}"
    )


def _spm_merges(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """Merges of a SentencePiece-style vocabulary: every split of a token into two tokens, best-scoring first."""
    merges = []
    for piece, i in vocab.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((scores[i], vocab[left], vocab[right], left, right))
    merges.sort(key=lambda m: (-m[0], m[1], m[2]))
    return [(m[3], m[4]) for m in merges]


def backend_from_metadata(meta: dict[str, Any], path: Any = "") -> BackendTokenizer:
    """The `tokenizers` tokenizer of a GGUF file's metadata (without post-processor: the caller sets bos/eos)."""
    kind = meta.get("tokenizer.ggml.model")
    tokens: list[str] = list(meta.get("tokenizer.ggml.tokens") or [])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if not tokens:
        raise GGUFTokenizerError(f"{path}: the GGUF file has no tokenizer (no tokenizer.ggml.tokens)")
    vocab = {t: i for i, t in enumerate(tokens)}
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
        pre = str(meta.get("tokenizer.ggml.pre") or "default")
        pre_tok, norms = _byte_level(pre, path)
        bpe = models.BPE(vocab, merges, ignore_merges=pre in ("llama-bpe", "llama3"))
        tok = BackendTokenizer(bpe)
        tok.pre_tokenizer = pre_tok
        tok.decoder = decoders.ByteLevel()
        if norms:
            tok.normalizer = norms[0]
    elif kind == "llama":
        scores = [float(s) for s in meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)]
        unk = tokens[unk_id] if unk_id is not None else None
        bpe = models.BPE(vocab, _spm_merges(vocab, scores), unk_token=unk, fuse_unk=True, byte_fallback=True)
        tok = BackendTokenizer(bpe)
        prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
        steps = ([normalizers.Prepend("\u2581")] if prefix else []) + [normalizers.Replace(" ", "\u2581")]
        tok.normalizer = normalizers.Sequence(steps)
        dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        tok.decoder = decoders.Sequence(dec + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    else:
        raise GGUFTokenizerError(
            f"{path}: GGUF tokenizer model {kind!r} is not supported",
            hint="supported: gpt2 (byte-level BPE) and llama (SentencePiece-style BPE)",
        )
    added = [AddedToken(t, special=types[i] == CONTROL, normalized=False) for i, t in enumerate(tokens)
             if types[i] in (CONTROL, USER_DEFINED) and t]  # fmt: skip
    if added:
        tok.add_tokens(added)
    return tok


def gguf_tokenizer_parts(path: str | os.PathLike, chat_template: str | None = None) -> dict[str, Any]:
    """What `Tokenizer.from_gguf` needs from a GGUF file.

    Args:
        path: The `.gguf` file.
        chat_template: A template to use when the file has none (e.g. converted from an Ollama template).

    Returns:
        `backend` (no post-processor yet), `specials` (bos/eos/unk/pad token strings), `add_bos`, `add_eos`,
        and `chat_templates`.
    """
    import gguf

    reader = gguf.GGUFReader(str(path), "r")
    meta = {name: field.contents() for name, field in reader.fields.items() if name.startswith("tokenizer.")}
    backend = backend_from_metadata(meta, path)
    tokens = meta["tokenizer.ggml.tokens"]
    specials: dict[str, str] = {}
    for key, name in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"), ("padding", "pad_token")):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and 0 <= int(token_id) < len(tokens):
            specials[name] = tokens[int(token_id)]
    templates = {"default": meta["tokenizer.chat_template"]} if meta.get("tokenizer.chat_template") else {}
    for name, value in meta.items():
        if name.startswith("tokenizer.chat_template.") and isinstance(value, str):
            templates[name.removeprefix("tokenizer.chat_template.")] = value
    if chat_template and "default" not in templates:
        templates["default"] = chat_template
    return {
        "backend": backend,
        "specials": specials,
        "add_bos": bool(meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == "llama")),
        "add_eos": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "chat_templates": templates,
    }
