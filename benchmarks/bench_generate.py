"""Generation speed: nomoat's engine against transformers `generate`, in one run, on the same model files.

Random models shaped like SmolLM2-135M and Qwen2.5-0.5B (and Llama-3.2-1B with `--shapes llama-1b`) are built with
loads them in fp32. Measured, with 2 threads:
- decode tokens/s at batch 1 (128 new tokens after a 32-token prompt; prefill time excluded),
- prefill tokens/s for a 512-token prompt,
- batch-8 throughput (8 prompts of 32 tokens, 128 new tokens each, all generated tokens per second),
  each the best of `RUNS` runs (transformers, slower, gets one run fewer for decode and batch 8); nomoat also at
  batches 16 and 32 (`batch16_tok_s`, `batch32_tok_s`), with the count of decode steps that missed the one-call
  decode stack (`stack_fallbacks`, per batch size: 0 expected),
- nomoat's peak RSS while decoding 8 rows in a fresh process, against its weights plus its KV cache
  (`decode_peak_rss_vs_weights_plus_kv`; `decode_memory_nomoat` says how it is counted),
- the memory-bandwidth roofline: measured copy bandwidth / fp32 weight bytes read per token, and each engine's
  decode as a fraction of it. The machine's bandwidth drifts by tens of percent within seconds, so it is measured
  before each engine's first decode run and after every one (`around_each`). Two fractions: `roofline_fraction`, the
  best decode run over the best bandwidth seen around them; `roofline_fraction_paired`, the median over runs of each
  run against the bandwidth measured next to it (the steadier one). The fraction of the read (`sum`) bandwidth is
  reported beside them.
Engines: nomoat fp32 (packed weights, what `nomoat generate` runs), nomoat int8 (weight-only), transformers fp32, and
llama.cpp (llama-cpp-python, a benchmark extra; reported as absent when not installed) in f32 and q8_0 on GGUF files
that llama.cpp's own converter writes from the same folder (`llamacpp_converter.py`: `convert_hf_to_gguf.py` from the
installed llama-cpp-python's sources, fetched from PyPI once; where it cannot run, nomoat's exporter writes them and
each result's `gguf` says so). The random folders get a small trained byte-level BPE tokenizer (`tokenizer.json`, for
nomoat's exporter) and a SentencePiece one (`tokenizer.model`, for llama.cpp's converter).
llama.cpp is measured at batch 1 (decode, greedy by argmax over its logits) and on a 512-token prompt. Both peers
run in child processes of their own (`bench_child`), once under OpenMP's default wait policy (spinning a while, then
sleeping) and once under `OMP_WAIT_POLICY=PASSIVE`, nomoat's setting (the `*-passive` rows); the ratios take the
peer's faster result of the two for each speed.

Threads: 2 everywhere. `OMP_WAIT_POLICY=PASSIVE` is set before torch loads unless already set (as `nomoat serve`
does): on a 2-core VM with a busy neighbour, spinning OpenMP threads stall each other for milliseconds.

    python benchmarks/bench_generate.py [--quick]
    python benchmarks/bench_generate.py --pairs 6 [--shape S]   # interleaved nomoat/transformers decode pairs

Prints one JSON object as its last line (see DESIGN.md, Benchmarks).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if "--child" not in sys.argv:  # a peer's child process keeps the policy its parent chose
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # with nomoat serve's bounded spin
    os.environ.setdefault("GOMP_SPINCOUNT", "100000")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llamacpp_converter import make_gguf, save_tokenizer  # noqa: E402 (bench_int8_cpu takes make_gguf from here)

SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True, rope_theta=500000.0),
}  # fmt: skip
DEFAULT_SHAPES = ("smollm2-135m", "qwen2.5-0.5b")  # a full run without --shapes (llama-1b only when named)


# Decode and prefill are timed this many times per engine, keeping the best (the machine may be shared); the
# transformers peer, slower, gets one decode run fewer.
RUNS = 3


class NullTokenizer:
    """What the engine needs of a tokenizer (eos ids, a detokenizer) for random models timed on token ids."""

    eos_token_ids: list[int] = []

    def stream_decoder(self, skip_special_tokens: bool = False):
        class _D:
            def add(self, t: int) -> str:
                return ""

            def flush(self) -> str:
                return ""

        return _D()


def make_model(shape: str, path: Path) -> None:
    """Save a random model of the given shape (llama family for SmolLM2 and Llama, qwen2 for Qwen2.5)."""
    import transformers

    cls = transformers.Qwen2Config if shape.startswith("qwen") else transformers.LlamaConfig
    cfg = cls(**SHAPES[shape], max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    save_tokenizer(path)


def bandwidth_gbs(repeats: int = 6) -> dict[str, float]:
    """Memory bandwidth in GB/s, 2 threads, best of `repeats` passes of about 0.1 s each over 512 MiB tensors.

    `copy`: `y.copy_(x)`, counting the bytes read and written (STREAM's convention), the roofline's bandwidth;
    `read`: `x.sum()`, bytes read (what decode does; reported beside it). The best pass, since a neighbour's burst on
    a shared VM can halve one; each engine's roofline uses the bandwidth measured just before and after its own
    decode runs, as the machine's speed drifts by tens of percent over minutes.
    """
    x = torch.ones(128 * 2**20)
    y = torch.empty_like(x)
    x.sum()
    y.copy_(x)
    best = {"copy": 0.0, "read": 0.0}
    for _ in range(repeats):
        for kind, op, nbytes in (("copy", lambda: y.copy_(x), 8), ("read", x.sum, 4)):
            t = time.perf_counter()
            for _ in range(4):
                op()
            best[kind] = max(best[kind], 4 * x.numel() * nbytes / (time.perf_counter() - t) / 1e9)
    return best


def around_each(run_once, runs: int) -> tuple[float, dict[str, float], list[dict[str, float]]]:
    """Call `run_once()` (it returns tokens/s) `runs` times, measuring the bandwidth before the first call and after
    each one (`bandwidth_gbs`).

    Returns the best tokens/s, the best bandwidth seen, and per call its tokens/s with the better of the bandwidths
    measured just before and just after it (`tok_s`, `copy`, `read`): the pairs the paired roofline fraction uses.
    """
    bws = [bandwidth_gbs(3)]
    pairs = []
    for _ in range(runs):
        tok_s = run_once()
        bws.append(bandwidth_gbs(3))
        pairs.append({"tok_s": tok_s, **{k: max(bws[-2][k], bws[-1][k]) for k in ("copy", "read")}})
    best_bw = {k: max(b[k] for b in bws) for k in ("copy", "read")}
    return max(p["tok_s"] for p in pairs), best_bw, pairs


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights read per decoded token: every parameter once (every shape ties the embedding to the head,
    which reads all of it every token)."""
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def bench_nomoat(path: Path, new: int, batch8_new: int, prefill_len: int, mode: str = "fp32") -> dict:
    """nomoat's engine: decode at batch 1, prefill, batch-8 throughput; `mode` fp32 (packed) or int8."""
    from nomoat.generate.engine import Engine
    from nomoat.generate.sampling import SamplingParams
    from nomoat.models.checkpoint import load_model
    from nomoat.models.packed import pack_model
    from nomoat.models.quantize import quantize_model

    model = load_model(path, dtype=torch.float32, device="cpu")
    weights = weight_bytes_per_token(model)  # fp32 bytes: the roofline is the fp32 one for every engine
    if mode == "int8":
        quantize_model(model, "int8")  # what `nomoat generate --quantize int8` runs
    else:
        pack_model(model)  # what `nomoat generate` / `chat` run

    engine = Engine(model, NullTokenizer(), max_running=32, max_seq_len=1024, prefix_cache_bytes=0)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 1000, (32,), generator=g).tolist()
    params = SamplingParams(temperature=0, max_new_tokens=new, ignore_eos=True)
    engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True))  # warm-up
    decode, bw, pairs = around_each(lambda: engine.generate(prompt, params).decode_tokens_per_s, RUNS)
    long_prompt = torch.randint(3, 1000, (prefill_len,), generator=g).tolist()
    prefill = 0.0
    for _ in range(RUNS):
        t = time.perf_counter()
        engine.generate(long_prompt, SamplingParams(temperature=0, max_new_tokens=1, ignore_eos=True))
        prefill = max(prefill, prefill_len / (time.perf_counter() - t))
    p8 = SamplingParams(temperature=0, max_new_tokens=batch8_new, ignore_eos=True)
    batch, fallbacks = {}, {}
    for rows in (8, 16, 32):
        prompts = [torch.randint(3, 1000, (32,), generator=g).tolist() for _ in range(rows)]
        batch[rows] = 0.0
        with count_decode_steps(engine) as steps:
            for _ in range(RUNS):  # best of RUNS, as decode at batch 1 (their ratio is a target)
                t = time.perf_counter()
                handles = [engine.submit(p, p8) for p in prompts]
                n = sum(h.result().completion_tokens for h in handles)
                batch[rows] = max(batch[rows], n / (time.perf_counter() - t))
        fallbacks[rows] = steps["decode"] - steps["stack"]  # decode steps that missed the one-call stack
    return {
        "decode_tok_s": decode,
        "prefill_tok_s": prefill,
        "batch8_tok_s": batch[8],
        "batch16_tok_s": batch[16],
        "batch32_tok_s": batch[32],
        "stack_fallbacks": fallbacks,
        "weight_bytes_per_token": weights,
        "bandwidth_gbs": bw,
        "decode_runs": pairs,
    }


