"""What the tests of training in several torchrun processes share: a workspace (a tiny model, chat data and a run
file), `nomoat train` command lines and torchrun's, running a command with this checkout's sources, a run's losses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from train_utils import make_chat_model, write_chat_data

SRC = Path(__file__).resolve().parents[2] / "src"
TIMEOUT = 240  # seconds for one launched run

CONFIG = """\
seq_len: 64
packing: true
max_steps: 6
lr: 0.01
schedule: constant
warmup_steps: 0
save_every: 3
keep_checkpoints: 5
log_every: 1
device: cpu
seed: 1
val_size: 0
"""


def make_workspace(ws: Path) -> Path:
    """`ws` with a tiny chat model (model/), 24 chat examples (chat.jsonl) and the run file `CONFIG` (cfg.yaml)."""
    make_chat_model(ws / "model")
    write_chat_data(ws / "chat.jsonl", n=24)
    (ws / "cfg.yaml").write_text(CONFIG)
    return ws


def launch_env(**extra: str) -> dict[str, str]:
    """This process's environment with this checkout's sources and test helpers first on the path, one thread per
    process, a 60 s limit on waiting for the other processes, and `extra`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    env.update(OMP_NUM_THREADS="1", NOMOAT_DIST_TIMEOUT="60", TORCH_CPP_LOG_LEVEL="ERROR", **extra)
    return env


def run_ok(cmd: list[str], cwd: Path, timeout: float = TIMEOUT, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess:  # fmt: skip
    """Run `cmd` to its end (in `env`, by default `launch_env()`); assert that it succeeded (else show its output)."""
    env = launch_env() if env is None else env
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)}: {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    return out


def torchrun(nproc: int, *args: str) -> list[str]:
    """`python -m torch.distributed.run` with `nproc` processes on this machine, each running `args`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]


def train_args(ws: Path, name: str, batch: int, *extra: str) -> list[str]:
    """`-m nomoat train` on the workspace `ws`'s model, data and run file, into runs/`name`."""
    return ["-m", "nomoat", "train", str(ws / "model"), "-d", str(ws / "chat.jsonl"), "-c", str(ws / "cfg.yaml"),
            "--batch-size", str(batch), "--name", name, "--output-dir", str(ws / "runs"), "--no-progress",
            *extra]  # fmt: skip


def run_losses(run_dir: Path) -> dict[int, float]:
    """{step: loss} of a run's metrics.jsonl."""
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def max_diff(a: dict[int, float], b: dict[int, float]) -> float:
    """The largest difference of two runs' losses, which must have the same steps."""
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    return max(abs(a[k] - b[k]) for k in a)
