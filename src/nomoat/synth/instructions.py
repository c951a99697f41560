"""`nomoat synth --mode instructions`: self-instruct, new tasks and their answers from a teacher and a seed file.

Each round shows the teacher a few tasks (two thirds from the seed file, the rest from those made so far) and asks for
a new one; the new tasks go through the filters (length in words, refusals, near-duplicates of any task seen so far
by `rapidfuzz`'s normalised Indel similarity, as self-instruct used ROUGE-L), then the teacher answers the survivors,
whose answers pass the refusal filter too. Records are Alpaca's `instruction`/`output`, which `nomoat train` reads.
Rounds go on until `num` records exist; a run in which `patience` rounds in a row add nothing stops, with the counts.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nomoat.data.formats import DataError
from nomoat.data.loading import read_records
from nomoat.synth.output import SynthOutput, Tally
from nomoat.synth.teacher import Ask, Failure, Teacher, ask_seed, record_id
from nomoat.util.errors import UsageError

Progress = Callable[[int, int], None]  # (records so far, records wanted)

NEW_TASK_PROMPT = ("Come up with one new task for an AI assistant. Make it different from the example tasks, "
                   "and write only the task, nothing else.\n\n{examples}\nTask {next}:")  # fmt: skip
REFUSALS = ("as an ai", "as a language model", "i'm sorry", "i am sorry", "i apologize", "i cannot", "i can't",
            "i can not", "i'm unable", "i am unable", "i won't", "i will not", "cannot fulfill",
            "not able to help")  # fmt: skip
SEED_FIELDS = ("instruction", "prompt", "question", "task", "text")


@dataclass
class InstructionSettings:
    """How instructions are made.

    Attributes:
        num: Records wanted in the file (counting those of earlier runs).
        temperature: Sampling temperature of new tasks.
        answer_temperature: Sampling temperature of the answers.
        max_tokens: Longest answer in tokens (new tasks get at most 128).
        seed: Seed of the example draws and of the sampling.
        examples: Example tasks shown per request.
        similarity: A task at least this similar (0-1) to one seen before is a near-duplicate.
        min_words: Shortest task in words.
        max_words: Longest task in words.
        batch: New tasks asked for per round.
        patience: Rounds in a row without a new record before the run stops.
    """

    num: int = 100
    temperature: float = 1.0
    answer_temperature: float = 0.7
    max_tokens: int = 512
    seed: int = 0
    examples: int = 3
    similarity: float = 0.7
    min_words: int = 3
    max_words: int = 150
    batch: int = 16
    patience: int = 5


def load_seed_tasks(path: str) -> list[str]:
    """The tasks of a seed file, one per record.

    A record's task is its `instruction` (with its `input`), `prompt`, `question`, `task` or `text`, or the first
    user turn of its `messages` or `conversations`.

    Raises:
        DataError: A record with none of those (file and line named), or a file without records.
    """
    from pathlib import Path

    tasks, errors = [], []
    for item in read_records(Path(path)):
        if isinstance(item, Exception):
            errors.append(item.problem)
            continue
        source, record = item
        text = _seed_text(record) if isinstance(record, dict) else None
        if not text:
            errors.append(f"{source}: no task: expected one of {', '.join(SEED_FIELDS)} or messages")
        else:
            tasks.append(text)
    if errors:
        raise DataError(errors[:10], more=len(errors) > 10)
    if not tasks:
        raise DataError(f"{path}: no seed tasks in the file")
    return tasks


def _seed_text(record: dict[str, Any]) -> str | None:
    for key in SEED_FIELDS:
        if isinstance(record.get(key), str) and record[key].strip():
            extra = record.get("input") if key == "instruction" else None
            return record[key].strip() + (f"\n\n{extra.strip()}" if isinstance(extra, str) and extra.strip() else "")
    for key in ("messages", "conversations"):
        turns = record.get(key)
        if isinstance(turns, list):
            for m in turns:
                if isinstance(m, dict) and m.get("role", m.get("from")) in ("user", "human"):
                    text = m.get("content", m.get("value"))
                    return text.strip() if isinstance(text, str) and text.strip() else None
    return None


def clean_task(text: str) -> str:
    """A teacher's new task as a task: its first part before another `Task N:`, without a label or quotes."""
    text = re.split(r"\n\s*Task\s*\d+\s*:", text.strip(), maxsplit=1)[0]
    text = re.sub(r"^\s*(Task\s*\d*\s*:|\d+[.)])\s*", "", text.strip())
    return text.strip().strip('"').strip()


def refused(text: str) -> bool:
    """Whether a text reads as a refusal (one of `REFUSALS` in its first 200 characters, case-insensitive)."""
    head = text[:200].lower().replace("\u2019", "'")
    return any(r in head for r in REFUSALS)


