"""Data-parallel LoRA training: tokens/s of one process against N processes (torchrun) at the same global batch.

The same random Llama-shaped model (transformers config, word tokenizer) and the same seeded chat data train with
`nomoat train` once in one process with batch G, then with `torchrun --nproc-per-node N -m nomoat train` with batch
G / N per process: both take the same optimizer steps, so the tokens/s ratio is the speed-up (the scaling
efficiency is that ratio over N). On a 2-core CPU two processes share the two cores (one thread each against two
threads for the single process), so expect no speed-up: the figure shows what the gradient sums and the second
process cost. On a GPU machine (`--device cuda`) each process takes a GPU and NCCL sums the gradients; the goal
there is >= 1.8x on 2 GPUs.

Tokens/s is read from the run's `metrics.jsonl` (real input tokens of the global step over rank 0's step time),
as the median after warm-up steps.

    python benchmarks/bench_ddp.py [--quick] [--nproc N] [--device cpu|cuda] [--steps N] [--batch G]

Prints one JSON object as its last line (see DESIGN.md, Benchmarks): ratios are N processes / 1 process (higher is
better).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny-model helpers the tests use


def make_workspace(ws: Path, hidden: int, layers: int, examples: int) -> None:
    """A random Llama-shaped model with a word tokenizer and seeded chat data in `ws`."""
    import transformers

    from hf_models import save_word_tokenizer
    from train_utils import WORD_TEMPLATE, write_chat_data

    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=hidden * 4 // 3 * 2,
                                   num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                                   num_key_value_heads=max(1, hidden // 128), max_position_embeddings=1024,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                   tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(ws / "model")
    save_word_tokenizer(ws / "model", chat_template=WORD_TEMPLATE)
    write_chat_data(ws / "chat.jsonl", n=examples, max_words=120)


def run(ws: Path, nproc: int, batch: int, steps: int, device: str, seq_len: int) -> dict:
    """Train with `nproc` processes at global batch `batch`; the median tokens/s after warm-up and the wall time."""
    name = f"p{nproc}"
    (ws / f"{name}.yaml").write_text(f"seq_len: {seq_len}\npacking: true\nmax_steps: {steps}\nlog_every: 1\n"
                                     f"device: {device}\nval_size: 0\nsave_every: 0\nschedule: constant\n")  # fmt: skip
    args = ["-m", "nomoat", "train", str(ws / "model"), "-d", str(ws / "chat.jsonl"), "-c", str(ws / f"{name}.yaml"),
            "--batch-size", str(batch // nproc), "--name", name, "--output-dir", str(ws / "runs"),
            "--no-progress"]  # fmt: skip
    if nproc > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    if device == "cpu":
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{nproc} process(es) failed:\n{out.stderr[-4000:]}")
    records = [json.loads(line) for line in (ws / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    warm = max(1, len(records) // 4)
    tps = statistics.median(r["tokens_per_s"] for r in records[warm:])
    return {"processes": nproc, "batch_per_process": batch // nproc, "global_batch": batch, "steps": steps,
            "tokens_per_s": round(tps, 1), "final_loss": round(records[-1]["loss"], 6), "wall_s": round(wall, 1),
            "threads_per_process": env.get("OMP_NUM_THREADS")}  # fmt: skip


def machine(device: str) -> dict:
    """What the numbers were measured on."""
    out = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
           "python": platform.python_version(), "device": device}  # fmt: skip
    if device == "cuda" and torch.cuda.is_available():
        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model and few steps (about a minute on CPU)")
    parser.add_argument("--nproc", type=int, default=2, help="processes to compare with one (GPUs on --device cuda)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None, help="global batch (rows of --seq-len tokens)")
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    gpu = args.device == "cuda"
    hidden, layers = (256, 4) if args.quick else ((1024, 16) if gpu else (576, 8))
    steps = args.steps or (12 if args.quick else 40)
    batch = args.batch or (4 if args.quick else (16 if gpu else 8))
    if batch % args.nproc:
        raise SystemExit(f"--batch {batch} must be a multiple of --nproc {args.nproc}")
    with tempfile.TemporaryDirectory(prefix="nomoat-bench-ddp-") as tmp:
        ws = Path(tmp)
        make_workspace(ws, hidden, layers, examples=max(64, batch * steps))
        one = run(ws, 1, batch, steps, args.device, args.seq_len)
        many = run(ws, args.nproc, batch, steps, args.device, args.seq_len)
    speedup = many["tokens_per_s"] / one["tokens_per_s"]
    print(json.dumps({
        "benchmark": "ddp", "machine": machine(args.device), "quick": args.quick,
        "model": {"hidden": hidden, "layers": layers, "seq_len": args.seq_len}, "results": [one, many],
        "ratios": {f"train_tokens_per_s_{args.nproc}proc_vs_1proc": round(speedup, 3),
                   f"scaling_efficiency_{args.nproc}proc": round(speedup / args.nproc, 3),
                   "final_loss_diff_abs": abs(many["final_loss"] - one["final_loss"])},
    }))  # fmt: skip


if __name__ == "__main__":
    main()
