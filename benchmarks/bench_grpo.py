"""GRPO training speed: nomoat's RL recipe (rollouts through its engine) against TRL's `GRPOTrainer` (rollouts by
transformers `generate`, LoRA through PEFT).

Both train the same random SmolLM2-135M-shaped model folder (`train_bench.build_model`; `--tiny`: 2 layers) on the
same prompts: one prompt per step with G=8 completions of at most 128 tokens (temperature 1), a length reward, LoRA
r=16 alpha 32 on q,k,v,o,gate,up,down, AdamW lr 2e-4 constant, fp32 on the CPU, no KL (beta 0, both defaults),
DAPO's token-level loss. Each engine runs in its own subprocess (its own peak RSS). The random model hardly ever
ends a completion early, so both sample about 128 tokens each (`mean_completion_tokens` says), about 840 characters
of words: the length reward's target, 800 characters, sits near them, so rewards differ within a group and every
step's update is a real one (a target far from every completion scores them all 0: zero advantages).

Measured after `--warmup` steps: completed samples per second over the wall time of whole steps (sampling, scoring
and the update). Target (issue): >= 3x TRL. TRL is a benchmark extra; absent, it is reported as absent.

    python benchmarks/bench_grpo.py [--quick] [--tiny] [--steps N] [--warmup N] [--repeats R]

Prints one JSON object as its last line (see DESIGN.md, Benchmarks).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import train_bench as tb

G, MAX_NEW = 8, 128
TARGET_CHARS = 800  # the length reward's target


def length_reward(completions: list[Any], **kw: Any) -> list[float]:
    """Reward for TRL: 1 at TARGET_CHARS characters, falling linearly to 0 (nomoat's built-in `length=N`)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [max(0.0, 1 - abs(len(t) - TARGET_CHARS) / TARGET_CHARS) for t in texts]


def write_prompts(folder: Path, tiny: bool, n: int, seed: int = 1) -> Path:
    """`n` conversational prompts of 20-80 random words."""
    rng, vocab = random.Random(seed), tb.vocab_size(tiny)
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": tb.words(rng, vocab, 20, 80)}]}) + "\n"
                            for _ in range(n)))  # fmt: skip
    return path


def run_nomoat(folder: Path, steps: int, warmup: int) -> dict[str, Any]:
    """nomoat's GRPO recipe with the engine's rollouts; samples/s from its per-step metrics after warm-up."""
    from rich.console import Console

    from nomoat.cli.train import engine_sampler
    from nomoat.config.train import TrainConfig
    from nomoat.train.rl import RLRecipe

    cfg = TrainConfig(model=str(folder), data=[str(folder / "prompts.jsonl")], method="grpo",
                      reward=[f"length={TARGET_CHARS}"],
                      output_dir=str(folder / "runs"), max_steps=steps, batch_size=1, num_generations=G,
                      max_new_tokens=MAX_NEW, seq_len=512, lr=2e-4, schedule="constant", warmup_steps=0,
                      dtype="float32", device="cpu", log_every=1, loss_type="dapo",
                      lora={"r": 16, "alpha": 32, "target_modules": tb.TARGETS})  # fmt: skip
    result = RLRecipe(cfg, console=Console(quiet=True), progress=False, sampler=engine_sampler).run()
    records, seconds = tb.nomoat_metrics(result.run_dir, warmup)
    return {"samples_per_s": G * len(records) / seconds, "peak_rss_mib": round(tb.peak_rss_mib(), 1),
            "mean_completion_tokens": sum(r["completion_length"] for r in records) / len(records)}  # fmt: skip


def run_trl(folder: Path, steps: int, warmup: int) -> dict[str, Any]:
    """TRL's GRPOTrainer with a PEFT LoRA and transformers generation; samples/s from step times after warm-up."""
    import datasets
    import transformers
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    times: list[float] = []
    records = [json.loads(x) for x in (folder / "prompts.jsonl").read_text().splitlines()]
    args = GRPOConfig(output_dir=str(folder / "trl"), per_device_train_batch_size=G, num_generations=G,
                      max_completion_length=MAX_NEW, max_steps=steps, learning_rate=2e-4, lr_scheduler_type="constant",
                      use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, bf16=False, temperature=1.0,
                      loss_type="dapo", beta=0.0)  # fmt: skip
    trainer = GRPOTrainer(model=transformers.AutoModelForCausalLM.from_pretrained(folder), args=args,
                          reward_funcs=length_reward, train_dataset=datasets.Dataset.from_list(records),
                          processing_class=transformers.AutoTokenizer.from_pretrained(folder),
                          peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=tb.TARGETS, task_type="CAUSAL_LM"),
                          callbacks=[tb.step_clock(times)])  # fmt: skip
    trainer.train()
    measured = times[warmup:]
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"samples_per_s": G * len(measured) / sum(measured), "peak_rss_mib": round(tb.peak_rss_mib(), 1),
            "mean_completion_tokens": sum(lengths[warmup:]) / max(len(lengths[warmup:]), 1)}  # fmt: skip


def main() -> None:
    """Build the model and prompts, run each engine in subprocesses, print the JSON summary."""
    a = tb.parse_args(__doc__, steps=10, quick_steps=3, warmup=1)
    if tb.worker_main(a, {"nomoat": run_nomoat, "trl": run_trl}):
        return
    n_prompts = a.steps + 2
    results, load = tb.run_benchmark(__file__, a, lambda f: write_prompts(f, a.tiny, n_prompts), "samples_per_s")
    print(tb.summary("grpo", a, results, tb.ratios_vs_trl(results, "samples_per_s", "samples_per_s_vs_trl"), load))


if __name__ == "__main__":
    main()
