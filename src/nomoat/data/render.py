"""Turn examples into token ids and labels, masking what the model should not learn to produce.

`tokenize_example` / `tokenize_dataset` give `Tokenized` sequences (`tokenize_preference` a chosen/rejected pair);
`assistant_spans` locates the trained characters of a conversation. Labels follow transformers: as long as
`input_ids`, the id where trained and `IGNORE_INDEX` (-100) elsewhere, unshifted (the loss shifts), and `labels[0]`
is always masked, which is what makes packing examples into one row safe. With `train_on="assistant"` each assistant
turn's content and the template's end-of-turn marker after it are trained (the model must learn to stop), and the ids
are exactly `apply_chat_template(messages, tokenize=True)`: spans are mapped to tokens through the offsets of the
whole rendered text.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from os.path import commonprefix
from typing import Any

from nomoat.data.formats import Conversation, DataError, Example, NoTrainableTokensError, Preference, Source, Text
from nomoat.tokenizer import ChatTemplateError, Tokenizer
from nomoat.tokenizer.tool_calls import template_messages

__all__ = [
    "DEFAULT_CHAT_TEMPLATE", "IGNORE_INDEX", "TRAIN_ON", "Tokenized", "assert_has_labels", "assistant_spans",
    "tokenize_dataset", "tokenize_example", "tokenize_preference",
]

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
TRAIN_ON = ("assistant", "all", "last")
# ChatML, used (with a warning) for models without a chat template. Save it with the adapter so that inference
# formats prompts the same way.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_warned_default: set[int] = set()
_special_cache: weakref.WeakKeyDictionary[Tokenizer, tuple[str, ...]] = weakref.WeakKeyDictionary()


@dataclass
class Tokenized:
    """One tokenized training sequence.

    Attributes:
        input_ids: Token ids.
        labels: Same length; the id where trained, `IGNORE_INDEX` where masked (not shifted; labels[0] is masked).
        truncated: The example was longer than `max_length` and its end was cut off.
        source: Where the example comes from.
    """

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    source: Source | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_label_tokens(self) -> int:
        """How many tokens carry a loss."""
        return sum(label != IGNORE_INDEX for label in self.labels)


def _specials(tokenizer: Tokenizer) -> tuple[str, ...]:
    """Special token strings (added tokens flagged special, and the named ones), longest first."""
    if tokenizer not in _special_cache:
        added = [t.content for t in tokenizer.backend.get_added_tokens_decoder().values() if t.special]
        names = {*added, *tokenizer.all_special_tokens}
        _special_cache[tokenizer] = tuple(sorted((s for s in names if s), key=len, reverse=True))
    return _special_cache[tokenizer]


def _template(tokenizer: Tokenizer, chat_template: str | None) -> str:
    if chat_template is not None:
        return tokenizer.chat_templates.get(chat_template, chat_template)
    if tokenizer.chat_templates:
        return tokenizer.get_chat_template()
    if id(tokenizer) not in _warned_default:
        _warned_default.add(id(tokenizer))
        log.warning("The tokenizer has no chat template; formatting conversations with ChatML "
                    "(<|im_start|>role\\n...<|im_end|>). Use the same template at inference.")
    return DEFAULT_CHAT_TEMPLATE


def _render(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], template: str, source: Any,
            add_generation_prompt: bool = False, tools: list[dict[str, Any]] | None = None) -> str:
    try:  # tool calls' arguments as objects, as templates (and transformers) expect them
        out = tokenizer.apply_chat_template(template_messages(messages), add_generation_prompt=add_generation_prompt,
                                            chat_template=template, tools=tools)  # fmt: skip
    except (ChatTemplateError, ValueError, TypeError) as e:
        where = f"{source}: " if source else ""
        raise DataError(f"{where}the chat template rejected this conversation: {e}") from None
    assert isinstance(out, str)
    return out


def _describe(template: str) -> str:
    first = " ".join(template.split())[:70]
    return f"the chat template starting {first!r}"


def assistant_spans(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, str]],
    chat_template: str | None = None,
    source: Any = None,
    tools: list[dict[str, Any]] | None = None,
) -> tuple[str, list[tuple[int, int, int]]]:
    """Render a conversation and find each assistant turn's trainable character span.

    Args:
        tokenizer: The tokenizer (its chat template, or ChatML when it has none).
        messages: The conversation.
        chat_template: A template (or the name of one of the tokenizer's) to use instead.
        source: Where the conversation comes from, for error messages.
        tools: Function definitions the template renders (an assistant turn with `tool_calls` is trained from its
            start to the last special token of the turn: the calls in the template's own format and its end).

    Returns:
        The rendered text and `(message_index, start, end)` character spans, one per assistant message.

    Raises:
        DataError: The template rejects the conversation, or renders it inconsistently when cut before an
            assistant turn (then the trained part cannot be located).
    """
    template = _template(tokenizer, chat_template)
    full = _render(tokenizer, messages, template, source, tools=tools)
    specials = _specials(tokenizer)
    where = f"{source}: " if source else ""
    spans = []
    # A turn's span starts where the generation prompt of `messages[:i]` ends and stops after the first special token
    # past its content (`_end_of_turn`); whitespace after that marker is never generated, so it is never trained.
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        content = message["content"].strip()
        if i == 0:  # nothing before it to render: locate the content itself
            start = max(full.find(content), 0)
        else:
            prompt = _render(tokenizer, messages[:i], template, source, add_generation_prompt=True, tools=tools)
            if not full.startswith(prompt):
                raise DataError(
                    f"{where}{_describe(template)} does not render the conversation up to assistant turn {i} as a "
                    "prefix of the whole conversation, so the assistant's tokens cannot be located. Use "
                    "train_on='all', or a chat template that renders earlier turns the same way in both cases."
                )
            start = len(prompt)
        turn = _render(tokenizer, messages[: i + 1], template, source, tools=tools)[start:]
        at = turn.find(content) if content else -1
        content_end = at + len(content) if at >= 0 else 0
        end = _end_of_calls(turn, specials) if message.get("tool_calls") else _end_of_turn(turn, content_end, specials)
        if not full.startswith(turn[:end], start):
            # The turn rendered alone differs after the content (e.g. an end-of-conversation token): keep the
            # common part, cut back to whitespace so that no half token is kept.
            common = commonprefix([full[start:], turn])
            if len(common) < content_end:
                raise DataError(f"{where}{_describe(template)} renders assistant turn {i} differently when it is "
                                "last; the assistant's tokens cannot be located. Use train_on='all'.")
            cut = max(common.rfind(c) for c in " \n\t\r")
            common = common[:cut] if cut >= content_end else common
            end = max(len(common.rstrip()), content_end)
        spans.append((i, start, start + end))
    return full, spans


def _end_of_calls(turn: str, specials: Sequence[str]) -> int:
    """Where a rendered assistant turn with tool calls ends: after its last special token.

    The calls may be wrapped in special tokens of their own (`<tool_call>`, `<|python_tag|>`), so the first one
    after the content is not the end of the turn.
    """
    body = turn.rstrip()
    hits = [(pos + len(s), len(s)) for s in specials if (pos := body.rfind(s)) >= 0]
    return max(hits)[0] if hits else len(body)


def _end_of_turn(turn: str, content_end: int, specials: Sequence[str]) -> int:
    """Where the trainable part of a rendered assistant turn ends: after the first special token past the content."""
    rest = turn[content_end:]
    hits = [(pos, -len(s)) for s in specials if (pos := rest.find(s)) >= 0]
    if hits:
        pos, neg_len = min(hits)
        return content_end + pos - neg_len
    return content_end + len(rest.rstrip())


def _labels_from_spans(ids: list[int], offsets: list[tuple[int, int]], spans: Iterable[tuple[int, int]]) -> list[int]:
    """Labels: a token is trained when its characters overlap a span (a zero-width token when it lies inside)."""
    labels = [IGNORE_INDEX] * len(ids)
    spans = sorted(spans)
    for t, (a, b) in enumerate(offsets):
        for s, e in spans:
            if (a < e and b > s) if b > a else (s <= a < e):
                labels[t] = ids[t]
                break
    return labels


def _finish(ids: list[int], labels: list[int], max_length: int, source: Source | None) -> Tokenized:
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    if labels:
        labels[0] = IGNORE_INDEX  # nothing predicts the first token (and packing relies on it)
    return Tokenized(ids, labels, truncated, source)


def _conversation(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], max_length: int, train_on: str,
                  add_eos: bool | None, chat_template: str | None, source: Source | None,
                  first_trained: int = 0, tools: list[dict[str, Any]] | None = None) -> Tokenized:
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
    if add_eos is None:  # a model's own template ends turns itself; the ChatML fallback gets an eos to stop on
        add_eos = chat_template is None and not tokenizer.chat_templates
    if train_on == "all":
        text = _render(tokenizer, messages, _template(tokenizer, chat_template), source, tools=tools)
        ids, _ = tokenizer.encode_with_offsets(text)
        labels = list(ids)
    else:
        text, spans = assistant_spans(tokenizer, messages, chat_template, source, tools)
        spans = [s for s in spans if s[0] >= first_trained]
        if train_on == "last":
            spans = spans[-1:]
        ids, offsets = tokenizer.encode_with_offsets(text)
        labels = _labels_from_spans(ids, offsets, [(s, e) for _, s, e in spans])
    eos = tokenizer.eos_token_id
    if add_eos and eos is not None and (not ids or ids[-1] != eos):
        ids = [*ids, eos]
        trained = train_on == "all" or messages[-1]["role"] == "assistant"
        labels = [*labels, eos if trained else IGNORE_INDEX]
    return _finish(ids, labels, max_length, source)


def _text(tokenizer: Tokenizer, text: str, max_length: int, add_eos: bool | None,
          source: Source | None) -> list[Tokenized]:
    """Encode as bos + text + eos, every token trained, cut into windows of `max_length` (no token is thrown away)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is not None:
        ids = [bos, *ids]
    if add_eos is not False and eos is not None:
        ids = [*ids, eos]
    return [_finish(ids[i:i + max_length], list(ids[i:i + max_length]), max_length, source)
            for i in range(0, len(ids), max_length)]


def tokenize_example(
    example: Example,
    tokenizer: Tokenizer,
    max_length: int,
    train_on: str = "assistant",
    add_eos: bool | None = None,
    chat_template: str | None = None,
) -> list[Tokenized]:
    """Tokenize one example into training sequences.

    Args:
        example: A `Conversation` or `Text` (use `tokenize_preference` for a `Preference`).
        tokenizer: The model's tokenizer.
        max_length: Longest sequence. A conversation keeps its start and is marked `truncated`; a text is cut
            into several windows instead.
        train_on: For conversations: "assistant" (every assistant turn), "last" (the last assistant turn) or
            "all" (every token, template included).
        add_eos: Append the eos token. Default: yes for text, and for conversations only when the tokenizer has
            no chat template (its own template already ends turns with its end-of-turn token).
        chat_template: A template, or the name of one of the tokenizer's, instead of its default one.

    Returns:
        One `Tokenized` for a conversation, one per window for a text.

    Raises:
        DataError: The chat template rejects the conversation or renders it inconsistently.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if isinstance(example, Text):
        return _text(tokenizer, example.text, max_length, add_eos, example.source)
    if isinstance(example, Conversation):
        return [_conversation(tokenizer, example.messages, max_length, train_on, add_eos, chat_template,
                              example.source, tools=example.tools)]
    if isinstance(example, Preference):
        raise DataError(f"{example.source or 'example'}: a preference pair needs tokenize_preference (DPO), "
                        "not tokenize_example")
    raise TypeError(f"not an example: {type(example).__name__}")


def tokenize_preference(
    example: Preference,
    tokenizer: Tokenizer,
    max_length: int,
    add_eos: bool | None = None,
    chat_template: str | None = None,
) -> tuple[Tokenized, Tokenized]:
    """Tokenize a preference pair as (prompt + chosen, prompt + rejected), training only the answers.

    Args:
        example: The pair.
        tokenizer: The model's tokenizer.
        max_length: Longest sequence; longer ones keep their start and are marked `truncated`.
        add_eos: As in `tokenize_example`.
        chat_template: As in `tokenize_example`.
    """
    n = len(example.prompt)
    return tuple(  # type: ignore[return-value]
        _conversation(tokenizer, [*example.prompt, *answer], max_length, "assistant", add_eos, chat_template,
                      example.source, first_trained=n)
        for answer in (example.chosen, example.rejected)
    )


def tokenize_dataset(
    examples: Iterable[Example],
    tokenizer: Tokenizer,
    max_length: int,
    train_on: str = "assistant",
    add_eos: bool | None = None,
    chat_template: str | None = None,
) -> list[Tokenized]:
    """`tokenize_example` over many examples, dropping (with a warning) sequences left with no trained token.

    A conversation whose assistant turns all fall past `max_length` has nothing to learn from; it is dropped
    and counted (`summarize` reports the count) rather than failing the whole run.
    """
    out: list[Tokenized] = []
    dropped: list[Tokenized] = []
    for example in examples:
        for t in tokenize_example(example, tokenizer, max_length, train_on, add_eos, chat_template):
            (out if t.num_label_tokens else dropped).append(t)
    if dropped:
        where = ", ".join(str(t.source) for t in dropped[:5]) + (" ..." if len(dropped) > 5 else "")
        log.warning("dropped %d sequence(s) with no trained token after truncation to %d tokens (%s); raise "
                    "max_length (seq_len) or shorten the prompts", len(dropped), max_length, where)
    return out


def assert_has_labels(batch: Mapping[str, Any]) -> None:
    """Fail loudly when a collated batch has no token to compute a loss on.

    Args:
        batch: A `collate` output (uses `num_label_tokens`, else the `labels` tensor).

    Raises:
        NoTrainableTokensError: Every label is masked.
    """
    count = batch.get("num_label_tokens")
    if count is None:
        labels = batch["labels"]
        count = int((labels[:, 1:] != IGNORE_INDEX).sum())
    if int(count) == 0:
        raise NoTrainableTokensError(
            "this batch has no trainable token: every label is masked. With train_on='assistant' or 'last', the "
            "assistant turns must fit within max_length (seq_len): raise it, shorten the prompts, or use "
            "train_on='all'. Also check that the data has assistant answers."
        )
