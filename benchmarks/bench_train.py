"""LoRA training speed and memory: nomoat against transformers+PEFT (plain torch loop) and TRL's `SFTTrainer`.

Every engine trains the same random SmolLM2-135M-shaped model (built with transformers and cached, as in
bench_generate.py) on the same data: a few hundred seeded conversations (OpenAI messages, optional system prompt, 1-3
turns, lengths log-uniform from ~20 to ~700 tokens, so some are truncated at 512) written with a word-level
tokenizer of the model's vocabulary, ChatML special tokens and SmolLM2's chat template. LoRA r=16, alpha 32,
dropout 0 on q,k,v,o,gate,up,down; sequence length 512, batch 2; AdamW lr 2e-4 (constant, no weight decay),
gradient clipping at 1.0; fp32; no gradient checkpointing; loss on assistant tokens only.

Engines, each in its own subprocess so that its peak RSS (`ru_maxrss`) is its own:
- `nomoat`: `SFTRecipe` with packing (rows of 512 tokens, attention never crosses examples).
- `nomoat-nopack`: `SFTRecipe` with `packing=False` (length-grouped, padded batches), to separate packing's gain.
- `peft`: transformers `AutoModelForCausalLM` (default sdpa attention) + `peft.get_peft_model`, a plain torch loop
  over padded batches of 2 (right padding, labels -100 on padding).
- `trl`: `SFTTrainer` (`packing=False`, sequential sampler) with a `peft_config`, on the same model folder.
The data is tokenized once with nomoat's pipeline (`tokenize_example`, assistant-only labels); `peft` and `trl` get
those exact `input_ids`/`labels`, in file order, so all three see identical tokens and masks (TRL's own
`assistant_only_loss` needs `{% generation %}` tags the template lacks). nomoat batches its own way (that is part
of what is measured).

Measured after warm-up steps: training tokens/s counting real (non-padding) input tokens over wall time per step
(data collation, forward, backward, clipping and optimizer step), and the process's peak RSS. A Qwen2.5-0.5B-shaped
model (vocabulary 151,936) trains with nomoat at sequence 1024, batch 2, for a few steps, against the 8 GiB limit.
Targets on the 2-core CPU: >= 2x the tokens/s of transformers+PEFT, <= 0.6x its peak RSS. `nomoat-bf16` trains as
`dtype: auto` does over a bf16 checkpoint on a CPU with native bf16 products (AVX-512-BF16, AMX): bf16 frozen base
under bf16 autocast, LoRA A/B and AdamW state in fp32; its ratio against PEFT (fp32) is
`bf16_train_tokens_per_s_vs_peft_fp32`, with the target `bf16_tokens_per_s_at_least_2x_peft`.

Threads: `torch.set_num_threads(--threads)` (default: all cores) in every engine; `OMP_WAIT_POLICY=PASSIVE` unless
already set (as in bench_quantize.py), inherited by every worker. TRL is a benchmark extra; absent, it is reported
as absent. Models and data are cached in `--cache-dir` (default `~/.cache/nomoat-bench`).

    python benchmarks/bench_train.py [--quick] [--steps N] [--warmup N] [--rounds N] [--engines a,b] [--qwen-steps N]

Prints one JSON object as its last line (see DESIGN.md, Benchmarks).
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # before torch loads OpenMP
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from machine_info import describe, ratio  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TEMPLATE = ROOT / "tests" / "fixtures" / "chat_templates" / "smollm2.jinja"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ENGINES = ("nomoat", "nomoat-nopack", "nomoat-bf16", "peft", "trl")
LR, RANK, ALPHA = 2e-4, 16, 32
DATA_VERSION = 1  # bump when the data or tokenizer recipe changes (invalidates the cache)
N_CONVERSATIONS = 400
QWEN_LIMIT_GIB = 8.0
RESULT = "bench-train-result: "  # prefixes a worker's JSON line (Trainer prints dicts too)

# Word-level vocabulary: specials, ChatML markers, the words of roles and of SmolLM2's default system prompt, then
# w{i} up to the model's vocabulary size.
SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
TEMPLATE_WORDS = ["system", "user", "assistant", "You", "are", "a", "helpful", "AI", "named", "SmolLM,", "trained",
                  "by", "Hugging", "Face"]  # fmt: skip


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rss_mib() -> float:
    """Current resident set size of this process in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- model, tokenizer and data (cached) -----------------------------------------------------------------------


