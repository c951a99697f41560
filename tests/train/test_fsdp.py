"""Sharded training (`--fsdp`, FSDP2) with two real torchrun processes on loopback (gloo, CPU): the same losses as
one unsharded process with the doubled batch, a plain PEFT adapter at the end, and exact resume from the sharded
(torch.distributed.checkpoint) checkpoints."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distributed_utils import launch_env, make_workspace, run_losses, run_ok, torchrun, train_args

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or sys.platform == "win32",
                                reason="torch.distributed with gloo is not available here")  # fmt: skip

TIMEOUT = 300
TOL = 1e-5  # fp32 losses, absolute: sharded reductions sum in another order than one process


def _env() -> dict[str, str]:
    return launch_env(NOMOAT_KERNELS="0")


def _train(ws: Path, name: str, batch: int, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    launch = [sys.executable] if nproc == 1 else torchrun(nproc)
    return run_ok([*launch, *train_args(ws, name, batch, "--rank", "4", *extra)], ws, TIMEOUT, _env())


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A tiny model and chat data; the one-process run with batch 4 and the two-process sharded run with batch 2."""
    ws = make_workspace(tmp_path_factory.mktemp("fsdp"))
    _train(ws, "one", 4, 1)
    _train(ws, "sharded", 2, 2, "--fsdp")
    return ws


def test_fsdp_two_processes_equal_one_with_the_doubled_batch(ws):
    one, sharded = run_losses(ws / "runs" / "one"), run_losses(ws / "runs" / "sharded")
    assert sorted(one) == sorted(sharded) == [1, 2, 3, 4, 5, 6]
    assert max(abs(one[k] - sharded[k]) for k in one) < TOL
    assert sharded[1] != sharded[6]  # it trained


def test_fsdp_writes_sharded_checkpoints_and_a_plain_peft_adapter(ws):
    """Checkpoints hold the trained tensors' shards and moments, not the frozen base; the adapter is whole."""
    import peft
    import transformers

    run = ws / "runs" / "sharded"
    ckpt = run / "checkpoints" / "step-000003"
    assert (ckpt / "sharded").is_dir() and (ckpt / "state.json").is_file()
    assert not list((run / "checkpoints").glob(".tmp-*"))
    a, b = run / "adapter", ws / "runs" / "one" / "adapter"
    ta, tb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert sorted(ta) == sorted(tb)
    for k in ta:  # Adam's steps magnify last-bit gradient differences of near-zero gradients: 6 steps of lr 1e-2
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-3, atol=1e-4)
    assert max(float(v.abs().max()) for k, v in tb.items() if "lora_B" in k) > 1e-2  # B left zero: it trained
    assert json.loads((a / "adapter_config.json").read_text()) == json.loads((b / "adapter_config.json").read_text())
    base = transformers.AutoModelForCausalLM.from_pretrained(ws / "model", dtype=torch.float32)
    tuned = peft.PeftModel.from_pretrained(base, a)  # the format vLLM and peft read
    loaded = {k.replace(".default", ""): v for k, v in tuned.state_dict().items() if "lora_" in k}
    for k, v in ta.items():
        torch.testing.assert_close(loaded[k], v)


def test_fsdp_resume_continues_the_same_run(ws):
    """A sharded run stopped after its step-3 checkpoint and resumed (two processes, --fsdp) gives the same steps."""
    run = ws / "runs" / "cut"
    shutil.copytree(ws / "runs" / "sharded", run)
    shutil.rmtree(run / "adapter")
    shutil.rmtree(run / "checkpoints" / "step-000006")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines[:4]))  # step 4 was logged, not saved
    out = _train(ws, "cut", 2, 2, "--fsdp", "--resume")
    assert "resumed" in out.stderr
    whole, resumed = run_losses(ws / "runs" / "sharded"), run_losses(run)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    assert max(abs(whole[k] - resumed[k]) for k in whole) < 1e-6
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_a_sharded_checkpoint_is_not_resumed_unsharded(ws):
    run = ws / "runs" / "mixed"
    shutil.copytree(ws / "runs" / "sharded", run)
    shutil.rmtree(run / "adapter")
    shutil.rmtree(run / "checkpoints" / "step-000006")
    cmd = [sys.executable, *train_args(ws, "mixed", 4, "--rank", "4", "--resume")]
    out = subprocess.run(cmd, cwd=ws, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 2 and "written by an --fsdp run" in out.stderr and "Traceback" not in out.stderr


def test_fsdp_refuses_a_quantized_base(ws):
    from rich.console import Console

    from nomoat.config.train import TrainConfig
    from nomoat.train import SFTRecipe
    from nomoat.util.errors import UsageError

    cfg = TrainConfig(model=str(ws / "model"), data=[str(ws / "chat.jsonl")], output_dir=str(ws / "runs"), name="q",
                      quantize_base="int8", max_steps=1)  # fmt: skip
    recipe = SFTRecipe(cfg, console=Console(quiet=True), progress=False)
    recipe.settings.fsdp = True
    with pytest.raises(UsageError, match="cannot shard a quantized base"):
        recipe.run()
    assert not (ws / "runs" / "q").exists()
