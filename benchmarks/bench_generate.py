"""Generation speed: nomoat's engine against transformers `generate`, in one run, on the same model files.

Random models shaped like SmolLM2-135M and Qwen2.5-0.5B are built with transformers and saved once; each engine
loads them in fp32. Measured, with 2 threads:
- decode tokens/s at batch 1 (128 new tokens after a 32-token prompt; prefill time excluded),
- prefill tokens/s for a 512-token prompt,
- batch-8 throughput (8 prompts of 32 tokens, 128 new tokens each, all generated tokens per second),
- the memory-bandwidth roofline: measured read bandwidth / weight bytes read per token, and each engine's fraction.
llama.cpp (llama-cpp-python) is a benchmark extra; it is reported as absent when not installed.

    python benchmarks/bench_generate.py [--quick]

Prints one JSON object as its last line (see DESIGN.md, Benchmarks).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
}  # fmt: skip


def make_model(shape: str, path: Path) -> None:
    """Save a random model of the given shape (llama family for SmolLM2, qwen2 for Qwen2.5)."""
    import transformers

    cls = transformers.LlamaConfig if shape.startswith("smollm") else transformers.Qwen2Config
    cfg = cls(**SHAPES[shape], max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)


def bandwidth_gbs() -> float:
    """Read bandwidth of fp32 `sum` over a 512 MiB tensor (what decode is bound by)."""
    x = torch.ones(128 * 2**20)
    x.sum()
    t = time.perf_counter()
    for _ in range(5):
        x.sum()
    return 5 * x.numel() * 4 / (time.perf_counter() - t) / 1e9


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights read per decoded token: every parameter once (both shapes tie the embedding to the head,
    which reads all of it every token)."""
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def bench_nomoat(path: Path, new: int, batch8_new: int, prefill_len: int) -> dict:
    """nomoat's engine: decode at batch 1, prefill, batch-8 throughput."""
    from nomoat.generate.engine import Engine
    from nomoat.generate.sampling import SamplingParams
    from nomoat.models.checkpoint import load_model
    from nomoat.models.packed import pack_model

    model = load_model(path, dtype=torch.float32, device="cpu")
    weights = weight_bytes_per_token(model)
    pack_model(model)  # what `nomoat generate` / `chat` run

    class _Tok:  # the engine needs eos ids and a detokenizer; random models have no tokenizer
        eos_token_ids: list[int] = []

        def stream_decoder(self, skip_special_tokens: bool = False):
            class _D:
                def add(self, t: int) -> str:
                    return ""

                def flush(self) -> str:
                    return ""

            return _D()

    engine = Engine(model, _Tok(), max_running=8, max_seq_len=1024, prefix_cache_bytes=0)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 1000, (32,), generator=g).tolist()
    params = SamplingParams(temperature=0, max_new_tokens=new, ignore_eos=True)
    engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True))  # warm-up
    out = engine.generate(prompt, params)
    decode = out.decode_tokens_per_s
    long_prompt = torch.randint(3, 1000, (prefill_len,), generator=g).tolist()
    t = time.perf_counter()
    engine.generate(long_prompt, SamplingParams(temperature=0, max_new_tokens=1, ignore_eos=True))
    prefill = prefill_len / (time.perf_counter() - t)
    prompts = [torch.randint(3, 1000, (32,), generator=g).tolist() for _ in range(8)]
    p8 = SamplingParams(temperature=0, max_new_tokens=batch8_new, ignore_eos=True)
    t = time.perf_counter()
    handles = [engine.submit(p, p8) for p in prompts]
    n = sum(h.result().completion_tokens for h in handles)
    batch8 = n / (time.perf_counter() - t)
    return {"decode_tok_s": decode, "prefill_tok_s": prefill, "batch8_tok_s": batch8,
            "weight_bytes_per_token": weights}


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
        t = time.perf_counter()
        model.generate(prompt, max_new_tokens=new, min_new_tokens=new, **kw)
        decode = (new - 1) / (time.perf_counter() - t - t_prefill)
        long_prompt = torch.randint(3, 1000, (1, prefill_len), generator=g)
        t = time.perf_counter()
        model(long_prompt)
        prefill = prefill_len / (time.perf_counter() - t)
        prompts = torch.randint(3, 1000, (8, 32), generator=g)
        t = time.perf_counter()
        out = model.generate(prompts, max_new_tokens=batch8_new, min_new_tokens=batch8_new, **kw)
        batch8 = (out.shape[1] - 32) * 8 / (time.perf_counter() - t)
    return {"decode_tok_s": decode, "prefill_tok_s": prefill, "batch8_tok_s": batch8}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="SmolLM2 shape only, fewer tokens (about 2 minutes)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    shapes = ["smollm2-135m"] if args.quick else list(SHAPES)
    new, batch8_new, prefill_len = (64, 32, 256) if args.quick else (128, 128, 512)
    bw = bandwidth_gbs()
    results, ratios = [], {}
    try:
        import llama_cpp  # noqa: F401

        llama = "installed, not wired yet"
    except ImportError:
        llama = "absent (pip install llama-cpp-python to compare)"
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            path = Path(tmp) / shape
            make_model(shape, path)
            ours = bench_nomoat(path, new, batch8_new, prefill_len)
            peer = bench_transformers(path, new, batch8_new, prefill_len)
            roof = bw * 1e9 / ours["weight_bytes_per_token"]
            for name, r in (("nomoat", ours), ("transformers", peer)):
                r.update(engine=name, shape=shape, roofline_tok_s=roof, roofline_fraction=r["decode_tok_s"] / roof)
                results.append(r)
                print(f"{shape:14s} {name:12s} decode {r['decode_tok_s']:6.1f} tok/s ({r['roofline_fraction']:.0%} "
                      f"of roofline {roof:.0f})  prefill {r['prefill_tok_s']:7.1f} tok/s  batch-8 "
                      f"{r['batch8_tok_s']:6.1f} tok/s", file=sys.stderr)
            ratios[f"{shape}_decode_speed_vs_transformers"] = round(ours["decode_tok_s"] / peer["decode_tok_s"], 3)
            ratios[f"{shape}_prefill_speed_vs_transformers"] = round(ours["prefill_tok_s"] / peer["prefill_tok_s"], 3)
            ratios[f"{shape}_batch8_speed_vs_transformers"] = round(ours["batch8_tok_s"] / peer["batch8_tok_s"], 3)
            ratios[f"{shape}_roofline_fraction"] = round(ours["roofline_fraction"], 3)
            ratios[f"{shape}_batch8_vs_batch1"] = round(ours["batch8_tok_s"] / ours["decode_tok_s"], 3)
    machine = f"{platform.machine()} {os.cpu_count()} cores, {bw:.1f} GB/s read bandwidth, torch threads 2"
    print(json.dumps({"benchmark": "generate", "machine": machine, "results": results, "ratios": ratios,
                      "llama_cpp": llama}))


if __name__ == "__main__":
    main()
