"""Constrained decoding: a row's output follows a JSON schema, a regex, or a Lark/GBNF grammar.

A `Constraint` says what a row must produce; `Grammars` (one per tokenizer, cached) compiles it with llguidance into
a `ConstrainedRow`, the row's logits hook: before each sampling it masks every token the grammar forbids at this
point (the token mask is computed from the tokenizer's vocabulary, which llguidance indexes once per tokenizer), and
the engine passes it each accepted token (`accept`) so the grammar's state follows the text. Where the grammar
forces the next tokens whatever the model says (a fixed key of a schema), `take_tokens` gives them to the engine right
after the sampled one, so they cost no decode step of their own. When the grammar is
complete only the end-of-sequence tokens stay allowed, so the row stops; a row that reaches its token limit first
ends with finish reason "length" and its text is a prefix of a valid output, not a valid output.

Rows with different constraints (and different adapters) share a batch: each carries its own matcher.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from nomoat.generate.sampling import SamplingParams
from nomoat.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

ConstraintKind = Literal["json_schema", "json", "regex", "grammar"]
MAX_CACHED_GRAMMARS = 256  # compiled grammar texts kept per tokenizer (least recently used dropped)


class ConstraintError(ValueError):
    """A schema, regex or grammar that cannot be compiled (the message says why)."""


@dataclass(frozen=True)
class Constraint:
    """What a row must generate.

    Attributes:
        kind: "json_schema" (`value` is the schema, a dict or its JSON text), "json" (any JSON object; `value`
            unused), "regex" (`value` is a regular expression the whole output matches), or "grammar" (`value` is a
            Lark grammar as llguidance reads it, or a GBNF grammar, recognised by its `::=` rules; start rule
            `start`, or `root` for GBNF).
        value: The schema, regex or grammar.
        strict: For a JSON schema: refuse schema features the grammar cannot enforce instead of ignoring them.
    """

    kind: ConstraintKind
    value: Any = None
    strict: bool = False

    def key(self) -> str:
        """A stable text naming this constraint (the compiled-grammar cache's key)."""
        value = self.value if isinstance(self.value, str) or self.value is None else json.dumps(self.value,
                                                                                                 sort_keys=True)
        return f"{self.kind}\x00{int(self.strict)}\x00{value}"


def compact(schema: dict[str, Any], lenient: bool = False) -> dict[str, Any]:
    """The schema with llguidance's options set: JSON without optional whitespace, and maybe lenient.

    Lenient: schema features the grammar cannot enforce are ignored instead of refused.
    """
    options = {"whitespace_flexible": False, **({"lenient": True} if lenient else {})}
    return {**schema, "x-guidance": {**options, **schema.get("x-guidance", {})}}


def grammar_text(constraint: Constraint) -> str:
    """The llguidance grammar (its JSON form) of a constraint.

    Raises:
        ConstraintError: The schema is not JSON, or the kind is unknown.
    """
    import llguidance

    kind, value = constraint.kind, constraint.value
    if kind == "json_schema":
        schema = json.loads(value) if isinstance(value, str) else value
        if not isinstance(schema, dict):
            raise ConstraintError("a JSON schema must be a JSON object")
        return llguidance.LLMatcher.grammar_from_json_schema(compact(schema, lenient=not constraint.strict))
    if kind == "json":
        return llguidance.LLMatcher.grammar_from_json_schema(compact({"type": "object"}))
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(str(value))
    if kind == "grammar":
        text = str(value)
        if "::=" in text:  # GBNF (llama.cpp's format)
            from llguidance.gbnf_to_lark import GbnfToLarkError, gbnf_to_lark

            try:
                text = gbnf_to_lark(text)
            except GbnfToLarkError as e:
                raise ConstraintError(f"cannot read the GBNF grammar: {e}") from None
        return llguidance.LLMatcher.grammar_from_lark(text)
    raise ConstraintError(f"unknown constraint kind {kind!r}")


class Grammars:
    """llguidance's index of one tokenizer's vocabulary, and the grammars compiled against it (cached).

    Build one per tokenizer with `Grammars.of(tokenizer, vocab_size)`: indexing the vocabulary takes about half a
    second for 49k tokens; compiling a grammar takes about a millisecond and is cached by the constraint's text.
    """

    _instances: dict[tuple[int, int], tuple[Tokenizer, Grammars]] = {}
    _lock = threading.Lock()

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        import llguidance

        backend = tokenizer.backend
        # Ids past the tokenizer's own vocabulary (padding rows of the embedding) are never allowed.
        self.vocab_size = vocab_size
        self.eos_ids = list(tokenizer.eos_token_ids)
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else (self.eos_ids or [0])[0]
        self.lltok = llguidance.LLTokenizer(backend.to_str(), n_vocab=max(vocab_size, backend.get_vocab_size()),
                                            eos_token=eos)  # fmt: skip
        self._grammars: OrderedDict[str, str] = OrderedDict()
        self._compile_lock = threading.Lock()

    @classmethod
    def of(cls, tokenizer: Tokenizer, vocab_size: int) -> Grammars:
        """The shared instance for this tokenizer object and logits width (made on first use)."""
        key = (id(tokenizer), vocab_size)
        with cls._lock:
            found = cls._instances.get(key)
            if found is None or found[0] is not tokenizer:  # (an id can be reused once a tokenizer is gone)
                found = cls._instances[key] = (tokenizer, cls(tokenizer, vocab_size))
            return found[1]

    def grammar(self, constraint: Constraint) -> str:
        """The compiled grammar text of `constraint` (cached)."""
        key = constraint.key()
        with self._compile_lock:
            text = self._grammars.get(key)
            if text is not None:
                self._grammars.move_to_end(key)
                return text
        try:
            text = grammar_text(constraint)
        except (ValueError, TypeError) as e:  # json errors, llguidance's parse errors
            raise ConstraintError(f"cannot compile the {constraint.kind}: {e}") from None
        with self._compile_lock:
            self._grammars[key] = text
            while len(self._grammars) > MAX_CACHED_GRAMMARS:
                self._grammars.popitem(last=False)
        return text

    def row(self, constraint: Constraint) -> ConstrainedRow:
        """A fresh matcher for one row (a request's logits hook).

        Raises:
            ConstraintError: The constraint does not compile.
        """
        import llguidance

        matcher = llguidance.LLMatcher(self.lltok, self.grammar(constraint))
        if matcher.is_error():
            raise ConstraintError(f"cannot compile the {constraint.kind}: {matcher.get_error()}")
        return ConstrainedRow(matcher, self.vocab_size, self.eos_ids)


class ConstrainedRow:
    """One row's grammar state, as a logits hook: `hook(logits)` masks, `hook.accept(token)` advances.

    Args:
        matcher: The row's llguidance matcher.
        vocab_size: Width of the logits.
        eos_ids: Tokens that end generation; only these stay allowed once the grammar is complete or broken.
    """

    def __init__(self, matcher: Any, vocab_size: int, eos_ids: Sequence[int]) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.eos_ids = list(eos_ids)
        self._bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)  # llguidance's bitmask, 32 tokens a word
        self.mask_seconds = 0.0  # time spent computing masks (for benchmarks)
        self.masks = 0

    def allowed(self) -> torch.Tensor:
        """The tokens allowed next, as a bool tensor (V,)."""
        if self.matcher.is_error():
            out = torch.zeros(self.vocab_size, dtype=torch.bool)
            out[self.eos_ids] = True
            return out
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: self.vocab_size]
        return torch.from_numpy(bits.astype(bool))

    def __call__(self, logits: torch.Tensor) -> None:
        """Set the logits (V,) of forbidden tokens to -inf, in place."""
        t0 = time.perf_counter()
        allowed = self.allowed().to(logits.device)
        self.mask_seconds += time.perf_counter() - t0
        self.masks += 1
        logits.masked_fill_(~allowed, float("-inf"))

    def accept(self, token: int) -> None:
        """Advance the grammar past the sampled `token` (an illegal one leaves it broken: only EOS follows)."""
        if not self.matcher.is_error() and not self.matcher.consume_token(token):
            logger.warning("constrained decoding: token %d was not allowed (%s)", token, self.matcher.get_error())

    def forced_tokens(self) -> list[int]:
        """Tokens the grammar forces next, whatever the model says (empty when there is a choice)."""
        return [] if self.matcher.is_error() else list(self.matcher.compute_ff_tokens())

    @property
    def done(self) -> bool:
        """Whether the grammar is complete (only the end of the output may follow)."""
        return self.matcher.is_stopped() or (self.matcher.is_accepting() and not self.matcher.is_error())


