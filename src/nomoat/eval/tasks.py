"""Task accuracy: greedy generation scored against answers, and multiple choice by log-likelihood.

Generation items are decoded greedily by the engine, every column's requests in one continuous batch (rows with
different adapters decode together), and each completion is scored with `score_answer`.

Multiple-choice items are scored as lm-evaluation-harness does: for each choice, the sum of the log-probabilities
of its tokens given the prompt. `acc` takes the choice with the highest sum; `acc_norm` divides each sum by the
choice's length in characters first (so long options are not penalised for having more tokens). Without a chat
template the choice follows the prompt after a space (lm-evaluation-harness's target delimiter); with one, it is
the assistant's answer right after the generation prompt. Trailing whitespace of the prompt moves to the choice, and
the choice's tokens are those of `encode(prompt + choice)` past `encode(prompt)`, as lm-evaluation-harness splits
them.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from nomoat.data import IGNORE_INDEX, DataError, Source
from nomoat.eval.columns import AdapterSpec, Columns
from nomoat.eval.items import TaskItem, parse_item, prompt_ids, prompt_text, score_answer, use_chat
from nomoat.eval.perplexity import score_sequences
from nomoat.generate.engine import Completion
from nomoat.generate.sampling import SamplingParams
from nomoat.tokenizer import Tokenizer

__all__ = ["ItemResult", "TaskResult", "choice_sequences", "evaluate_tasks"]


@dataclass
class ItemResult:
    """One item's outcome in every column.

    Attributes:
        item: The item.
        predictions: Column -> generated text (generation) or the chosen choice's text (multiple choice).
        correct: Column -> right or wrong (for multiple choice: by the sum of log-probabilities, `acc`).
        correct_norm: Column -> right or wrong by length-normalised log-probability (`acc_norm`; choice items).
        logprobs: Column -> each choice's summed log-probability (choice items).
    """

    item: TaskItem
    predictions: dict[str, str] = field(default_factory=dict)
    correct: dict[str, bool] = field(default_factory=dict)
    correct_norm: dict[str, bool] = field(default_factory=dict)
    logprobs: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record."""
        item = self.item
        out: dict[str, Any] = {"source": str(item.source) if item.source else None, "kind": item.kind,
                               "prompt": item.prompt, "answer": item.answer_text}  # fmt: skip
        if item.kind == "generate":
            out["match"] = item.match
        else:
            out["choices"] = item.choices
        out.update(predictions=self.predictions, correct=self.correct)
        if item.kind == "choice":
            out.update(correct_norm=self.correct_norm, logprobs=self.logprobs)
        return out