@contextlib.contextmanager
def count_decode_steps(engine):
    """Counts, inside the block, the engine's decode steps (one token per row, cached) and those the stack ran."""
    from nomoat.inference.decode_model import DecodeModel

    counts = {"decode": 0, "stack": 0}
    call, stack0 = DecodeModel.__call__, engine.decode.stack_steps

    def counting(self, input_ids, *args, **kw):
        if self is engine.decode and input_ids.shape[1] == 1 and kw.get("cache", args[1] if len(args) > 1 else None):
            counts["decode"] += 1
        return call(self, input_ids, *args, **kw)

    DecodeModel.__call__ = counting
    try:
        yield counts
    finally:
        DecodeModel.__call__ = call
        counts["stack"] = engine.decode.stack_steps - stack0


def decode_memory_nomoat(path: Path, new: int) -> dict:
    """Peak RSS of a fresh process while nomoat decodes 8 rows (what `nomoat generate`/`serve` hold: packed fp32
    weights, the engine's decode model and KV cache), against the weights plus the KV cache.

    RSS is counted from a baseline taken after torch and nomoat are imported; the peak is reset
    (/proc/self/clear_refs) once the engine is built, so loading is reported apart (`load_peak_rss_mb`).
    """
    from nomoat.generate.engine import Engine
    from nomoat.generate.sampling import SamplingParams
    from nomoat.models.checkpoint import load_model
    from nomoat.models.packed import pack_model

    def status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    base = status("VmRSS")
    model = load_model(path, dtype=torch.float32, device="cpu")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    pack_model(model)
    engine = Engine(model, NullTokenizer(), max_running=8, max_seq_len=1024, prefix_cache_bytes=0)
    kv = sum(t.numel() * t.element_size() for t in engine.cache.k + engine.cache.v)
    load_peak = status("VmHWM") - base
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0, max_new_tokens=new, ignore_eos=True)
    handles = [engine.submit(torch.randint(3, 1000, (32,), generator=g).tolist(), params) for _ in range(8)]
    for h in handles:
        h.result()
    peak = status("VmHWM") - base
    return {"weights_mb": weights / 2**20, "kv_cache_mb": kv / 2**20, "decode_peak_rss_mb": peak / 2**20,
            "load_peak_rss_mb": load_peak / 2**20, "decode_peak_rss_vs_weights_plus_kv": peak / (weights + kv)}


