"""The GRPO demo script (examples/grpo_subtraction.sh) at small scale: data, training, held-out accuracy side by side.

Two steps and ten held-out items: it checks that the pipeline runs end to end and that the reward and the accuracy are
computed (the full run's figures are in the README); the accuracies are recomputed here from the answers.
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


def test_grpo_subtraction_demo_runs_at_small_scale(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "OUT": str(out), "STEPS": "2", "HELDOUT": "10", "NOMOAT_HOME": str(tmp_path / "home"),
           "NOMOAT": f"{sys.executable} -m nomoat", "PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    run = subprocess.run(["bash", str(ROOT / "examples" / "grpo_subtraction.sh")], env=env, capture_output=True,
                         text=True, timeout=1800)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    heldout = [json.loads(line) for line in (out / "data" / "heldout.jsonl").read_text().splitlines()]
    assert len(heldout) == 10 and heldout[0]["answer"] == "73"  # the model card's first held-out subtraction item
    train = [json.loads(line) for line in (out / "data" / "train.jsonl").read_text().splitlines()]
    for r in train + heldout:  # subtraction with a non-negative result: the answer is the larger minus the smaller
        numbers = [int(n) for n in re.findall(r"\d+", r["messages"][-1]["content"])]
        assert int(r["answer"]) == max(numbers) - min(numbers)
    metrics = [json.loads(line) for line in (out / "grpo-sub" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    rollouts = [json.loads(line) for line in (out / "grpo-sub" / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 2 * 8 * 8
    for r in rollouts:  # the exact-match reward, recomputed from the completion and the record's answer
        answer = train[int(r["source"].rsplit(":", 1)[1]) - 1]["answer"]
        assert r["reward"] == float(r["completion"].strip() == answer)
    for step in (1, 2):
        rewards = [r["reward"] for r in rollouts if r["step"] == step]
        assert abs(metrics[step - 1]["reward"] - sum(rewards) / len(rewards)) < 1e-6
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
    train = subtraction_data.train_items(3)
    assert [it.messages for it in train] == [it.messages for it in generate_items(3, seed=20_000, tasks=("sub",))]