@dataclass
class TaskResult:
    """Per-item predictions and per-column accuracy of a task evaluation.

    Attributes:
        columns: `"base"` and the adapters' names, in order.
        items: One `ItemResult` per item, in input order.
    """

    columns: list[str]
    items: list[ItemResult]

    def _mean(self, kind: str | None, norm: bool = False) -> dict[str, float | None]:
        rows = [r for r in self.items if kind is None or r.item.kind == kind]
        if not rows:
            return {c: None for c in self.columns}
        return {c: sum((r.correct_norm if norm else r.correct)[c] for r in rows) / len(rows) for c in self.columns}

    @property
    def accuracy(self) -> dict[str, float]:
        """Column -> fraction of items right (generation items by match, choice items by `acc`)."""
        return self._mean(None)  # type: ignore[return-value]

    @property
    def metrics(self) -> dict[str, dict[str, float | None]]:
        """`accuracy` (generation items), `acc` and `acc_norm` (choice items), each column -> value or None."""
        return {"accuracy": self._mean("generate"), "acc": self._mean("choice"),
                "acc_norm": self._mean("choice", norm=True)}  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: columns, metrics and items."""
        return {"columns": self.columns, "metrics": self.metrics, "items": [r.to_dict() for r in self.items]}


def choice_sequences(
    item: TaskItem, tokenizer: Tokenizer, system: str | None = None, chat: bool | None = None
) -> list[tuple[list[int], list[int]]]:
    """`(input_ids, labels)` for each choice: the prompt as context (masked), the choice's tokens as labels.

    Raises:
        DataError: A choice adds no token, or the prompt is empty with no bos token to condition on.
    """
    assert item.choices is not None
    rendered = use_chat(tokenizer, chat) or bool(item.messages)
    context = prompt_text(item, tokenizer, system, chat)
    special = not rendered
    out = []
    for choice in item.choices:
        delimiter = "" if rendered or not context or context[-1].isspace() or choice[:1].isspace() else " "
        ctx, continuation = context, delimiter + choice
        n_spaces = len(ctx) - len(ctx.rstrip())
        if n_spaces:  # lm-evaluation-harness: the context's trailing whitespace belongs to the continuation
            ctx, continuation = ctx[:-n_spaces], ctx[-n_spaces:] + continuation
        whole = tokenizer.encode(ctx + continuation, add_special_tokens=special)
        n_ctx = len(tokenizer.encode(ctx, add_special_tokens=special))
        if n_ctx == 0:
            if tokenizer.bos_token_id is None:
                raise DataError(f"{item.source or 'item'}: the prompt is empty and the tokenizer has no bos token to "
                                "condition on; give a prompt")  # fmt: skip
            whole, n_ctx = [tokenizer.bos_token_id, *whole], 1
        if len(whole) <= n_ctx:
            raise DataError(f"{item.source or 'item'}: choice {choice!r} adds no token to the prompt")
        out.append((whole, [IGNORE_INDEX] * n_ctx + whole[n_ctx:]))
    return out


def _as_items(items: Sequence[TaskItem | Mapping[str, Any]]) -> list[TaskItem]:
    out = []
    for i, item in enumerate(items):
        if isinstance(item, TaskItem):
            out.append(item)
        else:
            parsed = parse_item(item, Source("items", i, "item"))
            parsed.source = Source("items", i, "item")
            out.append(parsed)
    return out


def evaluate_tasks(
    model: nn.Module,
    tokenizer: Tokenizer,
    items: Sequence[TaskItem | Mapping[str, Any]],
    adapters: Mapping[str, AdapterSpec] | Columns | None = None,
    max_new_tokens: int = 64,
    system: str | None = None,
    chat: bool | None = None,
    max_batch_tokens: int = 4096,
    progress: Callable[[int], None] | None = None,
) -> TaskResult:
    """Accuracy of the base model and of each adapter on task items.

    Args:
        model: The base model.
        tokenizer: Its tokenizer.
        items: `TaskItem`s (e.g. from `load_task_items`) or item dicts (validated with `parse_item`).
        adapters: `{name: folder or (folder, weight)}`, or prepared `Columns`.
        max_new_tokens: Most tokens generated per answer.
        system: A system prompt for items without their own.
        chat: Prompt through the chat template (default: when the tokenizer has one).
        max_batch_tokens: Padded tokens per forward pass when scoring choices.
        progress: Called with the number of (item, column) pairs done.

    Returns:
        The per-item predictions and per-column accuracies.

    Raises:
        DataError: A bad item, or a prompt too long for the engine.
    """
    items = _as_items(items)
    columns = adapters if isinstance(adapters, Columns) else Columns(model, tokenizer, adapters)
    try:
        results = [ItemResult(item) for item in items]
        generate = [i for i, item in enumerate(items) if item.kind == "generate"]
        choice = [i for i, item in enumerate(items) if item.kind == "choice"]
        if generate:
            prompts = {i: prompt_ids(items[i], tokenizer, system, chat) for i in generate}
            limit = columns.engine.max_seq_len - 1
            too_long = [f"{items[i].source}: the prompt has {len(p)} tokens; at most {limit} fit"
                        for i, p in prompts.items() if len(p) > limit]  # fmt: skip
            if too_long:
                raise DataError(too_long)
            params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
            texts = _generate(columns, prompts, params, progress)
            for (name, i), text in texts.items():
                item = items[i]
                results[i].predictions[name] = text
                results[i].correct[name] = score_answer(text, str(item.answer), item.match, item.extract,
                                                        item.ignore_case)  # fmt: skip
        if choice:
            _score_choices(model, columns, items, results, choice, tokenizer, system, chat, max_batch_tokens, progress)
    finally:
        if columns is not adapters:  # made here: give the model back unwrapped
            columns.close()
    return TaskResult(list(columns.names), results)


def _phases(columns: Columns) -> list[list[str]]:
    """Columns that can run at the same time: the shared engine's, then each merged adapter alone."""
    shared = columns.shared
    return ([shared] if shared else []) + [[name] for name in columns.names if name in columns.merged]


def _generate(
    columns: Columns, prompts: Mapping[int, list[int]], params: SamplingParams, progress: Callable[[int], None] | None
) -> dict[tuple[str, int], str]:
    """Greedy completions of every prompt in every column: `(column, item index) -> text`."""
    engine = columns.engine
    out: dict[tuple[str, int], str] = {}
    for phase in _phases(columns):
        with contextlib.ExitStack() as stack:
            selections = {name: stack.enter_context(columns.use(name)).selection for name in phase}
            pending = deque((name, i) for i in prompts for name in phase)
            handles = {}
            while pending or handles:
                while pending and engine.num_waiting < engine.max_running:
                    key = pending.popleft()
                    handles[key] = engine.submit(prompts[key[1]], params, adapter=selections[key[0]])
                engine.step()
                for key, handle in list(handles.items()):
                    while not handle.events.empty():
                        event = handle.events.get_nowait()
                        if isinstance(event, Completion):
                            out[key] = event.text
                            del handles[key]
                            if progress is not None:
                                progress(1)
    return out


def _score_choices(
    model: nn.Module,
    columns: Columns,
    items: Sequence[TaskItem],
    results: list[ItemResult],
    indices: Sequence[int],
    tokenizer: Tokenizer,
    system: str | None,
    chat: bool | None,
    max_batch_tokens: int,
    progress: Callable[[int], None] | None,
) -> None:
    sequences, owners = [], []
    for i in indices:
        seqs = choice_sequences(items[i], tokenizer, system, chat)
        sequences += seqs
        owners += [i] * len(seqs)
    for name in columns.names:
        with columns.use(name) as column:
            scores = score_sequences(column.model, sequences, max_batch_tokens, column.forward)
        by_item: dict[int, list[float]] = {}
        for i, (logprob, _) in zip(owners, scores):
            by_item.setdefault(i, []).append(logprob)
        for i, logprobs in by_item.items():
            item, result = items[i], results[i]
            assert item.choices is not None
            best = max(range(len(logprobs)), key=lambda k: logprobs[k])  # the first on a tie, as numpy's argmax
            best_norm = max(range(len(logprobs)), key=lambda k: logprobs[k] / len(item.choices[k]))
            result.predictions[name] = item.choices[best]
            result.correct[name] = best == item.answer
            result.correct_norm[name] = best_norm == item.answer
            result.logprobs[name] = logprobs
        if progress is not None:
            progress(len(indices))