class HookChain:
    """Several logits hooks applied in order (e.g. a logit bias, then a grammar mask); `accept` reaches all."""

    def __init__(self, hooks: Sequence[Any]) -> None:
        self.hooks = [h for h in hooks if h is not None]

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Pass the logits (V,) through every hook."""
        for hook in self.hooks:
            out = hook(logits)
            if out is not None:
                logits = out
        return logits

    def accept(self, token: int) -> None:
        """Tell every hook that has state which token was sampled."""
        for hook in self.hooks:
            accept = getattr(hook, "accept", None)
            if accept is not None:
                accept(token)


class LogitBias:
    """OpenAI's `logit_bias`: add a bias to some tokens' logits (-100 bans a token, +100 all but forces it)."""

    def __init__(self, bias: dict[int, float], vocab_size: int) -> None:
        ids = [t for t in bias if 0 <= t < vocab_size]
        self.ids = torch.tensor(ids, dtype=torch.long)
        self.values = torch.tensor([float(bias[t]) for t in ids], dtype=torch.float32)

    def __call__(self, logits: torch.Tensor) -> None:
        """Add the biases to the logits (V,), in place."""
        logits[self.ids.to(logits.device)] += self.values.to(logits.device)


def _grammar_of(hook: Any) -> ConstrainedRow | None:
    """The grammar state among a row's logits hooks (a `ConstrainedRow` alone or in a `HookChain`), if any."""
    hooks = hook.hooks if isinstance(hook, HookChain) else [hook]
    return next((h for h in hooks if isinstance(h, ConstrainedRow)), None)


def take_tokens(hook: Any, token: int, params: SamplingParams, fast_forward: bool = True) -> Iterator[int]:
    """The tokens a row takes in one step: the sampled `token`, then those its grammar forces after it.

    Each token is passed to the hook's `accept` (if it has one) before it is yielded; the forced tokens are read once
    the sampled one is accepted, and only if the caller asks for the next token (a row that has just finished does
    not). Rows that return logprobs or apply penalties take no forced tokens: a forced token has no sampled
    distribution to report, and penalties count the sampled history.

    Args:
        hook: The row's logits hook (None: no grammar, so nothing is forced).
        token: The token sampled for the row.
        params: The row's sampling parameters.
        fast_forward: Whether forced tokens are taken at all.
    """
    accept = getattr(hook, "accept", None)
    if accept is not None:
        accept(token)
    yield token
    grammar = _grammar_of(hook) if fast_forward else None
    if grammar is None or params.logprobs or params.has_penalties:
        return
    for forced in grammar.forced_tokens():
        accept(forced)  # type: ignore[misc]  # (a hook holding a grammar accepts tokens)
        yield forced
