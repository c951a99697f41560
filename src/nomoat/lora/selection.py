"""`AdapterSelection`: which adapters a request runs with, and the one text grammar every command parses it from.

The grammar (the CLI's `--adapter`, the server's `model` field, `nomoat eval` columns, the engine's requests):

    none                      the base model alone
    NAME                      one adapter at weight 1 (a registry or loaded name: A-Z a-z 0-9 . _ -)
    NAME:0.5                  one adapter at weight 0.5 (any finite number: -1, 2, 1e-3)
    a:1+b:0.5                 a stack: the adapters' updates are summed, each times its weight
    runs/sql/adapter:0.5      a folder path works wherever a name does (not where `paths=False`, e.g. a server)

`+` separates adapters and the last `:` of a part separates its weight. A folder path may itself contain `:` or
`+` only when it names an existing folder, and then only alone: the whole text (or the text before a final
`:WEIGHT`) is taken as one folder when such a folder exists, before anything is split. To stack such a folder,
give it on its own (`--adapter` is repeatable). `none` always means the base (write `./none` for a folder of that
name); a name may appear once per selection. `str(selection)` writes the selection back in this grammar, and
parsing it gives the same selection.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from nomoat.lora.registry import NAME_RULES, AdapterNotFoundError, Registry, validate_name
from nomoat.util.errors import InputError, UsageError

__all__ = ["BASE", "AdapterNameError", "AdapterSelection", "SelectionError", "parse_selection"]

BASE = "none"
EXAMPLES = "NAME, NAME:0.5, a:1+b:0.5, a folder path, or none for the base model"
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


class SelectionError(UsageError):
    """A selection text that does not follow the grammar (the hint says what to write instead)."""


class AdapterNameError(SelectionError):
    """A part is not an adapter name where only names are allowed (a server's `model` field)."""


def _weight_text(weight: float) -> str:
    """The shortest text that parses back to exactly `weight` (`1.0` -> `1`, `0.5` -> `0.5`)."""
    text = repr(float(weight))
    return text[:-2] if text.endswith(".0") else text


@dataclass(frozen=True)
class AdapterSelection:
    """An ordered stack of `(adapter, weight)` items; empty for the base model.

    An adapter is a name (registry, loaded, or served) or a folder path, as the user wrote it. The selection
    iterates as its `(adapter, weight)` pairs, so it goes wherever pairs are expected (the engine's requests).

    Attributes:
        items: `(adapter, weight)` pairs in order.
    """

    items: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        items = tuple((str(a), float(w)) for a, w in self.items)
        seen: set[str] = set()
        for adapter, weight in items:
            if not adapter:
                raise SelectionError("an adapter in the selection has an empty name", f"write {EXAMPLES}")
            if not math.isfinite(weight):
                raise SelectionError(f"adapter {adapter!r}: the weight {weight} is not a finite number",
                                     f"write {adapter}:0.5 (any finite number)")  # fmt: skip
            if adapter in seen:
                raise SelectionError(f"adapter {adapter!r} appears twice in the selection",
                                     f"give it once, with the summed weight ({adapter}:WEIGHT)")  # fmt: skip
            seen.add(adapter)
        object.__setattr__(self, "items", items)

    # ---- reading it -------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[str, float]]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __str__(self) -> str:
        if not self.items:
            return BASE
        return "+".join(a if w == 1.0 else f"{a}:{_weight_text(w)}" for a, w in self.items)

    @property
    def names(self) -> tuple[str, ...]:
        """The adapters, in order."""
        return tuple(a for a, _ in self.items)

    def __add__(self, other: AdapterSelection) -> AdapterSelection:
        """The two stacks one after the other (a name may still appear once)."""
        return AdapterSelection(self.items + tuple(other))

    def renamed(self, names: dict[str, str]) -> AdapterSelection:
        """The same weights with each adapter replaced by `names[adapter]` (e.g. the names an engine loaded it as)."""
        return AdapterSelection(tuple((names[a], w) for a, w in self.items))

    # ---- making one ---------------------------------------------------------------------------------------------

    @classmethod
    def of(cls, value: AdapterSelection | str | Iterable[tuple[str, float]] | None) -> AdapterSelection:
        """A selection from a selection, a text in the grammar, `(adapter, weight)` pairs, or None (the base)."""
        if value is None:
            return cls()
        if isinstance(value, AdapterSelection):
            return value
        if isinstance(value, str):
            return parse_selection(value)
        return cls(tuple(value))

    @classmethod
    def parse(cls, text: str, *, base: str | None = None, paths: bool = True,
              is_dir: Callable[[str], bool] | None = None) -> AdapterSelection:  # fmt: skip
        """Parse `text` in the grammar of the module docstring; see `parse_selection`."""
        return parse_selection(text, base=base, paths=paths, is_dir=is_dir)

    # ---- finding the folders ------------------------------------------------------------------------------------

    def folders(self, registry: Registry | None = None) -> list[tuple[Path, float]]:
        """Each adapter's folder with its weight: an existing folder as given, else the registry's adapter of that name.

        Args:
            registry: A `nomoat.lora.registry.Registry` (default: the one under `$NOMOAT_HOME`).

        Raises:
            InputError: An adapter is neither a folder nor a registry name (the message names close matches).
        """
        out = []
        for adapter, weight in self.items:
            folder = Path(adapter).expanduser()
            if not folder.is_dir():  # not a folder: a name in the adapter registry (`nomoat adapters list`)?
                if not _is_name(adapter):
                    raise InputError(f"adapter {adapter!r} not found: give the adapter folder (with "
                                     "adapter_config.json) or a registry name (`nomoat adapters list`)")  # fmt: skip
                try:
                    folder = (registry or Registry()).path(adapter)
                except AdapterNotFoundError as e:
                    raise InputError(f"adapter {adapter!r} not found: it is not a folder, and {e.message}") from None
            out.append((folder, weight))
        return out


def _is_name(text: str) -> bool:
    """Whether `text` is a valid adapter name (the registry's rule)."""
    try:
        validate_name(text)
    except ValueError:
        return False
    return True


def _is_dir(text: str) -> bool:
    try:
        return Path(text).expanduser().is_dir()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        return False


def _part(part: str, text: str, paths: bool) -> tuple[str, float]:
    """One `REF[:WEIGHT]` part of `text`."""
    if not part:
        raise SelectionError(f"adapter selection {text!r} has an empty part (two '+' in a row, or one at an end)",
                             f"write {EXAMPLES}")  # fmt: skip
    ref, sep, weight_text = part.rpartition(":")
    if not sep:
        ref, weight_text = part, ""
    elif not ref:
        raise SelectionError(f"adapter selection {text!r}: {part!r} has a weight but no adapter",
                             f"write NAME{part} ({EXAMPLES})")  # fmt: skip
    weight = 1.0
    if sep:
        if not _FLOAT.fullmatch(weight_text):
            raise SelectionError(f"adapter selection {text!r}: {weight_text!r} after the last ':' of {part!r} is "
                                 "not a weight (a number)",
                                 f"write {ref}:0.5, or give an existing folder ({EXAMPLES})")  # fmt: skip
        weight = float(weight_text)
        if not math.isfinite(weight):
            raise SelectionError(f"adapter selection {text!r}: the weight of {ref!r} is not finite",
                                 f"write {ref}:0.5 (any finite number)")  # fmt: skip
    if paths and ":" in ref:
        raise SelectionError(f"adapter selection {text!r}: {ref!r} is neither an adapter name nor an existing folder",
                             "a folder path may contain ':' or '+' only when that folder exists, and then alone "
                             "(with an optional :WEIGHT); check the path")  # fmt: skip
    if not paths and not _is_name(ref):
        raise AdapterNameError(f"{ref!r} is not an adapter name", f"an adapter name has {NAME_RULES}")
    if ref == BASE:
        raise SelectionError(f"adapter selection {text!r}: {BASE!r} (the base model) cannot be stacked or weighted",
                             f"leave it out, or write ./{BASE} for a folder of that name")  # fmt: skip
    return ref, weight


def parse_selection(text: str, *, base: str | None = None, paths: bool = True,
                    is_dir: Callable[[str], bool] | None = None) -> AdapterSelection:  # fmt: skip
    """Parse a selection written in the grammar of this module's docstring.

    Args:
        text: The selection, e.g. `sql`, `sql:0.5`, `sql:1+chat:0.5`, `runs/sql/adapter`, `none`.
        base: The base model's name where it may be written too (a server's `model` field): `base` alone is the
            base model, and a leading `base+` is dropped (`base+a:1.0+b:0.5`).
        paths: Whether folder paths are allowed; False accepts adapter names only (a server never reads a path
            that a client sends).
        is_dir: Whether a text names an existing folder (default: the file system's answer); only with `paths`.

    Returns:
        The selection (empty for the base model).

    Raises:
        SelectionError: The text breaks the grammar (the error's hint says what to write instead).
        AdapterNameError: With `paths=False`, a part is not an adapter name.
    """
    raw = text
    text = text.strip()
    if base is not None:
        if text == base:
            return AdapterSelection()
        if text.startswith(base + "+"):
            text = text[len(base) + 1 :]
    if text == BASE:
        return AdapterSelection()
    if not text:
        raise SelectionError(f"the adapter selection {raw!r} is empty", f"write {EXAMPLES}")
    if paths:
        exists = is_dir or _is_dir
        if exists(text):  # a folder, even one with ':' or '+' in its path
            return AdapterSelection(((text, 1.0),))
        head, sep, tail = text.rpartition(":")
        if sep and head and _FLOAT.fullmatch(tail) and exists(head):
            return AdapterSelection(((head, float(tail)),))
    parts = [_part(p, raw, paths) for p in text.split("+")]
    return AdapterSelection(tuple(parts))
