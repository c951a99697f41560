"""`compare`: the base model and several adapters side by side on several data files, as a `Report` (`nomoat eval`).

One `Columns` serves every file and metric, so the base model is loaded once. `detect_kind` reads a file's first
record unless the kind is given: `choices` makes it multiple choice, `answer` with `prompt` or `messages` a task file,
anything else is scored by perplexity (any format `nomoat.data` reads).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from nomoat.data import DataError, load_dataset
from nomoat.data.formats import RecordError
from nomoat.data.loading import _expand, read_records
from nomoat.eval.columns import AdapterSpec, Columns, normalise_adapters
from nomoat.eval.items import DEFAULT_KEYS, load_task_items
from nomoat.eval.perplexity import default_max_length, evaluate_perplexity, tokenize_for_perplexity
from nomoat.eval.report import MetricRow, Report
from nomoat.eval.tasks import evaluate_tasks
from nomoat.tokenizer import Tokenizer

__all__ = ["KINDS", "Progress", "compare", "detect_kind"]

KINDS = ("auto", "perplexity", "tasks", "choice")
# progress(description, total) -> advance(n): how the caller shows progress (the CLI: a rich progress bar).
Progress = Callable[[str, int], Callable[[int], None]]


def detect_kind(path: str | Path) -> str:
    """The kind of a data file from its first record: "choice", "tasks" or "perplexity".

    Raises:
        DataError: The file cannot be read, or holds no record.
    """
    path = _expand(path)[0]  # a folder: its first data file
    for entry in itertools.islice(read_records(path), 20):
        if isinstance(entry, RecordError) or not isinstance(entry[1], Mapping):
            continue
        keys = set(entry[1])
        if keys and keys <= set(DEFAULT_KEYS):  # a defaults line of a task file
            return "tasks"
        if "choices" in keys:
            return "choice"
        if "answer" in keys and ("prompt" in keys or "messages" in keys):
            return "tasks"
        return "perplexity"
    raise DataError(f"{path}: no records to evaluate")


def compare(
    model: nn.Module,
    tokenizer: Tokenizer,
    data: Sequence[str | Path],
    adapters: Mapping[str, AdapterSpec] | None = None,
    kind: str = "auto",
    limit: int | None = None,
    max_new_tokens: int = 64,
    system: str | None = None,
    chat: bool | None = None,
    match: str | None = None,
    max_length: int | None = None,
    max_running: int = 8,
    model_name: str = "",
    progress: Progress | None = None,
    merge: bool = False,
) -> Report:
    """Evaluate the base model and each adapter on each data file.

    Args:
        model: The base model.
        tokenizer: Its tokenizer.
        data: Data files: task items (JSONL `{"prompt", "answer"}` or `{"prompt", "choices", "answer"}`), or
            text/chat data for perplexity.
        adapters: `{name: folder or (folder, weight)}`; each is a column next to "base".
        kind: "auto" (per file, see `detect_kind`), "perplexity", "tasks" (generation and choice items) or
            "choice" (multiple-choice items only).
        limit: Use at most this many items (records) per file.
        max_new_tokens: Most tokens generated per answer.
        system: A system prompt for task items without their own.
        chat: Prompt task items through the chat template (default: when the tokenizer has one).
        match: The default match mode of generation items (items and defaults lines override it).
        max_length: Longest sequence scored for perplexity (default: the model's context, at most 2048).
        max_running: Requests the engine decodes together.
        model_name: How to name the base model in the report.
        progress: See `Progress`.
        merge: Merge each adapter into the base weights for its turn (generation and scoring) instead of
            decoding it from the engine's bank and scoring it in `LoRALinear` layers.

    Returns:
        The report (rows of metrics, per-item details).

    Raises:
        DataError: A bad file or record (with file:line and what to do).
        AdapterError: An adapter that does not fit the model.
        ValueError: An unknown kind, or an adapter named "base".
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    specs = normalise_adapters(adapters)
    plan = []  # read and validate every file before the first forward pass: data errors surface at once
    for file in data:
        file_kind = detect_kind(file) if kind == "auto" else kind
        if file_kind == "perplexity":
            dataset = load_dataset(file, limit=limit)
            length = max_length or default_max_length(model)
            plan.append((Path(file), file_kind, tokenize_for_perplexity(dataset.examples, tokenizer, length)))
        else:
            items = load_task_items(file, match=match, limit=limit)
            if file_kind == "choice":
                bad = [f"{i.source}: not a multiple-choice item (no \"choices\"); use --kind tasks for generation "
                       "items" for i in items if i.kind != "choice"]  # fmt: skip
                if bad:
                    raise DataError(bad[:10], more=len(bad) > 10)
            plan.append((Path(file), file_kind, items))
    with Columns(model, tokenizer, specs, max_running=max_running, merge=merge) as columns:
        return _run(model, tokenizer, plan, columns, specs, max_new_tokens, system, chat, model_name, progress)


def _run(
    model: nn.Module,
    tokenizer: Tokenizer,
    plan: list[tuple[Path, str, Any]],
    columns: Columns,
    specs: Mapping[str, tuple[Path, float]],
    max_new_tokens: int,
    system: str | None,
    chat: bool | None,
    model_name: str,
    progress: Progress | None,
) -> Report:
    report = Report(model_name, list(columns.names),
                    adapters={n: {"folder": str(f), "weight": w} for n, (f, w) in specs.items()})  # fmt: skip
    for path, file_kind, payload in plan:
        total = len(payload) * len(columns.names)
        advance = progress(f"{path.name} ({file_kind})", total) if progress else None
        if file_kind == "perplexity":
            _perplexity_rows(report, model, tokenizer, columns, path, payload, advance)
        else:
            result = evaluate_tasks(model, tokenizer, payload, columns, max_new_tokens=max_new_tokens, system=system,
                                    chat=chat, progress=advance)  # fmt: skip
            for metric, values in result.metrics.items():
                n = sum(r.item.kind == ("generate" if metric == "accuracy" else "choice") for r in result.items)
                if n:
                    report.rows.append(MetricRow(path.name, file_kind, metric, n, values))  # type: ignore[arg-type]
            report.details[path.name] = result.to_dict()["items"]
    return report


def _perplexity_rows(
    report: Report,
    model: nn.Module,
    tokenizer: Tokenizer,
    columns: Columns,
    path: Path,
    tokenized: list[Any],
    advance: Callable[[int], None] | None,
) -> None:
    results = evaluate_perplexity(model, tokenizer, tokenized, columns, progress=advance)
    first = next(iter(results.values()))
    report.rows.append(MetricRow(path.name, "perplexity", "perplexity", first.tokens,
                                 {n: r.perplexity for n, r in results.items()}, higher_is_better=False))  # fmt: skip
    report.details[path.name] = {n: r.to_dict() for n, r in results.items()}
