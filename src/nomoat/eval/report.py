"""A comparison's results (`Report` of `MetricRow`s): a rich table, JSON, a grouped bar chart (PNG, matplotlib)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nomoat.util.files import atomic_write_json

__all__ = ["MetricRow", "Report", "plot_report", "print_report", "write_json"]


@dataclass
class MetricRow:
    """One metric on one data file, for every column.

    Attributes:
        data: The data file's name.
        kind: "perplexity", "tasks" or "choice".
        metric: "perplexity", "accuracy", "acc" or "acc_norm".
        n: Items (tasks) or label tokens (perplexity) it is measured on.
        values: Column -> value.
        higher_is_better: False for perplexity.
    """

    data: str
    kind: str
    metric: str
    n: int
    values: dict[str, float]
    higher_is_better: bool = True

    def delta(self, column: str, reference: str = "base") -> float | None:
        """`values[column] - values[reference]` (None when either is missing)."""
        a, b = self.values.get(column), self.values.get(reference)
        return None if a is None or b is None else a - b


@dataclass
class Report:
    """Everything `nomoat eval` measured.

    Attributes:
        model: The base model (its folder).
        columns: "base" and the adapters' names, in order.
        rows: One row per (data file, metric).
        details: Data file -> per-item records (tasks) or per-column summaries (perplexity).
        adapters: Adapter name -> its folder and weight.
    """

    model: str
    columns: list[str]
    rows: list[MetricRow] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    adapters: dict[str, Any] = field(default_factory=dict)

    def value(self, data: str, metric: str, column: str) -> float | None:
        """One value, e.g. `report.value("qa.jsonl", "accuracy", "sql")`."""
        for row in self.rows:
            if row.data == data and row.metric == metric:
                return row.values.get(column)
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: model, columns, adapters, results (rows) and details."""
        return {"model": self.model, "columns": self.columns, "adapters": self.adapters,
                "results": [asdict(r) for r in self.rows], "details": self.details}  # fmt: skip


def _fmt(row: MetricRow, value: float | None) -> str:
    if value is None:
        return "-"
    if row.metric == "perplexity":
        return f"{value:.3f}" if value < 1000 else f"{value:.4g}"
    return f"{100 * value:.1f}%"


def _fmt_delta(row: MetricRow, delta: float) -> str:
    if row.metric == "perplexity":
        return f"{delta:+.3f}" if abs(delta) < 1000 else f"{delta:+.4g}"
    return f"{100 * delta:+.1f}"


def print_report(report: Report, console: Any = None) -> None:
    """Print the results as a table: a row per (data, metric), a column per model, deltas against the base.

    Args:
        report: The results.
        console: A `rich.console.Console` (default: a new one on stdout).
    """
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"nomoat eval: {report.model}")
    for name, justify in (("data", "left"), ("metric", "left"), ("n", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for column in report.columns:
        table.add_column(column, justify="right")
    for row in report.rows:
        finite = [v for v in row.values.values() if v is not None and math.isfinite(v)]
        best = (max(finite) if row.higher_is_better else min(finite)) if finite else None
        cells = []
        for column in report.columns:
            value = row.values.get(column)
            text = _fmt(row, value)
            if len(report.columns) > 1 and value == best:
                text = f"[bold]{text}[/bold]"
            delta = row.delta(column) if column != "base" else None
            if delta is not None and math.isfinite(delta):
                better = delta > 0 if row.higher_is_better else delta < 0
                colour = "green" if better else "red" if delta != 0 else "dim"
                text += f" [{colour}]({_fmt_delta(row, delta)})[/{colour}]"
            cells.append(text)
        arrow = "" if row.higher_is_better else " (lower=better)"
        table.add_row(row.data, row.metric + arrow, str(row.n), *cells)
    console.print(table)


def write_json(report: Report, path: str | Path) -> Path:
    """Write `report.to_dict()` as indented JSON (NaN and infinities as null); returns the path."""
    path = Path(path)

    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    atomic_write_json(path, clean(report.to_dict()), ensure_ascii=False)
    return path


def plot_report(report: Report, path: str | Path) -> Path:
    """Save a grouped bar chart: a group of bars per (data, metric), a bar per column.

    Accuracies (0 to 100%) and perplexities (lower is better) get separate panels. Returns the path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    panels = [
        (title, [r for r in report.rows if (r.metric == "perplexity") == is_ppl])
        for title, is_ppl in (("accuracy (higher is better)", False), ("perplexity (lower is better)", True))
    ]
    panels = [(t, rows) for t, rows in panels if rows]
    groups = max([len(rows) for _, rows in panels] or [1])
    size = (max(6.0, 1.2 * groups * (1 + 0.3 * len(report.columns))), 3.6 * max(1, len(panels)))
    fig, axes = plt.subplots(max(1, len(panels)), 1, figsize=size, squeeze=False)
    width = 0.8 / max(1, len(report.columns))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, rows) in zip(axes[:, 0], panels):
        for j, column in enumerate(report.columns):
            xs = [i + (j - (len(report.columns) - 1) / 2) * width for i in range(len(rows))]
            ys = [r.values.get(column) for r in rows]
            ys = [(100 * y if r.metric != "perplexity" else y) if y is not None and math.isfinite(y) else 0.0
                  for r, y in zip(rows, ys)]  # fmt: skip
            bars = ax.bar(xs, ys, width, label=column, color=colours[j % len(colours)])
            ax.bar_label(bars, fmt="%.1f" if rows[0].metric != "perplexity" else "%.2f", fontsize=7, padding=1)
        ax.set_xticks(range(len(rows)), [f"{r.data}\n{r.metric}" for r in rows], fontsize=8)
        ax.set_title(title, fontsize=10)
        if rows[0].metric != "perplexity":
            ax.set_ylim(0, 110)
            ax.set_ylabel("%")
        ax.legend(fontsize=8, ncols=min(4, len(report.columns)))
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"nomoat eval: {Path(report.model).name}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
