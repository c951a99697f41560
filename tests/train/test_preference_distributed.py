"""Preference tuning in two torchrun processes (gloo): DPO and KTO take the same steps as one process with the same
global batch (a pair, or an example and its KL row, is never split between processes; the KL estimate spans both)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

from distributed_utils import max_diff, run_losses, run_ok, torchrun
from train_utils import make_chat_model

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or sys.platform == "win32",
                                reason="torch.distributed with gloo is not available here")  # fmt: skip


def _data(ws: Path) -> None:
    rng = random.Random(0)
    pairs, feedback = [], []
    for i in range(7):  # an odd count: the last global batch of 3 splits 1 + 2
        prompt = " ".join(f"w{rng.randrange(10, 500)}" for _ in range(3))
        bad = " ".join(f"w{rng.randrange(100, 500)}" for _ in range(3))
        pairs.append({"prompt": prompt, "chosen": "w20 w21 w22", "rejected": bad})
        feedback.append({"prompt": prompt, "completion": "w20 w21" if i % 3 else bad, "label": i % 3 != 0})
    (ws / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (ws / "feedback.jsonl").write_text("".join(json.dumps(p) + "\n" for p in feedback))


def _args(ws: Path, method: str, data: str, name: str, batch: int) -> list[str]:
    return ["-m", "nomoat", "train", str(ws / "model"), "-d", str(ws / data), "--method", method, "--batch-size",
            str(batch), "--max-steps", "4", "--lr", "0.01", "--schedule", "constant", "--warmup-steps", "0",
            "--seq-len", "64", "--seed", "1", "--device", "cpu", "--name", name, "--output-dir", str(ws / "runs"),
            "--no-progress"]  # fmt: skip


@pytest.mark.parametrize(("method", "data"), [("dpo", "pairs.jsonl"), ("kto", "feedback.jsonl")])
def test_two_processes_equal_one(tmp_path, method, data):
    make_chat_model(tmp_path / "model")
    _data(tmp_path)
    run_ok([sys.executable, *_args(tmp_path, method, data, "one", 4)], tmp_path)
    run_ok(torchrun(2, *_args(tmp_path, method, data, "two", 2)), tmp_path)
    one, two = run_losses(tmp_path / "runs" / "one"), run_losses(tmp_path / "runs" / "two")
    assert len(one) == 4
    assert max_diff(one, two) < 1e-6, (one, two)
