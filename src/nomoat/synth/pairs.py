"""`nomoat synth --mode pairs`: preference pairs from a teacher's own samples, ranked by rewards or by a judge.

For each prompt of a prompt file (`prompt` or `messages`, other columns kept for the rewards, as RL data) the teacher
samples `samples` answers; each is scored by reward functions (`nomoat.train.rewards`: built-ins or `module:function`,
summed with their weights) or by the teacher as a judge (a 1-10 rating); the best becomes `chosen`, the worst
`rejected`, with their scores. Prompts whose samples all score the same (or whose best and worst answers read the
same) teach nothing and are counted, not written. The records are what `nomoat train --method dpo` reads: a prompt of
one user turn as plain strings, any other as TRL's conversational form (message lists).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from nomoat.data import load_dataset
from nomoat.data.formats import Prompt
from nomoat.synth.output import SynthOutput, Tally
from nomoat.synth.teacher import Ask, Failure, Teacher, ask_seed, record_id
from nomoat.train import rewards as rw
from nomoat.util.errors import UsageError

Progress = Callable[[int, int], None]  # (items done so far, items in all)

JUDGE_PROMPT = ("Rate how well the answer responds to the request, from 1 (useless or wrong) to 10 (excellent). "
                "Reply with the number only.\n\nRequest:\n{request}\n\nAnswer:\n{answer}")  # fmt: skip
SCORE = re.compile(r"\b(10|[1-9])\b")


@dataclass
class PairsSettings:
    """How pairs are made.

    Attributes:
        samples: Answers sampled per prompt (at least 2).
        temperature: Their sampling temperature (above 0, or they are all the same).
        max_tokens: Longest answer in tokens.
        seed: Seed of the samples (each ask's seed derives from it and the prompt).
        reward: Reward function specs (`exact_match`, `regex=P`, `module:function`...).
        reward_weights: One weight per reward (default 1 each).
        judge: Let the teacher rate each answer instead (or as well: the ratings add to the rewards).
        chunk: Prompts sent per round (the file is rewritten between rounds).
    """

    samples: int = 4
    temperature: float = 1.0
    max_tokens: int = 256
    seed: int = 0
    reward: list[str] = field(default_factory=list)
    reward_weights: list[float] | None = None
    judge: bool = False
    chunk: int = 64


def load_prompts(path: str, limit: int | None = None) -> list[tuple[str, Prompt]]:
    """The prompts of a prompt file, each with its record id (content hash, numbered when a prompt repeats)."""
    examples = load_dataset(path, format="prompt", limit=limit).examples
    seen: dict[str, int] = {}
    out = []
    for e in examples:
        assert isinstance(e, Prompt)
        base = record_id({"prompt": e.prompt, "columns": e.columns})
        k = seen[base] = seen.get(base, -1) + 1
        out.append((f"{base}-{k}" if k else base, e))
    return out


def _prompt_value(prompt: list[dict[str, str]]) -> Any:
    """What reward functions and the record get as the prompt: the text of a lone user turn, else the messages."""
    return prompt[0]["content"] if len(prompt) == 1 and prompt[0]["role"] == "user" else prompt


def _judge_asks(prompt: list[dict[str, str]], answers: Sequence[str]) -> list[Ask]:
    request = "\n".join(f"{m['role']}: {m['content']}" for m in prompt) if len(prompt) > 1 else prompt[0]["content"]
    return [Ask([{"role": "user", "content": JUDGE_PROMPT.format(request=request, answer=a)}], 0.0, 8)
            for a in answers]  # fmt: skip


class PairMaker:
    """Samples, scores and writes the pairs of a prompt file (see the module docstring)."""

    def __init__(self, teacher: Teacher, settings: PairsSettings) -> None:
        if settings.samples < 2:
            raise UsageError(f"--samples {settings.samples}: a pair needs at least 2 samples per prompt")
        if not settings.reward and not settings.judge:
            raise UsageError("pairs need a way to rank the samples", hint="give --reward NAME, or --judge")
        if settings.reward_weights and len(settings.reward_weights) != len(settings.reward):
            raise UsageError(f"{len(settings.reward_weights)} reward weights for {len(settings.reward)} rewards")
        self.teacher, self.s = teacher, settings
        self.rewards = [rw.load_reward(spec) for spec in settings.reward]

    def run(self, prompts: list[tuple[str, Prompt]], out: SynthOutput, tally: Tally,
            progress: Progress | None = None) -> None:  # fmt: skip
        """Make a pair for every prompt whose id is not in `out` yet, `chunk` prompts at a time."""
        todo = [(i, p) for i, p in prompts if i not in out.ids]
        done = len(prompts) - len(todo)
        if progress:
            progress(done, len(prompts))
        for start in range(0, len(todo), self.s.chunk):
            chunk = todo[start : start + self.s.chunk]
            self._chunk(chunk, out, tally)
            out.flush()
            done += len(chunk)
            if progress:
                progress(done, len(prompts))

    def _chunk(self, chunk: list[tuple[str, Prompt]], out: SynthOutput, tally: Tally) -> None:
        n = self.s.samples
        asks = [Ask(p.prompt, self.s.temperature, self.s.max_tokens, ask_seed(self.s.seed, pid, j))
                for pid, p in chunk for j in range(n)]  # fmt: skip
        answers: list[str | Failure | None] = [None] * len(asks)
        for k, outcome in self.teacher.run(asks):
            answers[k] = outcome
        ratings = self._judge(chunk, answers, tally) if self.s.judge else None
        for c, (pid, p) in enumerate(chunk):
            mine = answers[c * n : (c + 1) * n]
            failed = [a for a in mine if isinstance(a, Failure)]
            if failed:
                tally.fail(f"prompt {pid}", failed[0].error, failed[0].attempts)
                continue
            judged = ratings[c * n : (c + 1) * n] if ratings is not None else None
            if judged is not None and any(isinstance(r, Failure) for r in judged):
                bad = next(r for r in judged if isinstance(r, Failure))
                tally.fail(f"prompt {pid} (judge)", bad.error, bad.attempts)
                continue
            record = self._pair(pid, p, [str(a) for a in mine], judged, tally)
            if record is not None:
                out.add(record)
                tally.written += 1

    def _judge(self, chunk: list[tuple[str, Prompt]], answers: list[Any], tally: Tally) -> list[float | Failure]:
        """The teacher's 1-10 rating of every answer (a Failure where it gave none)."""
        n = self.s.samples
        asks = [a for c, (_, p) in enumerate(chunk) for a in _judge_asks(p.prompt, [str(x) for x in
                                                                                  answers[c * n : (c + 1) * n]])]
        ratings: list[float | Failure] = [Failure("not rated", 0)] * len(asks)
        for k, outcome in self.teacher.run(asks):
            if isinstance(outcome, Failure):
                ratings[k] = outcome
                continue
            found = SCORE.search(outcome)
            ratings[k] = float(found.group(1)) if found else Failure(f"the judge gave no 1-10 rating: {outcome[:80]!r}",
                                                                      1)
        return ratings

    def _pair(self, pid: str, p: Prompt, texts: list[str], judged: list[Any] | None,
              tally: Tally) -> dict[str, Any] | None:  # fmt: skip
        """The record of one prompt's samples, or None (counted in `tally`) when they teach nothing."""
        n = len(texts)
        totals = [0.0] * n
        if self.rewards:
            prompt = _prompt_value(p.prompt)
            columns = {k: [v] * n for k, v in p.columns.items()}
            per_fn = rw.score(self.rewards, texts, [prompt] * n, columns)
            weights = self.s.reward_weights or [1.0] * len(self.rewards)
            totals = [sum(w * v for w, v in zip(weights, col) if not math.isnan(v)) for col in zip(*per_fn)]
        if judged is not None:
            totals = [t + float(j) for t, j in zip(totals, judged)]
        keep = [i for i in range(n) if texts[i].strip()]
        if len(keep) < n:
            tally.filter("empty sample", n - len(keep))
        if len(keep) < 2:
            tally.filter("fewer than 2 non-empty samples")
            return None
        best = max(keep, key=lambda i: totals[i])
        worst = min(keep, key=lambda i: totals[i])
        if totals[best] == totals[worst]:
            tally.filter("samples all scored the same")
            return None
        if texts[best].strip() == texts[worst].strip():
            tally.filter("best and worst answers identical")
            return None
        return self._record(pid, p, texts[best], texts[worst], totals[best], totals[worst])

    @staticmethod
    def _record(pid: str, p: Prompt, chosen: str, rejected: str, good: float, bad: float) -> dict[str, Any]:
        value = _prompt_value(p.prompt)
        if isinstance(value, str):
            pair: dict[str, Any] = {"prompt": value, "chosen": chosen, "rejected": rejected}
        else:  # TRL's conversational form
            pair = {"prompt": value, "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}]}  # fmt: skip
        extra = {k: v for k, v in p.columns.items() if k not in ("id", "prompt", "chosen", "rejected", "system")}
        return {"id": pid, **pair, "score_chosen": good, "score_rejected": bad, **extra}


__all__ = ["JUDGE_PROMPT", "PairMaker", "PairsSettings", "load_prompts"]