def save_chatml_tokenizer(path: Path, vocab: int) -> None:
    """A word-level tokenizer of exactly `vocab` ids with ChatML markers and SmolLM2's chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    words = [*SPECIALS, *TEMPLATE_WORDS]
    ids = {w: i for i, w in enumerate(words)}
    ids.update({f"w{i}": i for i in range(len(words), vocab)})
    tok = Tokenizer(models.WordLevel(ids, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tok.save(str(path / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<|im_end|>",
           "pad_token": "<pad>", "unk_token": "<pad>", "chat_template": TEMPLATE.read_text(encoding="utf-8"),
           "model_max_length": 4096}  # fmt: skip
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))


def ensure_model(shape: str, cache: Path) -> Path:
    """The cached model folder for `shape` (random weights, bench_generate's shapes) with the ChatML tokenizer."""
    sys.path.insert(0, str(HERE))
    from bench_generate import SHAPES, make_model

    folder = cache / shape
    stamp = {"shape": SHAPES[shape], "data_version": DATA_VERSION, "template": TEMPLATE.read_text(encoding="utf-8")}
    stamp_file = folder / "bench-stamp.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return folder
    log(f"building a random {shape}-shaped model in {folder} (once)")
    tmp = cache / f".{shape}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    make_model(shape, tmp)
    save_chatml_tokenizer(tmp, SHAPES[shape]["vocab_size"])
    stamp_file_tmp = tmp / "bench-stamp.json"
    stamp_file_tmp.write_text(json.dumps(stamp))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def make_conversations(n: int, vocab: int, seed: int = 0, lo: int = 20, hi: int = 700) -> list[dict[str, Any]]:
    """`n` conversations in OpenAI messages format, total lengths (in tokens of the word tokenizer, template
    included) log-uniform in [lo, hi]: optional system prompt, 1-3 user/assistant turns, varied turn lengths."""
    rng = random.Random(seed)
    first = len(SPECIALS) + len(TEMPLATE_WORDS)

    def text(k: int) -> str:
        return " ".join(f"w{rng.randrange(first, vocab)}" for _ in range(max(1, k)))

    out = []
    for _ in range(n):
        total = round(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        turns = rng.randint(1, 3) if total >= 80 else 1
        system = rng.random() < 0.3
        # Template tokens: <|im_start|> role ... <|im_end|> per message; the default system prompt is 15 tokens.
        budget = max(2 * turns, total - 3 * (2 * turns + 1) - (0 if system else 12))
        weights = [rng.uniform(0.2, 1.0) for _ in range(2 * turns)]
        weights = [w * (1.6 if i % 2 else 1.0) for i, w in enumerate(weights)]  # answers a bit longer
        sys_words = 0
        if system:
            sys_words = max(3, round(budget * rng.uniform(0.05, 0.2)))
            budget = max(2 * turns, budget - sys_words)
        messages = [{"role": "system", "content": text(sys_words)}] if system else []
        for i, w in enumerate(weights):
            role = "assistant" if i % 2 else "user"
            messages.append({"role": role, "content": text(round(budget * w / sum(weights)))})
        out.append({"messages": messages})
    return out


def ensure_data(shape: str, vocab: int, cache: Path) -> Path:
    path = cache / f"conversations-{shape}-v{DATA_VERSION}.jsonl"
    if not path.is_file():
        rows = make_conversations(N_CONVERSATIONS, vocab, seed=0)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.rename(path)
    return path


def tokenize_with_nomoat(model: Path, data: Path, seq_len: int, out: Path) -> dict[str, Any]:
    """Tokenize the data once with nomoat's pipeline (assistant-only labels); write `[[ids, labels], ...]` in file
    order for the peers, and return length statistics."""
    from nomoat.data.loading import load_dataset
    from nomoat.data.render import tokenize_example
    from nomoat.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model)
    examples = load_dataset([str(data)], format="messages").examples
    rows, full_lengths = [], []
    for e in examples:
        full = tokenize_example(e, tok, 1 << 20)[0]
        full_lengths.append(len(full))
        t = tokenize_example(e, tok, seq_len)[0]
        if any(x != -100 for x in t.labels[1:]):
            rows.append([t.input_ids, t.labels])
    if any(0 in ids for ids, _ in rows):
        raise RuntimeError("the word tokenizer produced <pad>/unk ids: the data does not fit its vocabulary")
    out.write_text(json.dumps(rows))
    lengths = [len(ids) for ids, _ in rows]
    return {"conversations": len(examples), "trainable_examples": len(rows),
            "tokens_min": min(full_lengths), "tokens_median": statistics.median(full_lengths),
            "tokens_max": max(full_lengths), "truncated": sum(n > seq_len for n in full_lengths),
            "tokens_after_truncation": sum(lengths),
            "label_tokens": sum(sum(x != -100 for x in lab) for _, lab in rows)}  # fmt: skip


# ---- workers (one engine per process) -------------------------------------------------------------------------


def _summary(engine: str, times: list[float], tokens: list[int], losses: list[float], warmup: int,
             extra: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    t, n = times[warmup:], tokens[warmup:]
    seconds = sum(t)
    return {"engine": engine, "steps": len(t), "warmup_steps": warmup, "seconds": round(seconds, 3),
            "tokens": sum(n), "train_tokens_per_s": round(sum(n) / seconds, 2) if seconds else None,
            "step_s_median": round(statistics.median(t), 3) if t else None,
            "tokens_per_step_mean": round(sum(n) / max(len(n), 1), 1),
            "first_loss": round(losses[0], 4), "final_loss": round(losses[-1], 4),
            "peak_rss_mib": round(peak_rss_mib(), 1), **extra}  # fmt: skip


def work_nomoat(a: argparse.Namespace, packing: bool, dtype: str = "float32") -> dict[str, Any]:
    import torch
    from rich.console import Console

    from nomoat.config.train import TrainConfig
    from nomoat.train.sft import SFTRecipe

    torch.set_num_threads(a.threads)
    total = a.warmup + a.steps
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(model=a.model, data=[a.data], format="messages", seq_len=a.seq_len, batch_size=a.batch_size,
                          max_steps=total, lr=LR, schedule="constant", warmup_steps=0, weight_decay=0.0,
                          max_grad_norm=1.0, packing=packing, save_every=0, output_dir=out, name="bench",
                          lora={"r": RANK, "alpha": ALPHA, "dropout": 0.0, "target_modules": TARGETS},
                          dtype=dtype, device="cpu", grad_checkpointing=a.grad_checkpointing)  # fmt: skip
        t = time.perf_counter()
        recipe = SFTRecipe(cfg, progress=False, console=Console(quiet=True))
        recipe.setup()
        setup_s, rss_setup = time.perf_counter() - t, rss_mib()
        times, tokens, losses = [], [], []
        for i in range(total):
            t = time.perf_counter()
            rec = recipe.train_step()
            times.append(time.perf_counter() - t)
            tokens.append(int(rec["tokens"]))
            losses.append(float(rec["loss"]))
            log(f"  {a.worker} step {i + 1}/{total}: {times[-1]:.2f} s, {tokens[-1]} tokens, loss {losses[-1]:.4f}")
        recipe.metrics.close()
    return _summary(a.worker, times, tokens, losses, a.warmup,
                    {"setup_s": round(setup_s, 2), "rss_after_setup_mib": round(rss_setup, 1),
                     "grad_checkpointing": a.grad_checkpointing, "dtype": dtype,
                     "notes": ("packed rows" if packing else "length-grouped padded batches")
                     + (", bf16 autocast over a bf16 base" if dtype != "float32" else "")})  # fmt: skip


def _rows(a: argparse.Namespace, n: int) -> list[list[list[int]]]:
    """The peers' examples: file order, except that the first (warm-up) batch holds the longest examples, so that
    the peak RSS includes a full `batch x seq_len` batch as nomoat's packed rows always are."""
    rows = json.loads(Path(a.tokens).read_text())
    if a.warmup:
        longest = set(sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))[: a.batch_size])
        rows = [rows[i] for i in sorted(longest)] + [r for i, r in enumerate(rows) if i not in longest]
    return [rows[i % len(rows)] for i in range(n)]  # wraps around if the data is short


