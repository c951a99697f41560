"""The two modes of `nomoat synth` with a scripted teacher: ranking, filters, the records written, resuming."""

from __future__ import annotations

import json
import re

import pytest

from nomoat.data import load_dataset
from nomoat.data.formats import Conversation, Preference
from nomoat.synth import Failure, InstructionSettings, PairsSettings, synthesize
from nomoat.synth.instructions import NearDuplicates, clean_task, refused
from nomoat.synth.output import provenance_path
from nomoat.train.rewards import RewardError
from nomoat.util.errors import DataError, UsageError
from nomoat.util.files import sha256_file


class Scripted:
    """A teacher whose answer is `answer(messages, seed)`; it records every ask."""

    def __init__(self, answer) -> None:  # noqa: ANN001
        self.answer = answer
        self.asks = []

    def connect(self) -> str:
        return "scripted"

    def describe(self) -> dict:
        return {"kind": "local", "model": "scripted", "adapters": []}

    def run(self, asks):  # noqa: ANN001, ANN201
        self.asks += asks
        outcomes = [self.answer(ask.messages, ask.seed) for ask in asks]
        yield from reversed(list(enumerate(outcomes)))  # out of order, as a pool of requests completes


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ---- pairs ------------------------------------------------------------------------------------------------------


def _sum_teacher(messages, seed):  # noqa: ANN001, ANN202
    """Answers `a+b` questions right when the seed is even, off by one when odd."""
    a, b = map(int, re.findall(r"\d+", messages[-1]["content"]))
    return str(a + b + seed % 2)


def test_pairs_rank_by_reward_and_write_what_dpo_reads(tmp_path):
    rows = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (10, 20), (7, 7)]]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 5 + 6?"}]
    rows.append({"messages": chat, "answer": "11"})
    prompts = _jsonl(tmp_path / "p.jsonl", rows)
    teacher = Scripted(_sum_teacher)
    out = tmp_path / "pairs.jsonl"
    result = synthesize("pairs", teacher, prompts, out, PairsSettings(samples=4, reward=["exact_match"], seed=3))
    assert len(teacher.asks) == 5 * 4
    records = [json.loads(line) for line in out.read_text().splitlines()]
    by_answer = {r["answer"]: r for r in records}
    for row in rows:  # a group with both even and odd seeds gives a pair; all-even or all-odd groups tie
        seeds = [a.seed for a in teacher.asks if a.messages[-1]["content"] == (row.get("prompt") or "What is 5 + 6?")]
        parities = {s % 2 for s in seeds}
        assert (row["answer"] in by_answer) == (parities == {0, 1})
    assert result.tally.filtered.get("samples all scored the same", 0) == 5 - len(records) and records
    for r in records:
        chosen = r["chosen"] if isinstance(r["chosen"], str) else r["chosen"][0]["content"]
        rejected = r["rejected"] if isinstance(r["rejected"], str) else r["rejected"][0]["content"]
        assert chosen == r["answer"] and rejected == str(int(r["answer"]) + 1)
        assert (r["score_chosen"], r["score_rejected"]) == (1.0, 0.0)
    system = [r for r in records if r["answer"] == "11"]
    if system:  # TRL's conversational form when the prompt is more than one user turn
        assert system[0]["prompt"][0] == {"role": "system", "content": "Be brief."}
        assert system[0]["chosen"] == [{"role": "assistant", "content": "11"}]
    data = load_dataset(out)
    assert data.format == "preference" and all(isinstance(e, Preference) for e in data.examples)
    prov = json.loads(provenance_path(out).read_text())
    assert prov["inputs"]["sha256"] == sha256_file(prompts) and prov["settings"]["seed"] == 3
    assert prov["settings"]["reward"] == ["exact_match"] and prov["status"] == "complete"


def test_pairs_by_judge(tmp_path):
    prompts = _jsonl(tmp_path / "p.jsonl", [{"prompt": "Say something."}])

    def answer(messages, seed):  # noqa: ANN001, ANN202
        text = messages[-1]["content"]
        if text.startswith("Rate how well"):
            said = text.rsplit("Answer:\n", 1)[1]
            return f"Score: {len(said)}" if len(said) <= 10 else "no idea"
        return "x" * (1 + seed % 9)

    teacher = Scripted(answer)
    out = tmp_path / "j.jsonl"
    synthesize("pairs", teacher, prompts, out, PairsSettings(samples=3, judge=True))
    record = json.loads(out.read_text())
    assert record["score_chosen"] == len(record["chosen"]) and record["score_rejected"] == len(record["rejected"])
    judged = [a for a in teacher.asks if a.messages[-1]["content"].startswith("Rate how well")]
    assert len(judged) == 3 and all(a.temperature == 0.0 for a in judged)


def test_pairs_refuse_bad_settings_and_report_bad_rewards(tmp_path):
    prompts = _jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 1 + 2?", "answer": "3"}])
    teacher = Scripted(_sum_teacher)
    with pytest.raises(UsageError, match="a way to rank the samples") as e:
        synthesize("pairs", teacher, prompts, tmp_path / "a.jsonl", PairsSettings())
    assert e.value.hint == "give --reward NAME, or --judge"
    with pytest.raises(UsageError, match="at least 2 samples"):
        synthesize("pairs", teacher, prompts, tmp_path / "a.jsonl", PairsSettings(samples=1, reward=["exact_match"]))
    with pytest.raises(UsageError, match="no_such_module"):
        synthesize("pairs", teacher, prompts, tmp_path / "a.jsonl", PairsSettings(reward=["no_such_module:f"]))
    (tmp_path / "bad.py").write_text("def reward(completions, prompts, **kw):\n    return [1.0]\n")
    with pytest.raises(RewardError, match="returned 1 values for 4 completions"):
        synthesize("pairs", teacher, prompts, tmp_path / "a.jsonl", PairsSettings(reward=[f"{tmp_path}/bad.py:reward"]))
    assert json.loads(provenance_path(tmp_path / "a.jsonl").read_text())["status"] == "stopped"


