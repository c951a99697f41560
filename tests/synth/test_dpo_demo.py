"""The DPO demo script (examples/dpo_compare.sh) at small scale: pairs from the model's own samples, DPO, and the
held-out accuracy on the task moving up.

The pairs are checked against the reward that made them (the chosen answer is the `answer` column, the rejected one
is not), and the accuracies are recomputed from the answers in the eval report; the run is seeded, so the figures are
the same on every run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from nomoat.train.rewards import exact_match

ROOT = Path(__file__).resolve().parents[2]


def _accuracy(report: dict, column: str, heldout: list[dict]) -> float:
    answers = [d["predictions"][column] for d in report["details"]["heldout.jsonl"]]
    return sum(exact_match(answers, [None] * len(answers), answer=[h["answer"] for h in heldout])) / len(heldout)


def test_dpo_on_own_pairs_lifts_held_out_accuracy(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "OUT": str(out), "PROMPTS": "160", "STEPS": "20", "NOMOAT_HOME": str(tmp_path / "home"),
           "NOMOAT": f"{sys.executable} -m nomoat", "PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    run = subprocess.run(["bash", str(ROOT / "examples" / "dpo_compare.sh")], env=env, capture_output=True, text=True,
                         timeout=1800)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    heldout = [json.loads(line) for line in (out / "data" / "heldout.jsonl").read_text().splitlines()]
    assert len(heldout) == 100
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) >= 40  # the model's samples differ on most prompts: that is why this task was chosen
    for p in pairs:  # chosen is a right answer and rejected a wrong one, by the reward that ranked them
        chosen, rejected = (x if isinstance(x, str) else x[-1]["content"] for x in (p["chosen"], p["rejected"]))
        assert chosen.strip() == p["answer"] != rejected.strip()
        assert (p["score_chosen"], p["score_rejected"]) == (1.0, 0.0)
    metrics = [json.loads(line) for line in (out / "dpo-compare" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 21))
    margins = [m["margin"] for m in metrics if "margin" in m]
    assert len(margins) == 20 and sum(margins[-5:]) / 5 > sum(margins[:5]) / 5 > -0.5  # the pairs are being learnt
    report = json.loads((out / "eval.json").read_text())
    values = report["results"][0]["values"]
    assert set(values) == {"base", "dpo-compare"}
    for column in values:  # the report's accuracy is the exact-match rate of its answers
        assert values[column] == _accuracy(report, column, heldout)
    # The lift is small at this scale (0.63 -> 0.66 here; +3 of 100 items at the full scale too): a CPU whose kernels
    # round differently samples other pairs, so the held-out check is that DPO did not make the task worse.
    assert values["dpo-compare"] >= values["base"]
