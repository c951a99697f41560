"""What the training benchmarks against TRL share (bench_dpo.py, bench_grpo.py): the model folder, the worker
subprocesses, the step clocks, the ratios to TRL and the JSON summary.

Both benchmarks train the same random SmolLM2-135M-shaped Llama folder (built with transformers; `--tiny`: a 2-layer
model with a 512-word vocabulary) with a word tokenizer and a chat template, LoRA r=16 alpha 32 on every projection.
Each engine runs in its own subprocess (`--worker nomoat|trl`), so its peak RSS (`ru_maxrss`) is its own; with
`--repeats R` the engines run alternately R times each (nomoat, TRL, nomoat, TRL ...) and each keeps its best run,
which is what makes the ratio meaningful on a machine that other work loads. The summary records the load average.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")  # fmt: skip
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPECIAL = 7  # ids below this are the tokenizer's special and role words; the rest are w7, w8, ...
ENGINES = ("nomoat", "trl")

Worker = Callable[[Path, int, int], dict[str, Any]]  # (folder, steps, warmup) -> measurements


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def vocab_size(tiny: bool) -> int:
    """Vocabulary of the benchmark model."""
    return 512 if tiny else 49152


def build_model(folder: Path, tiny: bool, seed: int = 0) -> None:
    """A random SmolLM2-135M-shaped Llama (or a tiny one) and a word tokenizer with a chat template, in `folder`."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = vocab_size(tiny)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2) if tiny else dict(hidden_size=576, intermediate_size=1536,
                 num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3)  # fmt: skip
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=True,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0, **shape)  # fmt: skip
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    words = {"<pad>": 0, "<s>": 1, "</s>": 2, "<|im_start|>": 3, "<|im_end|>": 4, "user": 5, "assistant": 6,
             **{f"w{i}": i for i in range(SPECIAL, vocab)}}  # fmt: skip
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "<|im_end|>",
                                                               "pad_token": "<pad>", "chat_template": TEMPLATE}))


def words(rng: random.Random, vocab: int, lo: int, hi: int) -> str:
    """Between `lo` and `hi` random words of the benchmark vocabulary (one token each)."""
    return " ".join(f"w{rng.randrange(SPECIAL, vocab)}" for _ in range(rng.randint(lo, hi)))


def nomoat_metrics(run_dir: Path, warmup: int) -> tuple[list[dict[str, Any]], float]:
    """The metric records of a nomoat run after `warmup` steps, and the wall seconds of those steps."""
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][warmup:]
    return records, sum(r["tokens"] / r["tokens_per_s"] for r in records)


def step_clock(times: list[float]) -> Any:
    """A transformers `TrainerCallback` that appends each optimizer step's wall seconds to `times`."""
    import transformers

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self.t = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            times.append(time.perf_counter() - self.t)

    return Clock()


def parse_args(doc: str, steps: int, quick_steps: int, warmup: int) -> argparse.Namespace:
    """The benchmarks' common options; `steps` resolves to `quick_steps` under --quick or --tiny."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer steps")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model (a smoke run of the script)")
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps per run (default {steps})")
    p.add_argument("--warmup", type=int, default=warmup, help="steps left out of the measurement")
    p.add_argument("--repeats", type=int, default=1, help="runs per engine, alternating; each keeps its best")
    p.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    a.steps = a.steps or (quick_steps if a.quick or a.tiny else steps)
    if a.steps <= a.warmup:
        p.error(f"--steps {a.steps} leaves nothing to measure after --warmup {a.warmup}")
    return a


def worker_main(a: argparse.Namespace, workers: dict[str, Worker]) -> bool:
    """In a worker subprocess: run its engine and print its measurements as JSON; False in the parent."""
    if not a.worker:
        return False
    print(json.dumps(workers[a.worker](a.dir, a.steps, a.warmup)))
    return True


def run_engines(script: str, folder: Path, a: argparse.Namespace, speed: str) -> list[dict[str, Any]]:
    """Run each engine's worker `a.repeats` times, alternating; per engine the run with the highest `speed`."""
    best: dict[str, dict[str, Any]] = {}
    runs: dict[str, list[float]] = {e: [] for e in ENGINES}
    for _ in range(a.repeats):
        for engine in ENGINES:
            if engine == "trl" and importlib.util.find_spec("trl") is None:
                best[engine] = {"engine": "trl", "absent": True}
                continue
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, script, "--worker", engine, "--dir", str(folder), "--steps",
                                  str(a.steps), "--warmup", str(a.warmup)], capture_output=True, text=True,
                                 env={**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"})  # fmt: skip
            if out.returncode != 0:
                best.setdefault(engine, {"engine": engine, "error": out.stderr[-2000:]})
                continue
            result = {"engine": engine, **json.loads(out.stdout.strip().splitlines()[-1]),
                      "run_wall_s": round(time.perf_counter() - t0, 1)}  # fmt: skip
            runs[engine].append(round(result[speed], 4))
            if speed not in best.get(engine, {}) or result[speed] > best[engine][speed]:
                best[engine] = result
    for engine, values in runs.items():
        if len(values) > 1:
            best[engine][f"{speed}_runs"] = values
    return [best[e] for e in ENGINES if e in best]


def run_benchmark(script: str, a: argparse.Namespace, write_data: Callable[[Path], object], speed: str
                  ) -> tuple[list[dict[str, Any]], tuple[float, ...]]:  # fmt: skip
    """In the parent process: the model folder (`build_model`) and its data (`write_data(folder)`) in a temporary
    folder, each engine run on them (`run_engines`); returns the results and the load average from before."""
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        build_model(folder, a.tiny)
        write_data(folder)
        return run_engines(script, folder, a, speed), load


def ratios_vs_trl(results: list[dict[str, Any]], speed: str, name: str) -> dict[str, float]:
    """{`name`: nomoat's `speed` over TRL's, "peak_rss_vs_trl": likewise} where both engines have `speed`, else {}."""
    by = {r["engine"]: r for r in results}
    if speed not in by.get("nomoat", {}) or speed not in by.get("trl", {}):
        return {}
    return {name: round(by["nomoat"][speed] / by["trl"][speed], 3),
            "peak_rss_vs_trl": round(by["nomoat"]["peak_rss_mib"] / by["trl"]["peak_rss_mib"], 3)}  # fmt: skip


def summary(name: str, a: argparse.Namespace, results: list[dict[str, Any]], ratios: dict[str, float],
            load_before: tuple[float, ...]) -> str:  # fmt: skip
    """The benchmark's last line: one JSON object (see DESIGN.md, Benchmarks), with the load average around it."""
    return json.dumps({"benchmark": name, "machine": f"{platform.machine()} {os.cpu_count()} cpus",
                       "load_average": {"before": [round(x, 2) for x in load_before],
                                        "after": [round(x, 2) for x in os.getloadavg()]},
                       "model": "tiny" if a.tiny else "SmolLM2-135M shape", "steps": a.steps, "warmup": a.warmup,
                       "repeats": a.repeats, "results": results, "ratios": ratios})  # fmt: skip
