"""Data-parallel training with real torchrun processes on loopback (gloo): equality with one process, resume with
another process count, a two-node rendezvous, and a killed rank.

N processes with batch B must take the same steps as one process with batch N x B: the losses are compared per
step (fp32) against a one-process run of the same command, started the same way (its own process, one thread).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nomoat.train.checkpointing import list_checkpoints
from processes import free_port

from distributed_utils import (
    CONFIG,
    TIMEOUT,
    launch_env,
    make_workspace,
    max_diff,
    run_losses,
    run_ok,
    torchrun,
    train_args,
)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or sys.platform == "win32",
                                reason="torch.distributed with gloo is not available here")  # fmt: skip

TOL = 1e-6  # fp32 losses, absolute


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A tiny model, a chat dataset, the run file, and the one-process reference run with batch 4."""
    ws = make_workspace(tmp_path_factory.mktemp("ddp"))
    run_ok([sys.executable, *train_args(ws, "one", 4)], ws)
    return ws


def test_two_processes_equal_one_with_the_doubled_batch(ws):
    run_ok(torchrun(2, *train_args(ws, "two", 2)), ws)
    one, two = run_losses(ws / "runs" / "one"), run_losses(ws / "runs" / "two")
    assert len(two) == 6
    diff = max_diff(one, two)
    print(f"SFT 2 processes x batch 2 vs 1 x 4: max loss difference {diff:.2e}")
    assert diff <= TOL
    assert one[1] != one[6]  # the steps train (a frozen run would compare equal trivially)
    # Rank 0 alone wrote the adapter and the checkpoints, with world-size-free data positions.
    a1 = load_file(str(ws / "runs" / "one" / "adapter" / "adapter_model.safetensors"))
    a2 = load_file(str(ws / "runs" / "two" / "adapter" / "adapter_model.safetensors"))
    for k in a1:
        torch.testing.assert_close(a2[k], a1[k], atol=1e-5, rtol=1e-4)
    s1 = json.loads((ws / "runs" / "one" / "checkpoints" / "step-000003" / "state.json").read_text())
    s2 = json.loads((ws / "runs" / "two" / "checkpoints" / "step-000003" / "state.json").read_text())
    assert s1["data"] == s2["data"] and s1["tokens_seen"] == s2["tokens_seen"]


def test_resume_two_processes_with_one(ws):
    runs = ws / "runs"
    run_ok([sys.executable, *train_args(ws, "resumed", 2, "--nproc", "2")], ws)  # nomoat starts torchrun itself
    two = run_losses(runs / "resumed")
    assert max_diff(two, run_losses(runs / "one")) <= TOL
    # As if the run had been killed after the checkpoint of step 3: drop what came later.
    shutil.rmtree(runs / "resumed" / "checkpoints" / "step-000006")
    run_ok([sys.executable, *train_args(ws, "resumed", 4, "--resume")], ws)  # one process, same global batch
    resumed = run_losses(runs / "resumed")
    diff = max_diff({k: v for k, v in two.items() if k > 3}, {k: v for k, v in resumed.items() if k > 3})
    print(f"resume of a 2-process run with 1 process: max loss difference {diff:.2e}")
    assert diff <= TOL
    assert max_diff(resumed, run_losses(runs / "one")) <= TOL


PRETRAIN = """\
import json, sys
from nomoat.train.pretrain import pretrain
ws, out = sys.argv[1], sys.argv[2]
r = pretrain(model=ws + "/model", data=[ws + "/chat.jsonl"], output=ws + "/" + out, batch_size=int(sys.argv[3]),
             seq_len=64, max_steps=5, lr=3e-3, warmup_steps=0, schedule="constant", device="cpu", log_every=1,
             save_dtype="float32", seed=2, progress=False)
json.dump(r.losses, open(ws + "/" + out + ".losses.json", "w"))
"""


def test_continued_pretraining_two_processes_equal_one(ws):
    script = ws / "pretrain_run.py"
    script.write_text(PRETRAIN)
    run_ok([sys.executable, str(script), str(ws), "pre1", "4"], ws)
    run_ok(torchrun(2, str(script), str(ws), "pre2", "2"), ws)
    one = json.loads((ws / "pre1.losses.json").read_text())
    two = json.loads((ws / "pre2.losses.json").read_text())
    diff = max(abs(a - b) for a, b in zip(one, two, strict=True))
    print(f"continued pretraining 2 processes x batch 2 vs 1 x 4: max loss difference {diff:.2e}")
    assert len(one) == 5 and diff <= TOL and one[0] != one[-1]
    w1, w2 = load_file(str(ws / "pre1" / "model.safetensors")), load_file(str(ws / "pre2" / "model.safetensors"))
    for k in w1:  # Adam turns ulp-sized differences of near-zero gradients into steps of up to lr: atol ~ lr / 30
        torch.testing.assert_close(w2[k], w1[k], atol=1e-4, rtol=1e-3)


