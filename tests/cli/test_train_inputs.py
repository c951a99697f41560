"""`nomoat train` on bad input and awkward resumes, found by hand: each gives a clear message, early, by flag name,
and leaves no stray folder (in-process through typer's runner)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nomoat.cli import app

from train_utils import make_chat_model, write_chat_data

MODEL_LOADED = "trainable of"  # printed once LoRA is injected into the loaded model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    model = make_chat_model(root / "model")
    data = write_chat_data(root / "chat.jsonl", n=16)
    return root, model, data


def _train(model: Path, data: Path, out: Path, *extra: str):
    args = ["train", str(model), "--data", str(data), "--output-dir", str(out), "--seq-len", "64", "--batch-size", "2",
            "--rank", "2", "--no-progress", *extra]  # fmt: skip
    return CliRunner().invoke(app, args, env={"COLUMNS": "400"})  # messages on one line each


def test_name_cannot_leave_the_runs_folder(folder, tmp_path):
    _, model, data = folder
    out = tmp_path / "runs"
    for name in ("../escaped", "a/b", "..", "/tmp/abs"):
        r = _train(model, data, out, "--name", name, "--max-steps", "1")
        assert r.exit_code == 2 and "--name" in r.output and "one folder name" in r.output, r.output
    assert not (tmp_path / "escaped").exists() and not out.exists()


@pytest.mark.parametrize("flag, value", [("--rank", "0"), ("--seq-len", "1")])
def test_flags_are_checked_first_under_their_own_names(folder, tmp_path, flag, value):
    _, model, data = folder
    r = _train(model, data, tmp_path / "runs", flag, value)
    assert r.exit_code == 2 and flag in r.output, r.output
    assert "LoRAConfig" not in r.output and "max_length" not in r.output and MODEL_LOADED not in r.output
    assert not (tmp_path / "runs").exists()


def test_seq_len_from_a_run_file_is_checked_before_the_model_loads(folder, tmp_path):
    _, model, data = folder
    cfg = tmp_path / "run.yaml"
    cfg.write_text("seq_len: 1\n")
    r = CliRunner().invoke(app, ["train", str(model), "-d", str(data), "-c", str(cfg), "--output-dir",
                                 str(tmp_path / "runs"), "--no-progress"])  # fmt: skip
    assert r.exit_code == 2 and "--seq-len 1" in r.output and MODEL_LOADED not in r.output, r.output


def test_preference_data_for_sft_is_named_before_the_model_loads(folder, tmp_path):
    _, model, _ = folder
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "w5", "chosen": "w6", "rejected": "w7"}) + "\n")
    r = _train(model, pairs, tmp_path / "runs")
    assert r.exit_code == 2 and "preference pairs" in r.output and "--method dpo" in r.output, r.output
    assert MODEL_LOADED not in r.output and "tokenize_" not in r.output


def test_feedback_and_prompt_data_for_sft_are_named_before_the_model_loads(folder, tmp_path):
    _, model, _ = folder
    for name, record, method in [("kto.jsonl", {"prompt": "w5", "completion": "w6", "label": True}, "--method kto"),
                                 ("prompts.jsonl", {"prompt": "w5"}, "--method grpo")]:  # fmt: skip
        data = tmp_path / name
        data.write_text(json.dumps(record) + "\n")
        r = _train(model, data, tmp_path / "runs", "--format", name.split(".")[0].replace("prompts", "prompt"))
        assert r.exit_code == 2 and "not SFT examples" in r.output and method in r.output, r.output
        assert MODEL_LOADED not in r.output and "Traceback" not in r.output


def test_truncated_weights_say_download_again(folder, tmp_path):
    _, model, data = folder
    bad = tmp_path / "bad-model"
    shutil.copytree(model, bad)
    weights = bad / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 1000)
    r = _train(bad, data, tmp_path / "runs", "--name", "t")
    assert r.exit_code == 2 and "truncated or corrupt" in r.output and "download it again" in r.output, r.output
    assert "inconsistent offsets" not in r.output
    assert not (tmp_path / "runs" / "t").exists()  # and no empty run folder stays behind


def test_an_error_after_the_model_loads_leaves_no_empty_run_folder(folder, tmp_path):
    _, model, _ = folder
    long = tmp_path / "long.jsonl"  # every answer lies past --seq-len: nothing to train on
    user = " ".join(f"w{10 + i}" for i in range(100))
    long.write_text(json.dumps({"messages": [{"role": "user", "content": user},
                                             {"role": "assistant", "content": "w7"}]}) + "\n")  # fmt: skip
    r = _train(model, long, tmp_path / "runs", "--name", "empty")
    assert r.exit_code == 2 and MODEL_LOADED in r.output and "trainable token" in r.output, r.output
    assert "long.jsonl:1: longer than 64 tokens" in r.output  # the dropped record is named
    assert not (tmp_path / "runs" / "empty").exists()


def test_resume_of_a_finished_run_keeps_its_adapter(folder, tmp_path):
    """Resuming a finished run is refused without touching its adapter (it used to fail with a TypeError and
    rewrite nomoat.json with a null final loss); killed between its last checkpoint and its adapter, resuming
    writes the adapter with the real final loss."""
    _, model, data = folder
    out = tmp_path / "runs"
    assert _train(model, data, out, "--name", "f", "--max-steps", "3", "--save-every", "1").exit_code == 0
    record = out / "f" / "adapter" / "nomoat.json"
    before = record.read_bytes()
    r = _train(model, data, out, "--name", "f", "--max-steps", "3", "--resume")
    assert r.exit_code == 2 and "has finished" in r.output and "--max-steps" in r.output, r.output
    assert "Traceback" not in r.output and record.read_bytes() == before
    shutil.rmtree(out / "f" / "adapter")
    r = _train(model, data, out, "--name", "f", "--max-steps", "3", "--resume")
    assert r.exit_code == 0, r.output
    last = json.loads((out / "f" / "metrics.jsonl").read_text().splitlines()[-1])
    assert json.loads(record.read_text())["metrics"]["final_loss"] == last["loss"]
    assert json.loads(record.read_text())["metrics"]["steps"] == 3


def test_a_run_stopped_before_its_first_checkpoint_can_be_resumed(folder, tmp_path):
    _, model, data = folder
    run = tmp_path / "runs" / "early"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 42\n")  # what a run killed during its first steps leaves
    r = _train(model, data, tmp_path / "runs", "--name", "early", "--max-steps", "2")
    assert r.exit_code == 2 and "--resume" in r.output
    r = _train(model, data, tmp_path / "runs", "--name", "early", "--max-steps", "2", "--resume")
    assert r.exit_code == 0 and "no checkpoint yet" in r.output, r.output
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_resume_with_another_learning_rate_is_refused(folder, tmp_path):
    _, model, data = folder
    out = tmp_path / "runs"
    first = _train(model, data, out, "--name", "lr", "--max-steps", "4", "--save-every", "2", "--lr", "1e-3")
    assert first.exit_code == 0, first.output
    shutil.rmtree(out / "lr" / "adapter")
    config = (out / "lr" / "config.yaml").read_text()
    r = _train(model, data, out, "--name", "lr", "--max-steps", "4", "--lr", "5e-3", "--resume")
    assert r.exit_code == 2 and "--lr 0.001" in r.output, r.output
    assert (out / "lr" / "config.yaml").read_text() == config  # the record still says what the run used
