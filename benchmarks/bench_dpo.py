"""DPO training speed and memory: nomoat's preference recipe against TRL's `DPOTrainer` (transformers + PEFT).

Both train the same random SmolLM2-135M-shaped model folder (built with transformers; `--tiny`: a 2-layer model
with a 512-word vocabulary) on the same conversational pairs (prompt/chosen/rejected message lists, rendered with
the same chat template by both), LoRA r=16, alpha 32 on q,k,v,o,gate,up,down, sequence length 512, 2 pairs per
step, AdamW lr 2e-4 constant, fp32 on the CPU, sigmoid DPO with beta 0.1, the reference being the adapter switched
off in both. Each engine runs in its own subprocess, so its peak RSS (`ru_maxrss`) is its own.

Measured after `--warmup` steps: pairs per second over wall time per step; tokens/s is that times the mean
tokens of a pair (prompt + chosen and prompt + rejected, nomoat's tokenization), the same factor for both. Targets
(issue): tokens/s >= 2x TRL, peak RSS <= 0.7x. TRL is a benchmark extra; absent, it is reported as absent.

    python benchmarks/bench_dpo.py [--quick] [--tiny] [--steps N] [--warmup N]

Prints one JSON object as its last line (see DESIGN.md, Benchmarks).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")  # fmt: skip
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(folder: Path, tiny: bool, pairs: int, seed: int = 0) -> None:
    """A random SmolLM2-135M-shaped Llama (or a tiny one), a word tokenizer with a chat template, and pairs."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = 512 if tiny else 49152
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2) if tiny else dict(hidden_size=576, intermediate_size=1536,
                 num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3)  # fmt: skip
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=True,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0, **shape)  # fmt: skip
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    words = {"<pad>": 0, "<s>": 1, "</s>": 2, "<|im_start|>": 3, "<|im_end|>": 4, "user": 5, "assistant": 6,
             **{f"w{i}": i for i in range(7, vocab)}}  # fmt: skip
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "<|im_end|>",
                                                               "pad_token": "<pad>", "chat_template": TEMPLATE}))
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(f"w{rng.randrange(7, vocab)}" for _ in range(rng.randint(lo, hi)))

    with open(folder / "pairs.jsonl", "w") as f:
        for _ in range(pairs):
            f.write(json.dumps({"prompt": [{"role": "user", "content": text(20, 200)}],
                                "chosen": [{"role": "assistant", "content": text(20, 150)}],
                                "rejected": [{"role": "assistant", "content": text(20, 150)}]}) + "\n")  # fmt: skip


def run_nomoat(folder: Path, steps: int, warmup: int) -> dict[str, Any]:
    """nomoat's DPO recipe; pairs/s from its per-step metrics after the warm-up steps."""
    from rich.console import Console

    from nomoat.config.train import TrainConfig
    from nomoat.data import load_dataset, tokenize_preference
    from nomoat.tokenizer import Tokenizer
    from nomoat.train.preference import PreferenceRecipe

    cfg = TrainConfig(model=str(folder), data=[str(folder / "pairs.jsonl")], method="dpo", beta=0.1,
                      output_dir=str(folder / "runs"), max_steps=steps, batch_size=2, seq_len=512, lr=2e-4,
                      schedule="constant", warmup_steps=0, dtype="float32", device="cpu", log_every=1,
                      lora={"r": 16, "alpha": 32, "target_modules": TARGETS})  # fmt: skip
    result = PreferenceRecipe(cfg, console=Console(quiet=True), progress=False).run()
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()][warmup:]
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in records)
    tok = Tokenizer.from_dir(folder)
    pair_tokens = [sum(len(t) for t in tokenize_preference(e, tok, 512))
                   for e in load_dataset(folder / "pairs.jsonl").examples]  # fmt: skip
    return {"pairs_per_s": sum(r["pairs"] for r in records) / seconds,
            "mean_pair_tokens": sum(pair_tokens) / len(pair_tokens), "peak_rss_mib": round(peak_rss_mib(), 1)}


def run_trl(folder: Path, steps: int, warmup: int) -> dict[str, Any]:
    """TRL's DPOTrainer with a PEFT LoRA; pairs/s from step times after the warm-up steps."""
    import datasets
    import transformers
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    times: list[float] = []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self.t = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            times.append(time.perf_counter() - self.t)

    records = [json.loads(x) for x in (folder / "pairs.jsonl").read_text().splitlines()]
    args = DPOConfig(output_dir=str(folder / "trl"), per_device_train_batch_size=2, max_steps=steps,
                     learning_rate=2e-4, lr_scheduler_type="constant", beta=0.1, max_length=512, use_cpu=True,
                     report_to=[], save_strategy="no", logging_steps=1, bf16=False)  # fmt: skip
    trainer = DPOTrainer(model=transformers.AutoModelForCausalLM.from_pretrained(folder), args=args,
                         train_dataset=datasets.Dataset.from_list(records),
                         processing_class=transformers.AutoTokenizer.from_pretrained(folder),
                         peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM"),
                         callbacks=[Clock()])  # fmt: skip
    trainer.train()
    measured = times[warmup:]
    return {"pairs_per_s": 2 * len(measured) / sum(measured), "peak_rss_mib": round(peak_rss_mib(), 1)}


def main() -> None:
    """Build the model and data, run each engine in a subprocess, print the JSON summary."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer steps")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model (a smoke run of the script)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--worker", choices=["nomoat", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    steps = a.steps or (6 if a.quick or a.tiny else 20)
    if a.worker:
        fn = run_nomoat if a.worker == "nomoat" else run_trl
        print(json.dumps(fn(a.dir, steps, a.warmup)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        build(folder, a.tiny, pairs=2 * steps + 8)
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
    tokens = next((r["mean_pair_tokens"] for r in results if "mean_pair_tokens" in r), None)
    for r in results:
        if "pairs_per_s" in r and tokens:
            r["tokens_per_s"] = round(r["pairs_per_s"] * tokens, 1)
    by = {r["engine"]: r for r in results}
    ratios = {}
    if "tokens_per_s" in by.get("nomoat", {}) and "tokens_per_s" in by.get("trl", {}):
        ratios = {"train_tokens_per_s_vs_trl": round(by["nomoat"]["tokens_per_s"] / by["trl"]["tokens_per_s"], 3),
                  "peak_rss_vs_trl": round(by["nomoat"]["peak_rss_mib"] / by["trl"]["peak_rss_mib"], 3)}  # fmt: skip
    print(json.dumps({"benchmark": "dpo", "machine": f"{platform.machine()} {os.cpu_count()} cpus",
                      "model": "tiny" if a.tiny else "SmolLM2-135M shape", "steps": steps, "warmup": a.warmup,
                      "results": results, "ratios": ratios}))  # fmt: skip


if __name__ == "__main__":
    main()