def test_two_node_rendezvous_on_loopback(ws):
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=nomoat-test", *train_args(ws, "nodes", 2)]  # fmt: skip
    nodes = [subprocess.Popen(cmd, cwd=ws, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    try:
        outs = [n.communicate(timeout=TIMEOUT) for n in nodes]
    finally:
        for n in nodes:
            if n.poll() is None:
                n.kill()
    for n, (out, err) in zip(nodes, outs, strict=True):
        assert n.returncode == 0, f"{out[-2000:]}\n{err[-4000:]}"
    assert (ws / "runs" / "nodes" / "adapter" / "adapter_model.safetensors").is_file()
    diff = max_diff(run_losses(ws / "runs" / "nodes"), run_losses(ws / "runs" / "one"))
    print(f"2 nodes x 1 process x batch 2 vs 1 x 4: max loss difference {diff:.2e}")
    assert diff <= TOL


def _worker_of_rank(launcher: int, rank: int) -> int | None:
    psutil = pytest.importorskip("psutil")
    for p in psutil.Process(launcher).children(recursive=True):
        try:
            if p.environ().get("RANK") == str(rank) and "nomoat" in " ".join(p.cmdline()):
                return p.pid
        except psutil.Error:
            continue
    return None


def test_killed_rank_stops_the_others_and_keeps_the_last_checkpoint(ws):
    (ws / "long.yaml").write_text(CONFIG.replace("max_steps: 6", "max_steps: 100000").replace("save_every: 3",
                                                                                              "save_every: 1"))
    args = train_args(ws, "killed", 2)
    args[args.index("-c") + 1] = str(ws / "long.yaml")
    launcher = subprocess.Popen(torchrun(2, *args), cwd=ws, env=launch_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
    run_dir = ws / "runs" / "killed"
    try:
        deadline = time.monotonic() + TIMEOUT
        while len(list_checkpoints(run_dir)) < 2 and time.monotonic() < deadline and launcher.poll() is None:
            time.sleep(0.2)
        assert len(list_checkpoints(run_dir)) >= 2, "the run wrote no checkpoints"
        victim = _worker_of_rank(launcher.pid, 1)
        assert victim is not None, "rank 1 not found"
        os.kill(victim, signal.SIGKILL)
        out, err = launcher.communicate(timeout=120)  # the others stop within the timeout, not at max_steps
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    assert "lost contact with the other processes" in err, err[-4000:]
    assert "--resume --name killed" in err  # how to continue
    last = list_checkpoints(run_dir)[-1]  # complete and readable
    state = json.loads((last / "state.json").read_text())
    assert state["step"] == int(last.name.split("-")[1])
    tensors = load_file(str(last / "trainable.safetensors"))
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values())


def test_shards_partition_each_global_batch():
    from nomoat.data.packing import BatchStream, Row

    rows = [Row([i, i + 1], [-100, i + 1], [0, 1], [1, 1]) for i in range(7)]  # 7 rows: batches of 3, 3, 1
    whole = [b["input_ids"].tolist() for b in BatchStream(rows, 3, seed=5)]
    shards = [[b for b in BatchStream(rows, 3, seed=5, shard=(r, 2))] for r in range(2)]
    for k, batch in enumerate(whole):
        parts = [s[k] for s in shards]
        real = [row for p in parts for row, n in zip(p["input_ids"].tolist(), (p["labels"] != -100).sum(1))
                if n > 0]  # fmt: skip
        assert real == batch  # rank 0's rows, then rank 1's: the global batch in order
        assert sum(p["num_label_tokens"] for p in parts) == len(batch)
    assert shards[0][2]["num_label_tokens"] == 0  # one row for two ranks: rank 0 gets a token without a label
    assert BatchStream(rows, 3, seed=5, shard=(1, 2)).state_dict() == BatchStream(rows, 3, seed=5).state_dict()


def test_nproc_is_handed_to_torchrun():
    from nomoat.train.distributed import strip_option, torchrun_command

    args = strip_option(["train", "m", "--nproc", "2", "-b", "4", "--nproc=3"], "--nproc")
    assert args == ["train", "m", "-b", "4"]
    cmd = torchrun_command(2, args)
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and cmd[-6:] == ["-m", "nomoat", "train", "m", "-b", "4"]