def bench_transformers(path: Path, new: int, batch8_new: int, prefill_len: int) -> dict:
    """transformers `generate` with its default (dynamic) cache, greedy."""
    import transformers

    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 1000, (1, 32), generator=g)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        model.generate(prompt, max_new_tokens=8, min_new_tokens=8, **kw)
        t = time.perf_counter()
        model.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kw)
        t_prefill = time.perf_counter() - t

        def decode_run() -> float:
            t = time.perf_counter()
            model.generate(prompt, max_new_tokens=new, min_new_tokens=new, **kw)
            return (new - 1) / (time.perf_counter() - t - t_prefill)

        decode, bw, pairs = around_each(decode_run, RUNS - 1)
        long_prompt = torch.randint(3, 1000, (1, prefill_len), generator=g)
        prefill = 0.0
        for _ in range(RUNS):
            t = time.perf_counter()
            model(long_prompt)
            prefill = max(prefill, prefill_len / (time.perf_counter() - t))
        prompts = torch.randint(3, 1000, (8, 32), generator=g)
        batch8 = 0.0
        for _ in range(RUNS - 1):
            t = time.perf_counter()
            out = model.generate(prompts, max_new_tokens=batch8_new, min_new_tokens=batch8_new, **kw)
            batch8 = max(batch8, (out.shape[1] - 32) * 8 / (time.perf_counter() - t))
    return {"decode_tok_s": decode, "prefill_tok_s": prefill, "batch8_tok_s": batch8, "bandwidth_gbs": bw,
            "decode_runs": pairs}  # fmt: skip


