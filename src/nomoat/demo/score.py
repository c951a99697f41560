"""The demo's own scoring: greedy answers to generated items, exact match after normalisation.

`answer` decodes a batch of chats greedily in the engine; `score_items` and `evaluate_model` give accuracy per task.
It lives in `demo` rather than `eval` so the demo stands on its own.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nomoat.demo.tasks import SCORED, Item, generate_items, is_correct
from nomoat.generate.engine import Engine
from nomoat.generate.sampling import SamplingParams
from nomoat.lora.selection import AdapterSelection

EVAL_SEED = 10_000
"""Seed of the held-out items (pretraining data uses seeds below it)."""


def answer(engine: Engine, prompts: Sequence[list[dict[str, str]]], adapter: str | AdapterSelection | None = None,
           max_new_tokens: int = 24) -> list[str]:  # fmt: skip
    """Greedy answers of `engine` to chats (each ends with a user turn), batched.

    Args:
        engine: A generation engine over the model (with `adapter` loaded, if given).
        prompts: The chats.
        adapter: The loaded adapters to answer with (a name, or a selection such as `a:1+b:0.5`), or None for the
            base model.
        max_new_tokens: Longest answer.

    Returns:
        The answers, in order.
    """
    tok = engine.tokenizer
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    sel = AdapterSelection.of(adapter)
    handles = []
    for chat in prompts:
        ids = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        handles.append(engine.submit(ids, params, adapter=sel))
    return [h.result().text.strip() for h in handles]


def score_items(
    engine: Engine, items: Sequence[Item], adapter: str | AdapterSelection | None = None
) -> tuple[dict[str, float], list[str]]:
    """Accuracy per task (exact match after normalisation) and the answers themselves."""
    answers = answer(engine, [it.prompt for it in items], adapter)
    right: dict[str, list[bool]] = defaultdict(list)
    for it, a in zip(items, answers):
        right[it.task].append(is_correct(a, it.answer))
    return {t: sum(v) / len(v) for t, v in right.items()}, answers


def evaluate_model(path: str | Path, n_per_task: int = 100, tasks: Sequence[str] = SCORED,
                   seed: int = EVAL_SEED) -> dict[str, Any]:  # fmt: skip
    """Load a model folder and score it on held-out generated items of every task.

    Args:
        path: The model folder.
        n_per_task: Items per task.
        tasks: Which tasks.
        seed: Seed of the held-out items.

    Returns:
        `{task: accuracy, ..., "mean": mean accuracy}`.
    """
    import nomoat

    model, tok = nomoat.load(str(path))
    engine = Engine(model, tok, max_running=64, max_queue=1 << 20, max_seq_len=512, prefix_cache_bytes=0)
    items = generate_items(n_per_task * len(tasks), seed=seed, tasks=tuple(tasks))
    scores, _ = score_items(engine, items)
    scores = {t: round(scores[t], 3) for t in tasks}
    scores["mean"] = round(sum(scores.values()) / len(tasks), 3)
    return scores
