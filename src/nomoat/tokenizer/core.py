"""The `Tokenizer` of a Hugging Face model folder, equal to what transformers' `AutoTokenizer` gives.

`Tokenizer.from_dir(folder)` reads `tokenizer.json` (the source of truth for encoding and decoding, through the
`tokenizers` library) and the folder's config files (special tokens, chat templates). An `IncrementalDetokenizer`
(`Tokenizer.stream_decoder`) turns a stream of token ids into text deltas that never split a character.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from os.path import commonprefix
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as BackendTokenizer

from nomoat.tokenizer.chat_template import ChatTemplateError, plain_data, render_chat
from nomoat.util.errors import ModelError
from nomoat.util.files import atomic_write_json, atomic_write_text, read_json
from nomoat.util.hub import local_path

__all__ = ["ChatTemplateError", "IncrementalDetokenizer", "Tokenizer", "TokenizerNotFoundError"]

# The named special tokens transformers keeps in `special_tokens_map`, in its order.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Names a message's reasoning is passed under; the first is the standard one templates read (as in transformers).
# transformers' `clean_up_tokenization` replacements, in order.
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class TokenizerNotFoundError(ModelError, FileNotFoundError):
    """Raised when a model folder has no `tokenizer.json`."""




def _token_content(value: Any) -> str | None:
    """Return the text of a special token given as a string or an AddedToken-style dict, else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict[str, Any]:
    """Load a JSON object from `path`, or return {} when the file does not exist."""
    return read_json(path, missing_ok=True, error=ModelError)


def _has_decoder_type(node: Any, name: str) -> bool:
    """Whether a serialized decoder (or any decoder nested in a Sequence) has `type == name`."""
    if isinstance(node, dict):
        return node.get("type") == name or any(_has_decoder_type(v, name) for v in node.values())
    if isinstance(node, list):
        return any(_has_decoder_type(v, name) for v in node)
    return False


def _clean_up_tokenization(text: str) -> str:
    """Apply transformers' `clean_up_tokenization` (meant for WordPiece-style tokenizers)."""
    for old, new in _CLEANUP:
        text = text.replace(old, new)
    return text


def _is_gguf_source(path: str | Path) -> bool:
    """A model argument naming a GGUF file or an Ollama model rather than a Hugging Face folder."""
    if str(path).startswith("ollama:"):
        return True
    p = Path(path).expanduser()
    if not p.is_file():
        return False
    with p.open("rb") as f:
        return f.read(4) == b"GGUF"