def bench_llamacpp(gguf_file: Path, new: int, prefill_len: int) -> dict:
    """llama.cpp through llama-cpp-python: decode at batch 1 after a 32-token prompt, and prompt processing."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(str(gguf_file), n_threads=2, n_threads_batch=2, n_ctx=1024, n_batch=512, logits_all=False,
                verbose=False)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 1000, (32,), generator=g).tolist()

    def decode(steps: int) -> float:
        llm.reset()
        llm.eval(prompt)
        t = time.perf_counter()
        for _ in range(steps):  # greedy, as nomoat's and transformers' runs (no eos: random weights)
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        return steps / (time.perf_counter() - t)

    decode(8)  # warm-up
    dec, bw, pairs = around_each(lambda: decode(new), RUNS)
    long_prompt = torch.randint(3, 1000, (prefill_len,), generator=g).tolist()
    best = 0.0
    for _ in range(RUNS):
        llm.reset()
        t = time.perf_counter()
        llm.eval(long_prompt)
        best = max(best, prefill_len / (time.perf_counter() - t))
    llm.close()
    return {"decode_tok_s": dec, "prefill_tok_s": best, "batch8_tok_s": None, "bandwidth_gbs": bw, "decode_runs": pairs}


def bench_child(kind: str, args: list, wait_policy: str | None) -> dict:
    """`bench_transformers(*args)` or `bench_llamacpp(*args)` (`kind`) in a child process whose OpenMP runtime reads
    `wait_policy` (None: libgomp's default, spinning a while before sleeping).

    llama.cpp's CPU backend and torch share libgomp, which reads `OMP_WAIT_POLICY` once per process: with PASSIVE,
    llama.cpp's decode measured 24-26 tok/s (f32) and 32-36 (q8_0) against 44 and 111 with spinning threads on a
    quiet machine. So each peer is timed in processes of its own, under its default policy and under PASSIVE
    (nomoat's setting), and the ratios take the peer's faster result.
    """
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if wait_policy is not None:
        env["OMP_WAIT_POLICY"] = wait_policy  # with nomoat's bounded spin (GOMP_SPINCOUNT), as nomoat runs
    else:
        env.pop("GOMP_SPINCOUNT", None)
    cmd = [sys.executable, __file__, "--child", kind, *map(str, args)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["omp_wait_policy"] = wait_policy or "default (spin)"
    return result


def decode_only_nomoat(path: Path, new: int) -> dict:
    """One batch-1 greedy decode run of `new` tokens after a 32-token prompt through nomoat's engine (fp32, packed)."""
    from nomoat.generate.engine import Engine
    from nomoat.generate.sampling import SamplingParams
    from nomoat.models.checkpoint import load_model
    from nomoat.models.packed import pack_model

    model = load_model(path, dtype=torch.float32, device="cpu")
    pack_model(model)
    engine = Engine(model, NullTokenizer(), max_running=1, max_seq_len=1024, prefix_cache_bytes=0)
    prompt = torch.randint(3, 1000, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True))  # warm-up
    params = SamplingParams(temperature=0, max_new_tokens=new, ignore_eos=True)
    return {"decode_tok_s": engine.generate(prompt, params).decode_tokens_per_s}


def decode_only_transformers(path: Path, new: int) -> dict:
    """One batch-1 greedy decode run of `new` tokens after a 32-token prompt through transformers `generate`
    (prefill time, measured on its own just before, subtracted)."""
    import transformers

    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = torch.randint(3, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        model.generate(prompt, max_new_tokens=8, min_new_tokens=8, **kw)  # warm-up
        t = time.perf_counter()
        model.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kw)
        t_prefill = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(prompt, max_new_tokens=new, min_new_tokens=new, **kw)
        return {"decode_tok_s": (new - 1) / (time.perf_counter() - t - t_prefill)}


def decode_pairs(shape: str, n: int, new: int = 128) -> None:
    """`--pairs`: n alternating decode runs of nomoat and transformers, each in a fresh process, so that each pair
    meets the same machine (its bandwidth drifts by tens of percent over seconds). Prints one JSON object."""
    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / shape
        make_model(shape, path)
        for i in range(n):
            ours = bench_child("nomoat-decode", [path, new], "PASSIVE")["decode_tok_s"]
            peer = bench_child("transformers-decode", [path, new], None)["decode_tok_s"]
            pairs.append({"nomoat_tok_s": ours, "transformers_tok_s": peer, "ratio": ours / peer})
            print(f"pair {i + 1}: nomoat {ours:.1f} tok/s, transformers {peer:.1f} tok/s, {ours / peer:.2f}x",
                  file=sys.stderr)  # fmt: skip
    ratio = statistics.median(p["ratio"] for p in pairs)
    print(json.dumps({"benchmark": "generate-decode-pairs", "shape": shape, "new_tokens": new, "pairs": pairs,
                      "ratios": {f"{shape}_decode_speed_vs_transformers_median_of_pairs": round(ratio, 3)}}))


def best_of(*runs: dict) -> dict:
    """A peer's best decode, prefill and batch-8 speeds over its runs (one per OpenMP wait policy)."""
    keys = ("decode_tok_s", "prefill_tok_s", "batch8_tok_s")
    return {k: max((r[k] for r in runs if r[k] is not None), default=None) for k in keys}


def llamacpp_status() -> str | None:
    """None when llama-cpp-python can be used, else why not."""
    try:
        import llama_cpp

        return None if llama_cpp.__version__ else "llama_cpp without a version"
    except ImportError:
        return "absent (pip install -e .[bench] for llama-cpp-python)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="SmolLM2 shape only, fewer tokens (about 2 minutes)")
    ap.add_argument("--pairs", type=int, default=0, metavar="N",
                    help="instead: N alternating batch-1 decode runs of nomoat fp32 and transformers, each in a fresh "
                         "process under its faster policy (PASSIVE / default), on the Qwen2.5 shape; prints each "
                         "pair's ratio and their median")  # fmt: skip
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b", help="the shape for --pairs")
    ap.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), help="shapes of a full run (default: not llama-1b)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # KIND ARG...: a child of bench_child
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.child:  # one JSON line
        kind, path, *numbers = args.child
        bench = {"transformers": bench_transformers, "llamacpp": bench_llamacpp, "nomoat-decode": decode_only_nomoat,
                 "transformers-decode": decode_only_transformers,
                 "nomoat-memory": decode_memory_nomoat}[kind]  # fmt: skip
        print(json.dumps(bench(Path(path), *map(int, numbers))))
        return
    if args.pairs:
        return decode_pairs(args.shape, args.pairs)
    shapes = ["smollm2-135m"] if args.quick else (args.shapes or list(DEFAULT_SHAPES))
    new, batch8_new, prefill_len = (64, 32, 256) if args.quick else (128, 128, 512)
    results, ratios = [], {}
    absent = llamacpp_status()
    llama = absent or "llama-cpp-python, on GGUF files written from the same folder (each result's `gguf` says by what)"
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            path = Path(tmp) / shape
            make_model(shape, path)
            runs = {"nomoat": bench_nomoat(path, new, batch8_new, prefill_len)}
            runs["nomoat-int8"] = bench_nomoat(path, new, batch8_new, prefill_len, mode="int8")
            memory = bench_child("nomoat-memory", [path, new], "PASSIVE")
            memory.update(engine="nomoat-memory", shape=shape)
            for policy, name in ((None, "transformers"), ("PASSIVE", "transformers-passive")):
                runs[name] = bench_child("transformers", [path, new, batch8_new, prefill_len], policy)
            if absent is None:
                for outtype in ("f32", "q8_0"):
                    gguf_file = Path(tmp) / f"{shape}-{outtype}.gguf"
                    source = make_gguf(path, gguf_file, outtype)
                    for policy, name in ((None, f"llama.cpp-{outtype}"), ("PASSIVE", f"llama.cpp-{outtype}-passive")):
                        runs[name] = bench_child("llamacpp", [gguf_file, new, prefill_len], policy)
                    for name in (f"llama.cpp-{outtype}", f"llama.cpp-{outtype}-passive"):
                        runs[name]["gguf"] = source
                    gguf_file.unlink()
            ours = runs["nomoat"]
            for name, r in runs.items():  # each engine against the bandwidth measured around its own decode runs
                roof = r["bandwidth_gbs"]["copy"] * 1e9 / ours["weight_bytes_per_token"]
                read_roof = r["bandwidth_gbs"]["read"] * 1e9 / ours["weight_bytes_per_token"]
                paired = statistics.median(
                    p["tok_s"] * ours["weight_bytes_per_token"] / (p["copy"] * 1e9) for p in r["decode_runs"]
                )
                r.update(engine=name, shape=shape, roofline_tok_s=roof, roofline_fraction=r["decode_tok_s"] / roof,
                         roofline_fraction_paired=paired,
                         read_roofline_fraction=r["decode_tok_s"] / read_roof)  # fmt: skip
                results.append(r)
                b8 = f"{r['batch8_tok_s']:6.1f}" if r["batch8_tok_s"] else "     -"
                print(f"{shape:14s} {name:20s} decode {r['decode_tok_s']:6.1f} tok/s ({r['roofline_fraction']:4.0%} "
                      f"of fp32 roofline {roof:.0f}, paired {paired:4.0%})  prefill {r['prefill_tok_s']:7.1f} tok/s  "
                      f"batch-8 {b8} tok/s", file=sys.stderr)  # fmt: skip
            q8 = runs["nomoat-int8"]
            peer = best_of(runs["transformers"], runs["transformers-passive"])
            ratios[f"{shape}_decode_speed_vs_transformers"] = round(ours["decode_tok_s"] / peer["decode_tok_s"], 3)
            ratios[f"{shape}_prefill_speed_vs_transformers"] = round(ours["prefill_tok_s"] / peer["prefill_tok_s"], 3)
            ratios[f"{shape}_batch8_speed_vs_transformers"] = round(ours["batch8_tok_s"] / peer["batch8_tok_s"], 3)
            ratios[f"{shape}_roofline_fraction"] = round(ours["roofline_fraction"], 3)
            ratios[f"{shape}_roofline_fraction_paired"] = round(ours["roofline_fraction_paired"], 3)
            ratios[f"{shape}_read_roofline_fraction"] = round(ours["read_roofline_fraction"], 3)
            ratios[f"{shape}_batch8_vs_batch1"] = round(ours["batch8_tok_s"] / ours["decode_tok_s"], 3)
            ratios[f"{shape}_batch16_vs_batch1"] = round(ours["batch16_tok_s"] / ours["decode_tok_s"], 3)
            ratios[f"{shape}_batch32_vs_batch1"] = round(ours["batch32_tok_s"] / ours["decode_tok_s"], 3)
            ratios[f"{shape}_decode_peak_rss_vs_weights_plus_kv"] = round(
                memory["decode_peak_rss_vs_weights_plus_kv"], 3)
            print(f"{shape:14s} batch 16 {ours['batch16_tok_s']:.1f} tok/s, batch 32 {ours['batch32_tok_s']:.1f} "
                  f"tok/s, stack fallbacks {ours['stack_fallbacks']}; decode peak RSS "
                  f"{memory['decode_peak_rss_mb']:.0f} MB for {memory['weights_mb']:.0f} MB weights + "
                  f"{memory['kv_cache_mb']:.0f} MB KV", file=sys.stderr)  # fmt: skip
            results.append(memory)
            ratios[f"{shape}_decode_int8_vs_fp32"] = round(q8["decode_tok_s"] / ours["decode_tok_s"], 3)
            if absent is None:
                f32 = best_of(runs["llama.cpp-f32"], runs["llama.cpp-f32-passive"])
                lq8 = best_of(runs["llama.cpp-q8_0"], runs["llama.cpp-q8_0-passive"])
                ratios[f"{shape}_decode_b1_vs_llamacpp_f32"] = round(ours["decode_tok_s"] / f32["decode_tok_s"], 3)
                ratios[f"{shape}_decode_int8_vs_llamacpp_q8_0"] = round(q8["decode_tok_s"] / lq8["decode_tok_s"], 3)
                ratios[f"{shape}_prefill_vs_llamacpp_f32"] = round(ours["prefill_tok_s"] / f32["prefill_tok_s"], 3)
    bws = [r["bandwidth_gbs"]["copy"] for r in results if "bandwidth_gbs" in r]
    machine = (f"{platform.machine()} {os.cpu_count()} cores, copy bandwidth {min(bws):.1f}-{max(bws):.1f} GB/s, "
               f"threads 2, "
               f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")  # fmt: skip
    print(
        json.dumps(
            {"benchmark": "generate", "machine": machine, "results": results, "ratios": ratios, "llama_cpp": llama}
        )
    )


if __name__ == "__main__":
    main()