class NearDuplicates:
    """The tasks seen so far, and whether a new one is too similar to any of them (`rapidfuzz`)."""

    def __init__(self, threshold: float, tasks: list[str]) -> None:
        try:
            from rapidfuzz import fuzz, process, utils
        except ImportError as e:
            raise UsageError("near-duplicate removal needs rapidfuzz", hint="pip install 'nomoat[synth]'") from e
        self._fuzz, self._process, self._norm = fuzz, process, utils.default_process
        self.cutoff = threshold * 100
        self.tasks = [self._norm(t) for t in tasks]

    def seen(self, task: str) -> bool:
        """True when `task` is a near-duplicate; otherwise it joins the tasks seen and False is returned."""
        norm = self._norm(task)
        if self._process.extractOne(norm, self.tasks, scorer=self._fuzz.ratio, score_cutoff=self.cutoff) is not None:
            return True
        self.tasks.append(norm)
        return False


class InstructionMaker:
    """Self-instruct rounds until the file holds `num` records (see the module docstring)."""

    def __init__(self, teacher: Teacher, settings: InstructionSettings) -> None:
        s = settings
        if not 0 < s.similarity <= 1:
            raise UsageError(f"--similarity {s.similarity}: expected a number in (0, 1]")
        if s.min_words > s.max_words:
            raise UsageError(f"--min-words {s.min_words} is above --max-words {s.max_words}")
        self.teacher, self.s = teacher, s

    def run(self, seeds: list[str], out: SynthOutput, tally: Tally, progress: Progress | None = None) -> bool:
        """Add records to `out` until it holds `num`; False when `patience` rounds in a row added none."""
        made = [r["instruction"] for r in out.records]
        dupes = NearDuplicates(self.s.similarity, seeds + made)
        idle, round_no = 0, len(out.records)  # a rerun draws new examples: its rounds are numbered on
        while len(out.records) < self.s.num:
            if progress:
                progress(len(out.records), self.s.num)
            before = len(out.records)
            tasks = self._new_tasks(seeds, made, round_no, dupes, tally)
            self._answer(tasks, made, out, tally)
            out.flush()
            round_no += 1
            idle = idle + 1 if len(out.records) == before else 0
            if idle >= self.s.patience:
                return False
        if progress:
            progress(len(out.records), self.s.num)
        return True

    def _new_tasks(self, seeds: list[str], made: list[str], round_no: int, dupes: NearDuplicates,
                   tally: Tally) -> list[str]:  # fmt: skip
        s = self.s
        asks = []
        for j in range(min(s.batch, 2 * (s.num - len(made)) + 1)):
            rng = random.Random(ask_seed(s.seed, "examples", round_no, j))
            k_made = min(len(made), s.examples // 3)
            shown = rng.sample(seeds, min(len(seeds), s.examples - k_made)) + rng.sample(made, k_made)
            rng.shuffle(shown)
            listing = "\n".join(f"Task {i}: {t}" for i, t in enumerate(shown, 1))
            prompt = NEW_TASK_PROMPT.format(examples=listing, next=len(shown) + 1)
            asks.append(Ask([{"role": "user", "content": prompt}], s.temperature, min(128, s.max_tokens),
                            ask_seed(s.seed, "task", round_no, j)))  # fmt: skip
        kept = []
        for k, outcome in sorted(self.teacher.run(asks), key=lambda x: x[0]):
            if isinstance(outcome, Failure):
                tally.fail(f"new task (round {round_no}, request {k})", outcome.error, outcome.attempts)
                continue
            task = clean_task(outcome)
            reason = self._reject(task, dupes)
            if reason:
                tally.filter(reason)
            else:
                kept.append(task)
        return kept

    def _reject(self, task: str, dupes: NearDuplicates) -> str | None:
        """Why a new task is dropped, or None to keep it (it then counts as seen)."""
        words = len(task.split())
        if words < self.s.min_words:
            return "task too short"
        if words > self.s.max_words:
            return "task too long"
        if refused(task):
            return "task is a refusal"
        return "near-duplicate task" if dupes.seen(task) else None

    def _answer(self, tasks: list[str], made: list[str], out: SynthOutput, tally: Tally) -> None:
        s = self.s
        asks = [Ask([{"role": "user", "content": t}], s.answer_temperature, s.max_tokens, ask_seed(s.seed, "answer", t))
                for t in tasks]  # fmt: skip
        for k, outcome in sorted(self.teacher.run(asks), key=lambda x: x[0]):
            task = tasks[k]
            if isinstance(outcome, Failure):
                tally.fail(f"answer to {task[:60]!r}", outcome.error, outcome.attempts)
            elif not outcome.strip():
                tally.filter("empty answer")
            elif refused(outcome):
                tally.filter("answer is a refusal")
            elif len(out.records) < s.num:
                out.add({"id": record_id(task), "instruction": task, "output": outcome.strip()})
                made.append(task)
                tally.written += 1


__all__ = ["REFUSALS", "InstructionMaker", "InstructionSettings", "NearDuplicates", "clean_task",
           "load_seed_tasks", "refused"]  # fmt: skip
