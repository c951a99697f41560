"""What a tokenized dataset looks like (`summarize` -> `DataSummary`): counts, lengths, a histogram, what was cut."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from nomoat.data.loading import Dataset
from nomoat.data.render import Tokenized

__all__ = ["DataSummary", "summarize"]


@dataclass
class DataSummary:
    """Statistics of a tokenized dataset.

    Attributes:
        format: The dataset format.
        examples: Examples read from the files.
        sequences: Tokenized sequences kept (a long text gives several).
        tokens: Tokens in the kept sequences.
        trainable_tokens: Tokens that carry a loss.
        min_length: Shortest kept sequence, in tokens.
        mean_length: Mean kept sequence length.
        max_length: Longest kept sequence.
        max_allowed: The `max_length` the examples were tokenized with.
        truncated: Kept sequences whose end was cut off at `max_allowed`.
        dropped: Examples that ended with no trainable token (e.g. the answer fell past `max_allowed`).
        histogram: `(low, high, count)` buckets of sequence lengths, `low <= length < high`.
        files: The files read (`path`, `sha256`, `records`).
        warnings: Non-fatal data problems found while loading, and the first examples dropped (located).
    """

    format: str
    examples: int
    sequences: int
    tokens: int
    trainable_tokens: int
    min_length: int
    mean_length: float
    max_length: int
    max_allowed: int
    truncated: int
    dropped: int
    histogram: list[tuple[int, int, int]] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (e.g. for the run's metadata)."""
        out = asdict(self)
        out["histogram"] = [list(b) for b in self.histogram]
        return out

    def render(self, console: Any) -> None:
        """Print a table and a text histogram on a `rich` console."""
        from rich.table import Table

        table = Table(title=f"Dataset ({self.format})", show_header=False)
        table.add_column("what")
        table.add_column("value", justify="right")
        rows = [
            ("examples", f"{self.examples:,}"),
            ("sequences", f"{self.sequences:,}"),
            ("tokens", f"{self.tokens:,}"),
            ("trainable tokens", f"{self.trainable_tokens:,} ({self.trainable_tokens / max(self.tokens, 1):.0%})"),
            ("length min / mean / max", f"{self.min_length} / {self.mean_length:.1f} / {self.max_length}"),
            (f"truncated at {self.max_allowed}", f"{self.truncated:,}"),
            ("dropped (nothing to train)", f"{self.dropped:,}"),
        ]
        for row in rows:
            table.add_row(*row)
        console.print(table)
        top = max((c for _, _, c in self.histogram), default=0)
        for lo, hi, count in self.histogram:
            bar = "█" * round(30 * count / top) if top else ""
            console.print(f"{lo:>7}-{hi - 1:<7} {bar} {count:,}", markup=False, highlight=False)
        for w in self.warnings[:5]:
            console.print(f"warning: {w}", markup=False, highlight=False)
        if len(self.warnings) > 5:
            console.print(f"warning: ... and {len(self.warnings) - 5} more", markup=False, highlight=False)


def _histogram(lengths: Sequence[int], max_allowed: int, buckets: int = 8) -> list[tuple[int, int, int]]:
    width = max(1, -(-max_allowed // buckets))  # ceil
    counts = [0] * buckets
    for n in lengths:
        counts[min(n // width, buckets - 1)] += 1
    last = max(buckets * width, max_allowed + 1)  # the last bucket holds max_allowed (and anything longer)
    return [(i * width, (i + 1) * width if i < buckets - 1 else last, c) for i, c in enumerate(counts)]


def summarize(dataset: Dataset, tokenized: Sequence[Tokenized], max_length: int) -> DataSummary:
    """Summarize a dataset and its tokenized sequences.

    Args:
        dataset: What `load_dataset` returned.
        tokenized: The sequences (from `tokenize_dataset`, or all `tokenize_example` results: sequences with no
            trainable token are counted as dropped).
        max_length: The length limit used when tokenizing.
    """
    kept = [t for t in tokenized if t.num_label_tokens]
    kept_sources = {t.source for t in kept}
    dropped = [e.source for e in dataset.examples if e.source not in kept_sources]
    cut = {t.source for t in tokenized if t.truncated}
    notes = [f"{src}: longer than {max_length} tokens (--seq-len): cut there, it kept no token to train on and was "
             "dropped (raise --seq-len or shorten it)" if src in cut else
             f"{src}: no token to train on (see --train-on): dropped" for src in dropped[:20]]  # fmt: skip
    lengths = [len(t) for t in kept]
    return DataSummary(
        format=dataset.format,
        examples=len(dataset.examples),
        sequences=len(kept),
        tokens=sum(lengths),
        trainable_tokens=sum(t.num_label_tokens for t in kept),
        min_length=min(lengths, default=0),
        mean_length=sum(lengths) / len(lengths) if lengths else 0.0,
        max_length=max(lengths, default=0),
        max_allowed=max_length,
        truncated=sum(t.truncated for t in kept),
        dropped=len(dropped),
        histogram=_histogram(lengths, max_length),
        files=list(dataset.files),
        warnings=list(dataset.warnings) + notes,
    )
