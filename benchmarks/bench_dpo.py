"""DPO training speed and memory: nomoat's preference recipe against TRL's `DPOTrainer` (transformers + PEFT).

Both train the same random SmolLM2-135M-shaped model folder (`train_bench.build_model`; `--tiny`: 2 layers) on the
same conversational pairs (prompt/chosen/rejected message lists, rendered with the same chat template by both) that
fill the sequence length: a prompt of 200-250 words and answers of 200-250 words make sequences of 410-510 tokens,
under the limit of 512, so neither engine truncates. LoRA r=16, alpha 32 on q,k,v,o,gate,up,down, 2 pairs per step,
AdamW lr 2e-4 constant, fp32 on the CPU, sigmoid DPO with beta 0.1, the reference being the adapter switched off in
both. Each engine runs in its own subprocess, so its peak RSS (`ru_maxrss`) is its own.

Measured after `--warmup` steps: pairs per second over wall time per step; tokens/s is that times the mean
tokens of a pair (prompt + chosen and prompt + rejected, nomoat's tokenization), the same factor for both. Targets
(issue): tokens/s >= 2x TRL, peak RSS <= 0.7x. TRL is a benchmark extra; absent, it is reported as absent.

    python benchmarks/bench_dpo.py [--quick] [--tiny] [--steps N] [--warmup N] [--repeats R]

Prints one JSON object as its last line (see DESIGN.md, Benchmarks).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import train_bench as tb

SEQ_LEN, PAIRS_PER_STEP = 512, 2


def write_pairs(folder: Path, tiny: bool, n: int, seed: int = 0) -> Path:
    """`n` conversational pairs of random words whose sequences nearly fill `SEQ_LEN` (see the module docstring)."""
    rng, vocab = random.Random(seed), tb.vocab_size(tiny)
    path = folder / "pairs.jsonl"
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": [{"role": "user", "content": tb.words(rng, vocab, 200, 250)}],
                                "chosen": [{"role": "assistant", "content": tb.words(rng, vocab, 200, 250)}],
                                "rejected": [{"role": "assistant", "content": tb.words(rng, vocab, 200, 250)}]}) + "\n")
    return path


def run_nomoat(folder: Path, steps: int, warmup: int) -> dict[str, Any]:
    """nomoat's DPO recipe; pairs/s from its per-step metrics after the warm-up steps."""
    from rich.console import Console

    from nomoat.config.train import TrainConfig
    from nomoat.data import load_dataset, tokenize_preference
    from nomoat.tokenizer import Tokenizer
    from nomoat.train.preference import PreferenceRecipe

    cfg = TrainConfig(model=str(folder), data=[str(folder / "pairs.jsonl")], method="dpo", beta=0.1,
                      output_dir=str(folder / "runs"), max_steps=steps, batch_size=PAIRS_PER_STEP, seq_len=SEQ_LEN,
                      lr=2e-4, schedule="constant", warmup_steps=0, dtype="float32", device="cpu", log_every=1,
                      lora={"r": 16, "alpha": 32, "target_modules": tb.TARGETS})  # fmt: skip
    result = PreferenceRecipe(cfg, console=Console(quiet=True), progress=False).run()
    records, seconds = tb.nomoat_metrics(result.run_dir, warmup)
    tok = Tokenizer.from_dir(folder)
    pair_tokens = [sum(len(t) for t in tokenize_preference(e, tok, SEQ_LEN))
                   for e in load_dataset(folder / "pairs.jsonl").examples]  # fmt: skip
    return {"pairs_per_s": sum(r["pairs"] for r in records) / seconds,
            "mean_pair_tokens": sum(pair_tokens) / len(pair_tokens), "peak_rss_mib": round(tb.peak_rss_mib(), 1)}


def run_trl(folder: Path, steps: int, warmup: int) -> dict[str, Any]:
    """TRL's DPOTrainer with a PEFT LoRA; pairs/s from step times after the warm-up steps."""
    import datasets
    import transformers
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    times: list[float] = []
    records = [json.loads(x) for x in (folder / "pairs.jsonl").read_text().splitlines()]
    args = DPOConfig(output_dir=str(folder / "trl"), per_device_train_batch_size=PAIRS_PER_STEP, max_steps=steps,
                     learning_rate=2e-4, lr_scheduler_type="constant", beta=0.1, max_length=SEQ_LEN, use_cpu=True,
                     report_to=[], save_strategy="no", logging_steps=1, bf16=False)  # fmt: skip
    trainer = DPOTrainer(model=transformers.AutoModelForCausalLM.from_pretrained(folder), args=args,
                         train_dataset=datasets.Dataset.from_list(records),
                         processing_class=transformers.AutoTokenizer.from_pretrained(folder),
                         peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=tb.TARGETS, task_type="CAUSAL_LM"),
                         callbacks=[tb.step_clock(times)])  # fmt: skip
    trainer.train()
    measured = times[warmup:]
    return {"pairs_per_s": PAIRS_PER_STEP * len(measured) / sum(measured), "peak_rss_mib": round(tb.peak_rss_mib(), 1)}


def main() -> None:
    """Build the model and data, run each engine in subprocesses, print the JSON summary."""
    a = tb.parse_args(__doc__, steps=12, quick_steps=6, warmup=2)
    if tb.worker_main(a, {"nomoat": run_nomoat, "trl": run_trl}):
        return
    n_pairs = PAIRS_PER_STEP * a.steps + 8
    results, load = tb.run_benchmark(__file__, a, lambda folder: write_pairs(folder, a.tiny, n_pairs), "pairs_per_s")
    tokens = next((r["mean_pair_tokens"] for r in results if "mean_pair_tokens" in r), None)
    for r in results:
        if "pairs_per_s" in r and tokens:
            r["tokens_per_s"] = round(r["pairs_per_s"] * tokens, 1)
    print(tb.summary("dpo", a, results, tb.ratios_vs_trl(results, "tokens_per_s", "train_tokens_per_s_vs_trl"), load))


if __name__ == "__main__":
    main()
