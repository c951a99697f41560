"""`nomoat train` end to end: SIGKILL and resume, YAML files, and clear errors without tracebacks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from nomoat.config.train import TrainConfig, load_train_config

from train_utils import make_chat_model, write_chat_data

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = make_chat_model(root / "model")
    data = write_chat_data(root / "chat.jsonl", n=64, max_words=40)
    return root, model, data


def _cmd(model: Path, data: Path, out: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "nomoat.cli", "train", str(model), "--data", str(data), "--output-dir", str(out),
            "--name", name, "--seq-len", "128", "--batch-size", "2", "--lr", "1e-3", "--rank", "4",
            "--max-steps", "24", "--save-every", "4", "--no-progress", *extra]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_sigkill_equals_uninterrupted(folder, tmp_path):
    _, model, data = folder
    out = tmp_path / "runs"
    whole = subprocess.run(_cmd(model, data, out, "whole"), env=_env(), capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr
    reference = _losses(out / "whole")
    assert len(reference) == 24

    proc = subprocess.Popen(_cmd(model, data, out, "killed"), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    ckpt = out / "killed" / "checkpoints" / "step-000008"
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "killed" / "adapter").exists()

    resumed = subprocess.run(_cmd(model, data, out, "killed", "--resume"), env=_env(), capture_output=True,
                             text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stderr
    losses = _losses(out / "killed")
    assert len(losses) == 24
    assert losses == pytest.approx(reference, rel=1e-6, abs=0)
    assert (out / "killed" / "adapter" / "adapter_model.safetensors").is_file()
    assert "nomoat chat" in resumed.stderr  # the closing summary says how to use the adapter


def test_shipped_yaml_examples_parse():
    files = sorted((ROOT / "examples" / "train").glob("*.yaml"))
    assert len(files) >= 4
    for f in files:
        cfg = load_train_config(f)
        assert cfg.model and cfg.data, f
        raw = yaml.safe_load(f.read_text())
        assert TrainConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()  # round trip
        assert set(raw) <= set(cfg.to_dict()), f


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nomoat.cli", "train", *args, "--no-progress"], env=_env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"messages": [{"role": "user", "content": "w5"}]}\n{"messages": [}\n', ["bad.jsonl:2", "JSON"]),
        ('{"instruction": "w5", "response": "w6"}\n', ["bad.jsonl:1", "output"]),
        ('{"messages": [{"role": "wizard", "content": "w5"}, {"role": "assistant", "content": "w6"}]}\n',
         ["bad.jsonl:1", "wizard"]),
    ],
)  # fmt: skip
def test_bad_data_gives_located_error_without_traceback(folder, tmp_path, content, expected):
    _, model, _ = folder
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    fmt = ["--format", "alpaca"] if "instruction" in content else []
    r = _run(str(model), "--data", str(bad), "--output-dir", str(tmp_path), *fmt)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    for piece in expected:
        assert piece in r.stderr, r.stderr


def test_cli_errors_are_clear(folder, tmp_path):
    _, model, data = folder
    r = _run(str(model), "--data", str(tmp_path / "missing.jsonl"), "--output-dir", str(tmp_path))
    assert r.returncode == 2 and "missing.jsonl" in r.stderr and "Traceback" not in r.stderr
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lerning_rate: 0.1\n")
    r = _run("--config", str(cfg))
    assert r.returncode == 2 and "lerning_rate" in r.stderr and "Traceback" not in r.stderr
    r = _run(str(model), "--data", str(data), "--output-dir", str(tmp_path), "--name", "nothing", "--resume")
    assert r.returncode == 2 and "no run to resume" in r.stderr
    r = subprocess.run([sys.executable, "-m", "nomoat.cli", "train", "--help"], env=_env(), capture_output=True,
                       text=True)  # fmt: skip
    assert r.returncode == 0 and "--grad-accum" in r.stdout and "--quantize-base" in r.stdout


def test_python_train_then_generate_with_adapter_equals_peft(folder, tmp_path):
    """`nomoat.train(...)` makes an adapter; `nomoat generate --adapter` decodes what transformers + peft decode."""
    import peft
    import torch
    import transformers
    from rich.console import Console
    from typer.testing import CliRunner

    import nomoat
    from nomoat.cli import app

    _, model, data = folder
    result = nomoat.train(str(model), data=str(data), output_dir=str(tmp_path), name="py", max_steps=8, lr=1e-2,
                          seq_len=128, batch_size=2, lora={"r": 4, "alpha": 8}, progress=False,
                          console=Console(quiet=True))  # fmt: skip
    assert result.steps == 8 and len(result.losses) == 8 and result.adapter_dir.is_dir()

    def generate(*extra: str) -> list[int]:
        out = CliRunner().invoke(app, ["generate", str(model), "-p", "w3 w17 w42 w4", "--max-tokens", "10", "--json",
                                       "--temperature", "0", *extra])  # fmt: skip
        assert out.exit_code == 0, out.output
        return json.loads(out.output.strip().splitlines()[-1])["token_ids"]

    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    tuned = peft.PeftModel.from_pretrained(hf, result.adapter_dir).eval()
    prompt = torch.tensor([[3, 17, 42, 4]])  # the word tokenizer adds no bos
    ref = tuned.generate(input_ids=prompt, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=2)
    ref = ref[0, prompt.shape[1] :].tolist()
    ref = ref[: ref.index(2)] if 2 in ref else ref
    with tuned.disable_adapter():
        base = tuned.generate(input_ids=prompt, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=2)
    base = base[0, prompt.shape[1] :].tolist()
    base = base[: base.index(2)] if 2 in base else base
    assert ref != base  # the adapter changed the model's answer
    assert generate("--adapter", str(result.adapter_dir)) == ref
    assert generate("--adapter", f"{result.adapter_dir}:0") == base
    bad = CliRunner().invoke(app, ["generate", str(model), "-p", "w5", "--adapter", str(tmp_path / "nope")])
    assert bad.exit_code == 2 and "not found" in bad.output


def test_adapter_carries_the_default_template_for_a_model_without_one(tmp_path):
    """Trained with nomoat's ChatML default, the adapter brings that template to `nomoat chat`."""
    from rich.console import Console
    from typer.testing import CliRunner

    import nomoat
    from nomoat.cli import app
    from nomoat.data import DEFAULT_CHAT_TEMPLATE

    from hf_models import make_hf_model, save_word_tokenizer

    model = tmp_path / "model"
    make_hf_model("qwen2", model)
    save_word_tokenizer(model)  # no chat template
    data = write_chat_data(tmp_path / "chat.jsonl", n=8)
    result = nomoat.train(str(model), data=str(data), output_dir=str(tmp_path / "runs"), name="t", max_steps=2,
                          seq_len=128, batch_size=2, lora={"r": 2}, progress=False, console=Console(quiet=True))
    assert (result.adapter_dir / "chat_template.jinja").read_text() == DEFAULT_CHAT_TEMPLATE
    no_adapter = CliRunner().invoke(app, ["chat", str(model)], input="/exit\n")
    assert no_adapter.exit_code == 2 and "no chat template" in no_adapter.output
    with_adapter = CliRunner().invoke(app, ["chat", str(model), "--adapter", str(result.adapter_dir),
                                            "--max-tokens", "3"], input="w5 w6\n/exit\n")  # fmt: skip
    assert with_adapter.exit_code == 0, with_adapter.output
