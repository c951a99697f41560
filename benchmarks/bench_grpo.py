"""GRPO training speed: nomoat's RL recipe (rollouts through its engine) against TRL's `GRPOTrainer` (rollouts by
transformers `generate`, LoRA through PEFT).

Both train the same random SmolLM2-135M-shaped model folder (`--tiny`: a 2-layer model), built as in bench_dpo.py,
on the same prompts: one prompt per step with G=8 completions of at most 128 tokens (temperature 1), a length
reward, LoRA r=16 alpha 32 on q,k,v,o,gate,up,down, AdamW lr 2e-4 constant, fp32 on the CPU, no KL (beta 0, both
defaults), DAPO's token-level loss. Each engine runs in its own subprocess (its own peak RSS).

Measured after `--warmup` steps: completed samples per second over the wall time of whole steps (sampling, scoring
and the update). Target (issue): >= 3x TRL. TRL is a benchmark extra; absent, it is reported as absent.

    python benchmarks/bench_grpo.py [--quick] [--tiny] [--steps N] [--warmup N]

Prints one JSON object as its last line (see DESIGN.md, Benchmarks).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_dpo import TARGETS, build, peak_rss_mib

G, MAX_NEW = 8, 128


def length_reward(completions: list[Any], **kw: Any) -> list[float]:
    """Reward for TRL: 1 at 200 characters, falling linearly to 0 (nomoat's built-in `length=200`)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [max(0.0, 1 - abs(len(t) - 200) / 200) for t in texts]


def write_prompts(folder: Path, n: int, vocab_words: int, seed: int = 1) -> Path:
    rng = random.Random(seed)
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": " ".join(
        f"w{rng.randrange(7, vocab_words)}" for _ in range(rng.randint(20, 80)))}]}) + "\n" for _ in range(n)))
    return path


def run_nomoat(folder: Path, steps: int, warmup: int) -> dict[str, Any]:
    """nomoat's GRPO recipe with the engine's rollouts; samples/s from its per-step metrics after warm-up."""
    from rich.console import Console

    from nomoat.cli.train import engine_sampler
    from nomoat.config.train import TrainConfig
    from nomoat.train.rl import RLRecipe

    cfg = TrainConfig(model=str(folder), data=[str(folder / "prompts.jsonl")], method="grpo", reward=["length=200"],
                      output_dir=str(folder / "runs"), max_steps=steps, batch_size=1, num_generations=G,
                      max_new_tokens=MAX_NEW, seq_len=512, lr=2e-4, schedule="constant", warmup_steps=0,
                      dtype="float32", device="cpu", log_every=1, loss_type="dapo",
                      lora={"r": 16, "alpha": 32, "target_modules": TARGETS})  # fmt: skip
    result = RLRecipe(cfg, console=Console(quiet=True), progress=False, sampler=engine_sampler).run()
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()][warmup:]
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in records)
    return {"samples_per_s": G * len(records) / seconds, "peak_rss_mib": round(peak_rss_mib(), 1),
            "mean_completion_tokens": sum(r["completion_length"] for r in records) / len(records)}  # fmt: skip


def run_trl(folder: Path, steps: int, warmup: int) -> dict[str, Any]:
    """TRL's GRPOTrainer with a PEFT LoRA and transformers generation; samples/s from step times after warm-up."""
    import datasets
    import transformers
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    times: list[float] = []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self.t = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            times.append(time.perf_counter() - self.t)

    records = [json.loads(x) for x in (folder / "prompts.jsonl").read_text().splitlines()]
    args = GRPOConfig(output_dir=str(folder / "trl"), per_device_train_batch_size=G, num_generations=G,
                      max_completion_length=MAX_NEW, max_steps=steps, learning_rate=2e-4, lr_scheduler_type="constant",
                      use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, bf16=False, temperature=1.0,
                      loss_type="dapo", beta=0.0)  # fmt: skip
    trainer = GRPOTrainer(model=transformers.AutoModelForCausalLM.from_pretrained(folder), args=args,
                          reward_funcs=length_reward, train_dataset=datasets.Dataset.from_list(records),
                          processing_class=transformers.AutoTokenizer.from_pretrained(folder),
                          peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM"),
                          callbacks=[Clock()])  # fmt: skip
    trainer.train()
    measured = times[warmup:]
    return {"samples_per_s": G * len(measured) / sum(measured), "peak_rss_mib": round(peak_rss_mib(), 1)}


def main() -> None:
    """Build the model and prompts, run each engine in a subprocess, print the JSON summary."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer steps")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model (a smoke run of the script)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--worker", choices=["nomoat", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    steps = a.steps or (3 if a.quick or a.tiny else 10)
    if a.worker:
        fn = run_nomoat if a.worker == "nomoat" else run_trl
        print(json.dumps(fn(a.dir, steps, a.warmup)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        build(folder, a.tiny, pairs=1)
        write_prompts(folder, steps + 2, 512 if a.tiny else 49152)
        results: list[dict[str, Any]] = []
        for engine in ("nomoat", "trl"):
            if engine == "trl" and importlib.util.find_spec("trl") is None:
                results.append({"engine": "trl", "absent": True})
                continue
            out = subprocess.run([sys.executable, __file__, "--worker", engine, "--dir", str(folder), "--steps",
                                  str(steps), "--warmup", str(a.warmup)], capture_output=True, text=True,
                                 env={**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"})  # fmt: skip
            if out.returncode != 0:
                results.append({"engine": engine, "error": out.stderr[-2000:]})
                continue
            results.append({"engine": engine, **json.loads(out.stdout.strip().splitlines()[-1])})
    by = {r["engine"]: r for r in results}
    ratios = {}
    if "samples_per_s" in by.get("nomoat", {}) and "samples_per_s" in by.get("trl", {}):
        ratios = {"samples_per_s_vs_trl": round(by["nomoat"]["samples_per_s"] / by["trl"]["samples_per_s"], 3),
                  "peak_rss_vs_trl": round(by["nomoat"]["peak_rss_mib"] / by["trl"]["peak_rss_mib"], 3)}  # fmt: skip
    print(json.dumps({"benchmark": "grpo", "machine": f"{platform.machine()} {os.cpu_count()} cpus",
                      "model": "tiny" if a.tiny else "SmolLM2-135M shape", "steps": steps, "warmup": a.warmup,
                      "results": results, "ratios": ratios}))  # fmt: skip


if __name__ == "__main__":
    main()