class Tokenizer:
    """A Hugging Face tokenizer (`tokenizer.json` plus config files) with chat templates.

    Build one with `Tokenizer.from_dir(path)`. Encoding and decoding match transformers' `AutoTokenizer` for
    the same folder; `apply_chat_template` matches `apply_chat_template(..., tokenize=False)` character for
    character.

    Attributes:
        backend: The `tokenizers.Tokenizer` doing the work.
        special_tokens_map: Named special tokens (`bos_token`, `eos_token`, ... and model-specific `*_token`
            entries) as strings; this is also what chat templates see.
        extra_special_tokens: Further special tokens (`additional_special_tokens`), as strings.
        eos_token_ids: Every id that ends generation: the tokenizer's own eos first, then those of
            `generation_config.json`, without duplicates.
        chat_templates: All named chat templates (`{"default": ...}` for a folder with a single one).
        clean_up_tokenization_spaces: Whether `decode` applies transformers' space clean-up (non-BPE models only).
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        special_tokens: Mapping[str, str] | None = None,
        extra_special_tokens: Sequence[str] = (),
        generation_eos_ids: Sequence[int] = (),
        chat_templates: Mapping[str, str] | None = None,
        clean_up_tokenization_spaces: bool = False,
        cleanup_bpe: bool = False,
    ) -> None:
        """Wrap a backend tokenizer; prefer `Tokenizer.from_dir`, which reads all of these from a folder.

        Args:
            backend: The `tokenizers.Tokenizer`; special tokens it lacks are added to it, as transformers does.
            special_tokens: Named special tokens, e.g. `{"bos_token": "<s>", "eos_token": "</s>"}`.
            extra_special_tokens: Additional special tokens.
            generation_eos_ids: `eos_token_id` entries of `generation_config.json`.
            chat_templates: Named chat templates; the one called "default" is used unless another is asked for.
            clean_up_tokenization_spaces: The `tokenizer_config.json` flag of that name.
            cleanup_bpe: transformers' `clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output`.
        """
        self.backend = backend
        self.special_tokens_map = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.extra_special_tokens = list(extra_special_tokens)
        self.chat_templates = dict(chat_templates or {})
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        # transformers skips the clean-up for BPE models: it would delete real spaces before punctuation.
        self._cleanup = clean_up_tokenization_spaces and (type(backend.model).__name__ != "BPE" or cleanup_bpe)
        # transformers adds the special tokens the backend lacks (as special added tokens) when it loads.
        known = {tok.content for tok in backend.get_added_tokens_decoder().values()}
        missing = [t for t in [*self.special_tokens_map.values(), *self.extra_special_tokens] if t not in known]
        if missing:
            backend.add_tokens([AddedToken(t, special=True) for t in dict.fromkeys(missing)])
        eos = [] if self.eos_token_id is None else [self.eos_token_id]
        self.eos_token_ids = list(dict.fromkeys([*eos, *generation_eos_ids]))
        # `tokenizers` skips added tokens flagged special when asked to; the detokenizer filters them up front.
        self._special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        # With a ByteFallback decoder, a run of <0xNN> tokens decodes as one unit (all U+FFFD if invalid anywhere).
        decoder = json.loads(backend.decoder.__getstate__()) if backend.decoder is not None else None
        self._byte_ids = frozenset(
            i for i in (backend.token_to_id(f"<0x{b:02X}>") for b in range(256)) if i is not None
        ) if _has_decoder_type(decoder, "ByteFallback") else frozenset()

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load the tokenizer of a Hugging Face model folder.

        Reads `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`, `generation_config.json`,
        `chat_template.jinja` and `additional_chat_templates/*.jinja` (or `chat_template.json`) when present.

        Args:
            path: The model folder.

        Returns:
            The tokenizer.

        Raises:
            TokenizerNotFoundError: The folder does not exist or has no `tokenizer.json`.
        """
        path = local_path(path)  # `demo` and Hub ids (ORG/NAME[@REV]) name folders too
        if _is_gguf_source(path):
            return cls.from_gguf(path)
        folder = Path(path)
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            what = "has no tokenizer.json" if folder.is_dir() else "is not a folder"
            raise TokenizerNotFoundError(
                f"{folder} {what}. nomoat expects a Hugging Face model folder with a 'fast' tokenizer serialized as "
                "tokenizer.json (plus tokenizer_config.json). A SentencePiece-only folder (tokenizer.model) can be "
                "converted once with transformers: AutoTokenizer.from_pretrained(folder).save_pretrained(folder)."
            )
        backend = BackendTokenizer.from_file(str(tok_file))
        # transformers encodes without the truncation/padding that may be baked into tokenizer.json.
        backend.no_truncation()
        backend.no_padding()
        config = _read_json(folder / "tokenizer_config.json")
        specials: dict[str, str | None] = {k: _token_content(config.get(k)) for k in SPECIAL_TOKEN_NAMES}
        # Model-specific named tokens (e.g. "image_token"): transformers takes string-valued `*_token` keys.
        specials.update({k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, str)})
        extras_cfg = config.get("extra_special_tokens", config.get("additional_special_tokens")) or []
        if isinstance(extras_cfg, Mapping):  # a dict of named model-specific tokens
            specials.update({k: _token_content(v) for k, v in extras_cfg.items()})
            extras_cfg = []
        extras = [t for t in (_token_content(v) for v in extras_cfg) if t is not None]
        legacy = _read_json(folder / "special_tokens_map.json")
        for key, value in legacy.items():
            if key in ("additional_special_tokens", "extra_special_tokens") and isinstance(value, list):
                extras += [t for t in (_token_content(v) for v in value) if t is not None and t not in extras]
            # transformers reads this legacy file only when tokenizer_config.json has no added_tokens_decoder,
            # and then lets it override; otherwise we still use it to fill gaps.
            elif _token_content(value) is not None and ("added_tokens_decoder" not in config or not specials.get(key)):
                specials[key] = _token_content(value)
        # Re-apply the config's added tokens like transformers does (its attributes win over tokenizer.json's).
        named = {v for v in specials.values() if v}
        added = []
        for _, tok in sorted(config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0])):
            if isinstance(tok, Mapping) and isinstance(tok.get("content"), str):
                fields = {k: tok[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in tok}
                fields["special"] = fields.get("special", False) or tok["content"] in named
                added.append(AddedToken(tok["content"], **fields))
        if added:
            backend.add_tokens(added)
        if backend.post_processor is None:
            # tokenizer.json's post-processor decides bos/eos (transformers 5 ignores the config flags when it has
            # one); without one we honour add_bos_token/add_eos_token, as transformers' Llama tokenizers did.
            flags = bool(config.get("add_bos_token")), bool(config.get("add_eos_token"))
            cls._set_post_processor(backend, specials, *flags)
        if config.get("split_special_tokens"):
            backend.encode_special_tokens = True
        gen_eos = _read_json(folder / "generation_config.json").get("eos_token_id")
        gen_eos_ids = [gen_eos] if isinstance(gen_eos, int) else [i for i in (gen_eos or []) if isinstance(i, int)]
        cleanup_bpe = config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")
        return cls(backend, specials, extras, gen_eos_ids, cls._read_chat_templates(folder, config),
                   bool(config.get("clean_up_tokenization_spaces", False)), bool(cleanup_bpe))

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """The tokenizer of a `.gguf` file or of an Ollama model (`ollama:NAME[:TAG]`), rebuilt from its metadata.

        An Ollama model's Go template is converted to Jinja and used when the GGUF file has no chat template.
        """
        from nomoat.tokenizer.gguf import gguf_tokenizer_parts
        from nomoat.tokenizer.ollama import go_template_to_jinja
        from nomoat.util import ollama

        if not ollama.is_ollama(path):
            return cls._from_parts(gguf_tokenizer_parts(Path(path).expanduser()))
        found = ollama.resolve(str(path))
        template = None
        if found.template:
            try:
                template = go_template_to_jinja(found.template)
            except ValueError:
                template = None  # the GGUF's own tokenizer.chat_template (if any) is used instead
        return cls._from_parts(gguf_tokenizer_parts(found.gguf, chat_template=template))

    @classmethod
    def _from_parts(cls, parts: Mapping[str, Any]) -> Tokenizer:
        cls._set_post_processor(parts["backend"], parts["specials"], parts["add_bos"], parts["add_eos"])
        return cls(parts["backend"], parts["specials"], chat_templates=parts["chat_templates"])

    @staticmethod
    def _set_post_processor(backend: BackendTokenizer, specials: Mapping[str, Any], bos: bool, eos: bool) -> None:
        """Install transformers' `update_post_processor` template for the add_bos_token/add_eos_token flags."""
        bos_tok, eos_tok = specials.get("bos_token"), specials.get("eos_token")
        bos = bos and bos_tok is not None and backend.token_to_id(bos_tok) is not None
        eos = eos and eos_tok is not None and backend.token_to_id(eos_tok) is not None
        single = f"{f'{bos_tok}:0 ' if bos else ''}$A:0{f' {eos_tok}:0' if eos else ''}"
        pair = f"{single}{f' {bos_tok}:1' if bos else ''} $B:1{f' {eos_tok}:1' if eos else ''}"
        special = [(t, backend.token_to_id(t)) for t, on in ((bos_tok, bos), (eos_tok, eos)) if on]
        backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

    def save(self, folder: str | Path) -> None:
        """Write this tokenizer into a model folder as Hugging Face files that `from_dir` and transformers read.

        `tokenizer.json` (post-processor and added tokens included), `tokenizer_config.json` (named and extra special
        tokens) and the chat templates (`chat_template.jinja`, `additional_chat_templates/NAME.jinja`). Used to give a
        model made from a GGUF file a tokenizer folder of its own.
        """
        folder = Path(folder)
        atomic_write_text(folder / "tokenizer.json", self.backend.to_str())
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **self.special_tokens_map,
                                  "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces}  # fmt: skip
        if self.extra_special_tokens:
            config["extra_special_tokens"] = self.extra_special_tokens
        atomic_write_json(folder / "tokenizer_config.json", config)
        for name, template in self.chat_templates.items():
            named = f"additional_chat_templates/{name}.jinja"
            target = folder / ("chat_template.jinja" if name == "default" else named)
            target.parent.mkdir(exist_ok=True)
            atomic_write_text(target, template)

    @staticmethod
    def _read_chat_templates(folder: Path, config: Mapping[str, Any]) -> dict[str, str]:
        """Collect chat templates; template files take priority over `tokenizer_config.json`, as in transformers."""
        templates: dict[str, str] = {}
        if (folder / "chat_template.jinja").is_file():
            templates["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        extra_dir = folder / "additional_chat_templates"
        if extra_dir.is_dir():
            for file in sorted(extra_dir.glob("*.jinja")):
                templates[file.name.removesuffix(".jinja")] = file.read_text(encoding="utf-8")
        if templates:
            return templates
        value = config.get("chat_template")
        if value is None:  # processors (multimodal models) used to keep it in chat_template.json
            value = _read_json(folder / "chat_template.json").get("chat_template")
        if isinstance(value, str):
            return {"default": value}
        if isinstance(value, list):
            return {t["name"]: t["template"] for t in value if isinstance(t, Mapping)}
        return {}

    # ----------------------------------------------------------------------------------------------- special tokens
    def _token(self, name: str) -> str | None:
        return self.special_tokens_map.get(name)

    def _id(self, name: str) -> int | None:
        token = self._token(name)
        return None if token is None else self.token_to_id(token)

    bos_token = property(lambda self: self._token("bos_token"), doc="The beginning-of-sequence token, or None.")
    eos_token = property(lambda self: self._token("eos_token"), doc="The end-of-sequence token, or None.")
    pad_token = property(lambda self: self._token("pad_token"), doc="The padding token, or None.")
    unk_token = property(lambda self: self._token("unk_token"), doc="The unknown token, or None.")
    bos_token_id = property(lambda self: self._id("bos_token"), doc="Id of `bos_token`, or None.")
    eos_token_id = property(lambda self: self._id("eos_token"), doc="Id of the tokenizer's own `eos_token`, or None.")
    pad_token_id = property(lambda self: self._id("pad_token"), doc="Id of `pad_token`, or None.")
    unk_token_id = property(lambda self: self._id("unk_token"), doc="Id of `unk_token`, or None.")

    @property
    def all_special_tokens(self) -> list[str]:
        """Named plus extra special tokens, without duplicates (transformers' `all_special_tokens`)."""
        return list(dict.fromkeys([*self.special_tokens_map.values(), *self.extra_special_tokens]))

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of `all_special_tokens`."""
        return [i for i in (self.token_to_id(t) for t in self.all_special_tokens) if i is not None]

    @property
    def vocab_size(self) -> int:
        """Size of the whole vocabulary including added tokens (transformers' `len(tokenizer)`)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def chat_template(self) -> str | None:
        """The default chat template, or None when the model has none (or only named ones)."""
        return self.chat_templates.get("default")

    def token_to_id(self, token: str) -> int | None:
        """Return the id of `token` (added tokens included), or None when it is not in the vocabulary."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Return the vocabulary entry of `token_id`, or None when out of range."""
        return self.backend.id_to_token(token_id)

    # ------------------------------------------------------------------------------------------- encode / decode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Encode `text` to token ids, as transformers' `tokenizer.encode`.

        Args:
            text: The text.
            add_special_tokens: Apply the tokenizer's post-processor (e.g. prepend bos).
        """
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(
        self, text: str, add_special_tokens: bool = False
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """Encode `text` and return each token's character span in `text` (used to mask labels by text spans).

        Args:
            text: The text.
            add_special_tokens: Apply the tokenizer's post-processor (added tokens get the span (0, 0)).

        Returns:
            The ids and, for each, its `(start, end)` character offsets into `text`.
        """
        enc = self.backend.encode(text, add_special_tokens=add_special_tokens)
        return enc.ids, [(int(a), int(b)) for a, b in enc.offsets]

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Encode several texts (in parallel in the backend); one list of ids per text.

        Args:
            texts: The texts.
            add_special_tokens: Apply the tokenizer's post-processor.
        """
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: int | Iterable[int], skip_special_tokens: bool = False) -> str:
        """Decode token ids to text, as transformers' `tokenizer.decode`.

        Args:
            ids: A token id or a sequence of them (anything with `tolist()` works too).
            skip_special_tokens: Drop special added tokens.
        """
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = [ids] if isinstance(ids, int) else [int(i) for i in ids]
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._cleanup else text

    def stream_decoder(self, skip_special_tokens: bool = False) -> IncrementalDetokenizer:
        """Return a fresh streaming detokenizer, see `IncrementalDetokenizer`."""
        return IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------------------------------- chat templates
    def get_chat_template(self, chat_template: str | None = None, tools: list[Any] | None = None) -> str:
        """Resolve which template to render, with transformers' rules.

        Args:
            chat_template: A template, or the name of one of `chat_templates`; None for the model's own.
            tools: When given and the model has a "tool_use" template, that one is picked by default.

        Raises:
            ChatTemplateError: The model has no chat template (and none was passed), or no default among several.
        """
        named = self.chat_templates
        if chat_template is not None:
            return named.get(chat_template, chat_template)
        if tools is not None and "tool_use" in named:
            return named["tool_use"]
        if "default" in named:
            return named["default"]
        if named:
            raise ChatTemplateError(
                f"This model has several chat templates and none is called 'default'; pass the name of one of "
                f"{sorted(named)} (or a template) as `chat_template`."
            )
        raise ChatTemplateError(
            "This model has no chat template (no chat_template in tokenizer_config.json and no chat_template.jinja); "
            "pass one as `chat_template=`, or format the prompt yourself."
        )

    def apply_chat_template(
        self,
        messages: Sequence[Any],
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        tokenize: bool = False,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str | list[int] | list[str] | list[list[int]]:
        """Render a conversation with the chat template, exactly like transformers' `apply_chat_template`.

        Args:
            messages: A list of `{"role": ..., "content": ...}` dicts, or a list of such conversations (a batch).
            add_generation_prompt: Append the header that starts an assistant turn.
            continue_final_message: Leave the final message open so the model continues it; a string names the
                field to continue (e.g. "reasoning_content"). Not compatible with `add_generation_prompt`.
            tools: JSON schemas of the tools the model may call (passed to the template as `tools`).
            documents: Documents for retrieval-augmented templates (dicts, usually with "title" and "text").
            tokenize: Return token ids (encoded without adding special tokens) instead of text.
            chat_template: A template, or the name of one of the model's templates, to use instead of the default.
            **kwargs: Extra variables for the template (e.g. `date_string`, `enable_thinking`).

        Returns:
            The rendered text or its ids; a list of them for a batch.

        Raises:
            ChatTemplateError: No template, a template error, or the template's own `raise_exception`.
            ValueError: Empty conversation, or a `continue_final_message` misuse (same cases as transformers).
        """
        template = self.get_chat_template(chat_template, tools)
        if isinstance(messages, (list, tuple)) and not messages:
            raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
        batched = isinstance(messages[0], (list, tuple)) or hasattr(messages[0], "messages")
        chats = [getattr(c, "messages", c) for c in messages] if batched else [messages]
        # Keys set to None are dropped: many templates print "None" for them but handle a missing key.
        chats = [[{k: v for k, v in m.items() if v is not None} if isinstance(m, Mapping) else m for m in chat]
                 for chat in chats]
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt are not compatible. Use "
                             "continue_final_message to continue the final message, and add_generation_prompt to "
                             "start a new assistant message.")
        if any(not isinstance(tool, Mapping) for tool in tools or []):
            raise TypeError("Tools must be JSON schemas (dicts); nomoat does not convert Python functions to schemas.")
        if any(not isinstance(document, Mapping) for document in documents or []):
            raise TypeError("Documents should be a list of dicts with 'title' and 'text' keys!")
        context = plain_data({**self.special_tokens_map, **kwargs})
        tools, documents = plain_data(tools), plain_data(documents)
        rendered = [render_chat(template, c, tools, documents, add_generation_prompt, continue_final_message, context)
                    for c in chats]
        out: list[Any] = [self.encode(r, add_special_tokens=False) for r in rendered] if tokenize else rendered
        return out if batched else out[0]

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, special_tokens={self.special_tokens_map}, "
                f"eos_token_ids={self.eos_token_ids}, chat_templates={sorted(self.chat_templates)})")


# ----------------------------------------------------------------------------------------------- streaming decode
class IncrementalDetokenizer:
    """Turn a stream of token ids into text deltas that never split a character.

    This is the prefix/read-offset technique of vLLM and TGI: each step decodes only a small window (the tokens
    of the last emitted delta plus those still pending) and emits the new text after the window's prefix. Text is
    held back while it ends with U+FFFD (an incomplete UTF-8 character from byte-level BPE or byte-fallback
    tokens) and while the last token is a `<0xNN>` byte token of a ByteFallback decoder (a later byte can still
    turn the run invalid). When transformers' space clean-up applies (non-BPE models), the raw text is cleaned in
    pieces cut just before a space, where no clean-up pattern can straddle the cut. Decoding the prefix together
    with the new tokens makes decoders that strip a leading space (SentencePiece's Metaspace/Strip) give the right
    spacing. Skipped special tokens never enter the window, so they cannot make a later token look like the first
    of the text.

    The concatenation of every `add` result and `flush()` equals `tokenizer.decode(ids, skip_special_tokens)`.
    The one exception bounds the window: a valid run of more than `max_byte_run` byte tokens is emitted before it
    ends (so long byte-fallback text still streams), and more than `max_pending` tokens that never complete a
    character are emitted as they are. If such a run later turns invalid, ByteFallback's `decode` replaces the
    whole run by U+FFFD while the stream keeps the valid part. Pass None for both to always be exact.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False, max_byte_run: int | None = 64,
                 max_pending: int | None = 128) -> None:
        """Start an empty stream.

        Args:
            tokenizer: The tokenizer whose ids will be added.
            skip_special_tokens: Drop special tokens, as `decode(..., skip_special_tokens=True)`.
            max_byte_run: Emit a valid run of byte-fallback tokens once it is this long (None: never).
            max_pending: Emit anyway once this many tokens are pending (None: never); bounds garbage streams.
        """
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.max_byte_run = max_byte_run if max_byte_run is not None else float("inf")
        self.max_pending = max_pending if max_pending is not None else float("inf")
        self._skip = tokenizer._special_ids if skip_special_tokens else frozenset()
        self._bytes = tokenizer._byte_ids
        self._ids: list[int] = []  # the window: prefix tokens, then pending ones
        self._read = 0  # window index where the pending tokens start
        self._prefix_text = ""  # decode of the prefix tokens
        self._tail = ""  # raw text not cleaned up yet (only with transformers' clean-up)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.backend.decode(ids, skip_special_tokens=False)

    def _clean(self, raw: str, final: bool = False) -> str:
        """Apply transformers' clean-up to the raw stream, up to the last safe cut (before a space)."""
        if not self.tokenizer._cleanup:
            return raw
        tail = self._tail + raw
        # Every pattern starts with a space, and only " ' " has another one: that is the case to avoid.
        cut = len(tail) if final else next(
            (c for c in range(len(tail) - 1, 0, -1) if tail[c] == " " and not tail.endswith(" '", 0, c)), 0)
        self._tail = tail[cut:]
        return _clean_up_tokenization(tail[:cut])

    def add(self, token_id: int) -> str:
        """Add one generated token id.

        Args:
            token_id: The id.

        Returns:
            The text that is now final (possibly "").
        """
        if token_id in self._skip:
            return ""
        self._ids.append(int(token_id))
        text = self._decode(self._ids)
        prefix_kept = text.startswith(self._prefix_text)  # else a decoder rewrote the prefix: wait for context
        if (prefix_kept and self._settled(text)) or len(self._ids) - self._read >= self.max_pending:
            return self._advance(text)
        return ""

    def _settled(self, text: str) -> bool:
        """Whether the window's text ends with a whole character that later tokens cannot change."""
        if text.endswith("\ufffd"):
            return False
        if not self._bytes or self._ids[-1] not in self._bytes:
            return True
        # A later byte could still make the run invalid; only a long valid run is emitted anyway.
        run = next((k for k, i in enumerate(reversed(self._ids)) if i not in self._bytes), len(self._ids))
        return run >= self.max_byte_run

    def _advance(self, text: str) -> str:
        """Emit what follows the prefix, and make the pending tokens the next window's prefix."""
        delta = text[len(commonprefix([text, self._prefix_text])):]
        self._ids = self._ids[self._read:]
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        return self._clean(delta)

    def flush(self) -> str:
        """Return whatever is still held back, and reset the detokenizer for a new stream."""
        text = self._decode(self._ids)
        delta = self._clean(text[len(commonprefix([text, self._prefix_text])):], final=True)
        self._ids, self._read, self._prefix_text = [], 0, ""
        return delta