def test_pairs_failures_are_reported_not_written(tmp_path):
    prompts = _jsonl(tmp_path / "p.jsonl", [{"prompt": f"What is {a} + 1?", "answer": str(a + 1)} for a in range(4)])

    def answer(messages, seed):  # noqa: ANN001, ANN202
        return Failure("HTTP 500: boom", 5) if "2 + 1" in messages[-1]["content"] else _sum_teacher(messages, seed)

    out = tmp_path / "f.jsonl"
    result = synthesize("pairs", Scripted(answer), prompts, out, PairsSettings(samples=6, reward=["exact_match"]))
    assert result.status == "incomplete"
    assert [f["error"] for f in result.tally.failures] == ["HTTP 500: boom"]
    assert all(r["answer"] != "3" for r in map(json.loads, out.read_text().splitlines()))


# ---- instructions -----------------------------------------------------------------------------------------------

SEEDS = ["Write a haiku about the sea.", "List three uses of a paperclip.", "Explain what a prime number is."]


def _tasks_teacher(new_tasks):  # noqa: ANN001, ANN202
    """New-task requests get the next of `new_tasks`; everything else is answered `Answer to: TASK`."""
    queue = list(new_tasks)

    def answer(messages, seed):  # noqa: ANN001, ANN202
        text = messages[-1]["content"]
        if text.startswith("Come up with one new task"):
            return queue.pop(0) if queue else "Write a haiku about the sea!"
        if "forbidden" in text:
            return "I'm sorry, but I cannot help with that."
        return f"Answer to: {text}"

    return answer


def test_instructions_filter_and_write_alpaca_records(tmp_path):
    seeds = _jsonl(tmp_path / "seeds.jsonl", [{"instruction": s} for s in SEEDS])
    new = ["Task 4: Describe a rainy day in a small town.\nTask 5: another one", "Write a haiku about the sea",
           "Hi", "As an AI, I cannot invent tasks.", "Name two rivers in Europe and their lengths.",
           "Describe a rainy day in a small town!", "Explain why forbidden fruit tastes sweet."]  # fmt: skip
    teacher = Scripted(_tasks_teacher(new))
    out = tmp_path / "inst.jsonl"
    settings = InstructionSettings(num=3, batch=7, similarity=0.8, patience=1)
    result = synthesize("instructions", teacher, seeds, out, settings)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["instruction"] for r in records] == ["Describe a rainy day in a small town.",
                                                   "Name two rivers in Europe and their lengths."]  # fmt: skip
    assert records[0]["output"] == "Answer to: Describe a rainy day in a small town."
    # the second round (3 asks for the one record missing) only brings a seed task back, and the run stops
    assert result.tally.filtered == {"answer is a refusal": 1, "near-duplicate task": 2 + 3, "task is a refusal": 1,
                                     "task too short": 1}  # fmt: skip
    assert result.status == "incomplete" and len(teacher.asks) == 7 + 3 + 3
    data = load_dataset(out)
    assert data.format == "alpaca" and all(isinstance(e, Conversation) for e in data.examples)
    shown = teacher.asks[0].messages[-1]["content"]
    assert sum(s in shown for s in SEEDS) == 3 and shown.endswith("Task 4:")


def test_instructions_resume_and_stop_when_nothing_new_comes(tmp_path):
    seeds = _jsonl(tmp_path / "seeds.jsonl", [{"prompt": s} for s in SEEDS])
    out = tmp_path / "inst.jsonl"
    first = ["Describe a rainy day in a small town."]
    synthesize("instructions", Scripted(_tasks_teacher(first)), seeds, out, InstructionSettings(num=1, batch=1))
    teacher = Scripted(_tasks_teacher(["Describe a rainy day in a small town", "Plan a picnic for four friends."]))
    result = synthesize("instructions", teacher, seeds, out, InstructionSettings(num=2, batch=2))
    assert result.resumed == 1 and result.records == 2
    assert result.tally.filtered == {"near-duplicate task": 1}  # the earlier run's task counts as seen
    stuck = Scripted(_tasks_teacher([]))  # only ever repeats a seed task
    result = synthesize("instructions", stuck, seeds, out, InstructionSettings(num=5, batch=2, patience=3))
    assert result.status == "incomplete" and result.records == 2
    assert result.tally.filtered == {"near-duplicate task": 6}
    assert json.loads(provenance_path(out).read_text())["status"] == "incomplete"


def test_seed_file_errors_name_the_line(tmp_path):
    seeds = _jsonl(tmp_path / "seeds.jsonl", [{"instruction": "Do a thing well."}, {"label": 1}])
    with pytest.raises(DataError, match=r"seeds.jsonl:2: no task"):
        synthesize("instructions", Scripted(_tasks_teacher([])), seeds, tmp_path / "o.jsonl", InstructionSettings())


def test_filters():
    assert clean_task('Task 7: "Sort these words."\nTask 8: more') == "Sort these words."
    assert clean_task("3. Count the vowels in a word.") == "Count the vowels in a word."
    assert refused("I\u2019m sorry, I can't do that") and not refused("Sorry is a word with five letters.")
    dupes = NearDuplicates(0.7, ["Write a poem about cats."])
    assert dupes.seen("write a poem about cats") and dupes.seen("Write a poem about a cat.")
    assert not dupes.seen("Compute the area of a circle of radius 2.")
    assert dupes.seen("Compute the area of a circle of radius 3.")  # it joined the tasks seen
