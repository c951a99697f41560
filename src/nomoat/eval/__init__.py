r"""Measure what each adapter changed: perplexity, task accuracy and multiple choice, base and adapters side by side.

Python API (the base model is loaded once; every function takes `adapters={name: folder or (folder, weight)}` and
reports the base model as column `"base"` next to one column per adapter):

    >>> model, tok = nomoat.load("models/SmolLM2-135M-Instruct")
    >>> result = evaluate_tasks(model, tok, [{"prompt": "2+2=", "answer": "4", "match": "contains"}],
    ...                         adapters={"math": "runs/math/adapter"})
    >>> result.accuracy                 # {"base": 0.0, "math": 1.0}
    >>> result.items[0].predictions     # {"base": "...", "math": "4"}
    >>> score_answer(" 4\n", "4")       # True: "exact" compares after stripping whitespace
    >>> evaluate_perplexity(model, tok, load_dataset("val.jsonl").examples, adapters={...})["math"].perplexity
    >>> report = compare(model, tok, ["qa.jsonl", "val.jsonl"], adapters={...})   # what `nomoat eval` runs
    >>> print_report(report); write_json(report, "eval.json"); plot_report(report, "eval.png")

- `evaluate_tasks(model, tokenizer, items, adapters=None, max_new_tokens=64, system=None, chat=None)` ->
  `TaskResult` (`columns`, `items`: one `ItemResult` per item with `predictions`, `correct`, and for choice items
  `correct_norm` and `logprobs`; `accuracy` and `metrics` per column). Items are `TaskItem`s (`load_task_items`)
  or dicts: `{"prompt", "answer", "match": "exact"|"contains"|"regex", "system"?, "messages"?, "extract"?,
  "ignore_case"?}` generated greedily, or `{"prompt", "choices": [...], "answer": index or text}` scored by
  log-likelihood (`acc` and `acc_norm`, as lm-evaluation-harness).
- `score_answer(prediction, answer, match="exact", extract=None, ignore_case=False)` -> bool.
- `load_task_items(path, match=None, limit=None)` -> list of `TaskItem` (errors as `file:line: ...`).
- `perplexity(model, data, tokenizer)` (one model) and `evaluate_perplexity(model, tokenizer, data, adapters)`
  -> `{column: PerplexityResult}` (`perplexity`, `nll`, `tokens`): text scored on every token, chat on the
  assistant's tokens.
- `score_sequences(model, [(input_ids, labels), ...])` -> `[(sum logprob, n labels), ...]`: the batched scorer.
- `compare(model, tokenizer, files, adapters, kind="auto")` -> `Report`; `print_report`, `write_json`,
  `plot_report` show it.
- `Columns(model, tokenizer, adapters)`: the engine with all adapters loaded, shared by the calls above (pass it
  as `adapters=` to reuse it).
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
