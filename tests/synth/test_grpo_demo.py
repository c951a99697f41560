"""The GRPO demo script (examples/grpo_subtraction.sh) at small scale: data, training, held-out accuracy side by side.

Sixteen training questions, sixteen steps and ten held-out items: it checks that the pipeline runs end to end, that
the rewards, the share of flat groups and the accuracy are what the completions and answers give (recomputed here),
and that the sampled reward rises while the adapter trains (the full run's figures are in the README).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from nomoat.demo.score import EVAL_SEED
from nomoat.demo.tasks import SCORED, generate_items
from nomoat.train.rewards import exact_match

ROOT = Path(__file__).resolve().parents[2]
STEPS, G, BATCH = 16, 8, 8


def _pair(record: dict) -> tuple[int, ...]:
    return tuple(sorted((int(n) for n in re.findall(r"\d+", record["messages"][-1]["content"])), reverse=True))


def test_grpo_subtraction_demo_runs_and_the_reward_rises_at_small_scale(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "OUT": str(out), "STEPS": str(STEPS), "TRAIN": "16", "HELDOUT": "10", "GENERATIONS": str(G),
           "BATCH": str(BATCH), "LR": "3e-3", "FILTER": "1", "REFILL": "0", "NOMOAT_HOME": str(tmp_path / "home"),
           "NOMOAT": f"{sys.executable} -m nomoat", "PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    run = subprocess.run(["bash", str(ROOT / "examples" / "grpo_subtraction.sh")], env=env, capture_output=True,
                         text=True, timeout=3600)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    heldout = [json.loads(line) for line in (out / "data" / "heldout.jsonl").read_text().splitlines()]
    assert len(heldout) == 10 and heldout[0]["answer"] == "73"  # the model card's first held-out subtraction item
    train = [json.loads(line) for line in (out / "data" / "train.jsonl").read_text().splitlines()]
    assert len(train) == 16
    for r in train + heldout:  # subtraction with a non-negative result: the answer is the larger minus the smaller
        numbers = [int(n) for n in re.findall(r"\d+", r["messages"][-1]["content"])]
        assert int(r["answer"]) == max(numbers) - min(numbers)
    held_pairs = {_pair(r) for r in heldout}
    assert not any(_pair(r) in held_pairs for r in train)  # no training question is about a held-out pair
    metrics = [json.loads(line) for line in (out / "grpo-sub" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    rollouts = [json.loads(line) for line in (out / "grpo-sub" / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == STEPS * BATCH * G
    for r in rollouts:  # the exact-match reward, recomputed from the completion and the record's answer
        answer = train[int(r["source"].rsplit(":", 1)[1]) - 1]["answer"]
        assert r["reward"] == float(r["completion"].strip() == answer)
    means = []
    for m in metrics:  # the step's reward and share of flat groups (every completion scored the same), recomputed
        rewards = [r["reward"] for r in rollouts if r["step"] == m["step"]]
        groups = [rewards[i : i + G] for i in range(0, len(rewards), G)]
        assert abs(m["reward"] - sum(rewards) / len(rewards)) < 1e-6
        assert abs(m["flat_groups"] - sum(len(set(g)) == 1 for g in groups) / len(groups)) < 1e-6
        means.append(sum(rewards) / len(rewards))
    assert sum(means[-4:]) / 4 > sum(means[:4]) / 4 + 0.1  # the policy learns the training questions
    report = json.loads((out / "eval.json").read_text())
    values = report["results"][0]["values"]
    assert set(values) == {"base", "grpo-sub"}
    for column in values:  # the accuracy is the exact-match rate of the answers, recomputed
        answers = [d["predictions"][column] for d in report["details"]["heldout.jsonl"]]
        assert values[column] == sum(exact_match(answers, [None] * 10, answer=[h["answer"] for h in heldout])) / 10


def test_the_held_out_items_are_the_model_cards():
    """The demo's held-out set is the `sub` part of the items behind accuracy.json (100 per task, tasks in turn)."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import subtraction_data
    finally:
        sys.path.pop(0)
    items = subtraction_data.heldout_items(100)
    assert len(items) == 100 and all(it.task == "sub" for it in items)
    drawn = generate_items(100 * len(SCORED), seed=EVAL_SEED, tasks=SCORED)
    assert [it.messages for it in items] == [it.messages for it in drawn if it.task == "sub"]
    train = subtraction_data.train_items(3000)
    pairs = {_pair({"messages": it.prompt}) for it in items}
    assert len(train) == 3000 and not pairs & {_pair({"messages": it.prompt}) for it in train}
    drawn = [it for it in generate_items(3500, seed=20_000, tasks=("sub",))
             if _pair({"messages": it.prompt}) not in pairs]  # fmt: skip
    assert [it.messages for it in train] == [it.messages for it in drawn[:3000]]  # the training seed's, in order
