"""Measure what each adapter changed: perplexity, task accuracy and multiple choice, base and adapters side by side.

Every entry point takes the base model once and `adapters={name: folder or (folder, weight)}`, and reports the base
as column `"base"` beside one column per adapter. `compare` (what `nomoat eval` runs) -> `Report`, shown by
`print_report`, `write_json` and `plot_report`; `evaluate_tasks` -> `TaskResult` (generation items scored by
`score_answer`, multiple choice by log-likelihood); `evaluate_perplexity` -> `{column: PerplexityResult}`;
`score_sequences` is the batched log-likelihood scorer. Item files are read by `load_task_items` (format in
`nomoat.eval.items`). A `Columns` (one engine with every adapter loaded) can be passed as `adapters=` to reuse it:

    >>> result = evaluate_tasks(model, tok, [{"prompt": "2+2=", "answer": "4"}], adapters={"math": "runs/math"})
    >>> result.accuracy  # {"base": 0.0, "math": 1.0}
"""

from nomoat.eval.columns import BASE, Column, Columns
from nomoat.eval.compare import KINDS, compare, detect_kind
from nomoat.eval.items import MATCH_MODES, TaskItem, load_task_items, parse_item, prompt_text, score_answer
from nomoat.eval.perplexity import (
    PerplexityResult,
    evaluate_perplexity,
    perplexity,
    score_sequences,
    tokenize_for_perplexity,
)
from nomoat.eval.report import MetricRow, Report, plot_report, print_report, write_json
from nomoat.eval.tasks import ItemResult, TaskResult, choice_sequences, evaluate_tasks

__all__ = [
    "BASE",
    "KINDS",
    "MATCH_MODES",
    "Column",
    "Columns",
    "ItemResult",
    "MetricRow",
    "PerplexityResult",
    "Report",
    "TaskItem",
    "TaskResult",
    "choice_sequences",
    "compare",
    "detect_kind",
    "evaluate_perplexity",
    "evaluate_tasks",
    "load_task_items",
    "parse_item",
    "perplexity",
    "plot_report",
    "print_report",
    "prompt_text",
    "score_answer",
    "score_sequences",
    "tokenize_for_perplexity",
    "write_json",
]