def _collate(rows: list[list[list[int]]], pad_id: int = 0):
    import torch

    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _peft_config():
    from peft import LoraConfig

    return LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, bias="none",
                      task_type="CAUSAL_LM")  # fmt: skip


def work_peft(a: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers
    from peft import get_peft_model

    torch.set_num_threads(a.threads)
    transformers.logging.set_verbosity_error()
    total = a.warmup + a.steps
    t = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    model = get_peft_model(model, _peft_config())
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    rows = _rows(a, total * a.batch_size)
    setup_s, rss_setup = time.perf_counter() - t, rss_mib()
    times, tokens, losses, padded = [], [], [], 0
    for i in range(total):
        t = time.perf_counter()
        batch = _collate(rows[i * a.batch_size : (i + 1) * a.batch_size])
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lv = float(loss.detach())
        times.append(time.perf_counter() - t)
        tokens.append(int(batch["attention_mask"].sum()))
        losses.append(lv)
        padded += batch["input_ids"].numel() if i >= a.warmup else 0
        log(f"  peft step {i + 1}/{total}: {times[-1]:.2f} s, {tokens[-1]} tokens, loss {lv:.4f}")
    res = _summary("peft", times, tokens, losses, a.warmup,
                   {"setup_s": round(setup_s, 2), "rss_after_setup_mib": round(rss_setup, 1),
                    "attn_implementation": model.config._attn_implementation,
                    "notes": "transformers + peft, plain torch loop, padded batches in file order"})  # fmt: skip
    res["padding_fraction"] = round(1 - res["tokens"] / max(padded, 1), 3)
    return res


def work_trl(a: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(a.threads)
    transformers.logging.set_verbosity_error()
    total = a.warmup + a.steps
    rows = _rows(a, total * a.batch_size)
    ds = Dataset.from_dict({"input_ids": [r[0] for r in rows], "labels": [r[1] for r in rows]})
    tokens: list[int] = []
    losses: list[float] = []
    ends: list[float] = []

    class Timed(SFTTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            tokens.append(int(inputs["attention_mask"].sum()))
            loss = super().training_step(model, inputs, *args, **kwargs)
            losses.append(float(loss.detach()))
            return loss

    class Clock(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        cfg = SFTConfig(output_dir=out, max_length=a.seq_len, per_device_train_batch_size=a.batch_size,
                        gradient_accumulation_steps=1, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
                        weight_decay=0.0, max_grad_norm=1.0, packing=False, padding_free=False,
                        gradient_checkpointing=False, report_to="none", use_cpu=True, max_steps=total,
                        logging_steps=10**6, save_strategy="no", eval_strategy="no", dataloader_num_workers=0,
                        bf16=False, fp16=False, train_sampling_strategy="sequential", seed=42, disable_tqdm=True,
                        model_init_kwargs={"dtype": torch.float32})  # fmt: skip
        t = time.perf_counter()
        tok = transformers.AutoTokenizer.from_pretrained(a.model)
        trainer = Timed(model=a.model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=_peft_config(),
                        callbacks=[Clock()])  # fmt: skip
        setup_s, rss_setup = time.perf_counter() - t, rss_mib()
        attn = trainer.model.config._attn_implementation
        trainer.train()
    times = [b - e for e, b in zip(ends, ends[1:])]
    for i, (dt, n, lv) in enumerate(zip(times, tokens, losses)):
        log(f"  trl step {i + 1}/{total}: {dt:.2f} s, {n} tokens, loss {lv:.4f}")
    return _summary("trl", times, tokens, losses, a.warmup,
                    {"setup_s": round(setup_s, 2), "rss_after_setup_mib": round(rss_setup, 1),
                     "attn_implementation": attn,
                     "notes": "SFTTrainer on nomoat's tokenized input_ids/labels (its assistant_only_loss needs "
                              "{% generation %} tags), sequential sampler, gradient_checkpointing=False (TRL's "
                              "default is True); step times include TRL's per-step entropy/accuracy "
                              "metrics"})  # fmt: skip


def worker(a: argparse.Namespace) -> None:
    fn = {"nomoat": lambda: work_nomoat(a, True), "nomoat-nopack": lambda: work_nomoat(a, False),
          "nomoat-bf16": lambda: work_nomoat(a, True, "bfloat16"),
          "peft": lambda: work_peft(a), "trl": lambda: work_trl(a)}[a.worker]  # fmt: skip
    res = fn()
    import torch

    res.update(torch_threads=torch.get_num_threads(), seq_len=a.seq_len, batch_size=a.batch_size)
    print(RESULT + json.dumps(res), flush=True)


# ---- parent ---------------------------------------------------------------------------------------------------


def run_worker(engine: str, model: Path, data: Path, tokens: Path, seq_len: int, batch: int, steps: int, warmup: int,
               threads: int, grad_checkpointing: bool = False) -> dict[str, Any]:  # fmt: skip
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", engine, "--model", str(model), "--data",
           str(data), "--tokens", str(tokens), "--seq-len", str(seq_len), "--batch-size", str(batch), "--steps",
           str(steps), "--warmup", str(warmup), "--threads", str(threads)]  # fmt: skip
    if grad_checkpointing:
        cmd.append("--grad-checkpointing")
    log(f"{engine}: {model.name}, seq {seq_len}, batch {batch}, {warmup} warm-up + {steps} timed steps")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    t = time.perf_counter()
    tail: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
        assert proc.stderr is not None and proc.stdout is not None
        for line in proc.stderr:  # step lines stream through; the rest is kept for the error message
            if line.startswith("  "):
                sys.stderr.write(line)
            else:
                tail = [*tail[-40:], line]
        stdout = proc.stdout.read()
    wall = time.perf_counter() - t
    lines = [line[len(RESULT) :] for line in stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode or not lines:
        sys.stderr.write("".join(tail))
        err = "".join(tail).strip().splitlines() or ["no output"]
        return {"engine": engine, "error": f"worker exited {proc.returncode}: {err[-1]}"[:500]}
    res = json.loads(lines[-1])
    res["process_wall_s"] = round(wall, 1)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 warm-up + 3 timed steps, no Qwen check (about 3 minutes)")
    ap.add_argument("--steps", type=int, help="timed steps per engine (default 30; 3 with --quick)")
    ap.add_argument("--warmup", type=int, help="untimed steps first (default 2; 1 with --quick)")
    ap.add_argument("--rounds", type=int, default=1, help="run every engine this many times, alternating the order; "
                    "the best tokens/s of each engine is reported")  # fmt: skip
    ap.add_argument("--engines", default=",".join(ENGINES),
                    help=f"comma-separated subset of {', '.join(ENGINES)} (or none)")
    ap.add_argument("--qwen-steps", type=int, help="steps of the Qwen2.5-0.5B-shaped memory check (default 3; 0 "
                    "skips it, the default with --quick)")  # fmt: skip
    ap.add_argument("--qwen-grad-checkpointing", action="store_true",
                    help="run the Qwen check with grad_checkpointing=True (nomoat's default is off)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    ap.add_argument("--cache-dir", type=Path,
                    default=Path(os.environ.get("NOMOAT_BENCH_CACHE", "~/.cache/nomoat-bench")).expanduser())
    for name in ("--worker", "--model", "--data", "--tokens"):  # internal: one engine in a subprocess
        ap.add_argument(name, help=argparse.SUPPRESS)
    ap.add_argument("--seq-len", type=int, default=512, help=argparse.SUPPRESS)
    ap.add_argument("--batch-size", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--grad-checkpointing", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return
    steps = a.steps if a.steps is not None else (3 if a.quick else 30)
    warmup = a.warmup if a.warmup is not None else (1 if a.quick else 2)
    qwen_steps = a.qwen_steps if a.qwen_steps is not None else (0 if a.quick else 3)
    engines = [e.strip() for e in a.engines.split(",") if e.strip() and e.strip() != "none"]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        ap.error(f"unknown engine(s) {', '.join(sorted(unknown))}; choose from {', '.join(ENGINES)}")
    absent = {}
    if "trl" in engines and importlib.util.find_spec("trl") is None:
        absent["trl"] = "absent (pip install -e .[bench] to compare with TRL's SFTTrainer)"
    if "peft" in engines and importlib.util.find_spec("peft") is None:
        absent["peft"] = "absent (pip install -e .[bench] to compare with transformers + PEFT)"
    run_engines = [e for e in engines if e not in absent]
    a.cache_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    import torch

    torch.set_num_threads(a.threads)
    model = ensure_model("smollm2-135m", a.cache_dir)
    data = ensure_data("smollm2-135m", 49152, a.cache_dir)
    results: list[dict[str, Any]] = []
    targets: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tokens = Path(tmp) / "tokens.json"
        stats = tokenize_with_nomoat(model, data, 512, tokens)
        log(f"data: {json.dumps(stats)}")
        runs: dict[str, list[dict[str, Any]]] = {e: [] for e in run_engines}
        for r in range(a.rounds):
            order = run_engines if r % 2 == 0 else run_engines[::-1]
            for e in order:
                res = run_worker(e, model, data, tokens, 512, 2, steps, warmup, a.threads)
                res.update(shape="smollm2-135m", round=r + 1)
                runs[e].append(res)
                if "error" not in res:
                    log(f"{e}: {res['train_tokens_per_s']:.1f} tok/s, peak RSS {res['peak_rss_mib']:.0f} MiB, "
                        f"final loss {res['final_loss']}")
                else:
                    log(f"{e}: {res['error']}")
        best: dict[str, dict[str, Any]] = {}
        for e, rs in runs.items():
            ok = [x for x in rs if "error" not in x]
            if ok:
                b = dict(max(ok, key=lambda x: x["train_tokens_per_s"] or 0))
                b["peak_rss_mib"] = max(x["peak_rss_mib"] for x in ok)
                if len(rs) > 1:
                    b["rounds_tokens_per_s"] = [x["train_tokens_per_s"] for x in ok]
                best[e] = b
                results.append(b)
            else:
                results.append(rs[-1])
        for e, why in absent.items():
            results.append({"engine": e, "shape": "smollm2-135m", "absent": why})

        if qwen_steps > 0:
            qmodel = ensure_model("qwen2.5-0.5b", a.cache_dir)
            qdata = ensure_data("qwen2.5-0.5b", 151936, a.cache_dir)
            q = run_worker("nomoat", qmodel, qdata, tokens, 1024, 2, qwen_steps, 0, a.threads,
                           a.qwen_grad_checkpointing)  # fmt: skip
            q.update(shape="qwen2.5-0.5b", check="memory at seq 1024, batch 2")
            results.append(q)
            if "error" not in q:
                gib = q["peak_rss_mib"] / 1024
                targets.update(qwen_peak_rss_gib=round(gib, 3), qwen_within_8gib=gib <= QWEN_LIMIT_GIB)
        else:
            targets.update(qwen_peak_rss_gib=None, qwen_within_8gib=None,
                           qwen_note="skipped (--quick or --qwen-steps 0)")  # fmt: skip

    ours = best.get("nomoat", {})
    ratios: dict[str, float | None] = {}
    for peer in ("peft", "trl"):
        p = best.get(peer)
        if p and ours:
            ratios[f"train_tokens_per_s_vs_{peer}"] = ratio(ours["train_tokens_per_s"], p["train_tokens_per_s"])
            ratios[f"peak_rss_vs_{peer}"] = ratio(ours["peak_rss_mib"], p["peak_rss_mib"])
    nopack = best.get("nomoat-nopack")
    if nopack and best.get("peft"):
        ratios["nopack_train_tokens_per_s_vs_peft"] = ratio(nopack["train_tokens_per_s"],
                                                              best["peft"]["train_tokens_per_s"])
        ratios["nopack_peak_rss_vs_peft"] = ratio(nopack["peak_rss_mib"], best["peft"]["peak_rss_mib"])
    bf16 = best.get("nomoat-bf16")
    if bf16 and best.get("peft"):
        ratios["bf16_train_tokens_per_s_vs_peft_fp32"] = ratio(bf16["train_tokens_per_s"],
                                                                best["peft"]["train_tokens_per_s"])
        ratios["bf16_peak_rss_vs_peft_fp32"] = ratio(bf16["peak_rss_mib"], best["peft"]["peak_rss_mib"])
    if nopack and ours:
        ratios["train_tokens_per_s_packed_vs_unpacked"] = ratio(ours["train_tokens_per_s"],
                                                                 nopack["train_tokens_per_s"])
    if "bf16_train_tokens_per_s_vs_peft_fp32" in ratios:
        sys.path.insert(0, str(ROOT / "src"))
        from nomoat.train.precision import cpu_trains_bf16

        # bf16 compute where the CPU has native bf16 products (what `dtype: auto` picks for a bf16 checkpoint).
        targets["bf16_tokens_per_s_at_least_2x_peft"] = (ratios["bf16_train_tokens_per_s_vs_peft_fp32"] or 0) >= 2.0
        targets["cpu_has_native_bf16"] = cpu_trains_bf16()
    if "train_tokens_per_s_vs_peft" in ratios:
        targets["tokens_per_s_at_least_2x_peft"] = (ratios["train_tokens_per_s_vs_peft"] or 0) >= 2.0
        targets["peak_rss_at_most_0.6x_peft"] = (ratios["peak_rss_vs_peft"] or math.inf) <= 0.6
    log(f"total {time.perf_counter() - t_start:.0f} s")
    print(json.dumps({"benchmark": "train", "machine": describe(a.threads), "results": results, "ratios": ratios,
                      "targets": targets, "data": stats,
                      "settings": {"seq_len": 512, "batch_size": 2, "lora_r": RANK, "lora_alpha": ALPHA, "lr": LR,
                                   "steps": steps, "warmup_steps": warmup, "rounds": a.rounds, "quick": a.quick,
                                   "qwen_steps": qwen_steps,
                                   "qwen_grad_checkpointing": a.qwen_grad_checkpointing}}))  # fmt: skip


if __name__ == "__main__":
    main()
