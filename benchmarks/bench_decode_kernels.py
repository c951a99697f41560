"""Decode speed at batch 1 by linear-layer kernel, in one run: plain fp32 `F.linear`, oneDNN-packed fp32, int8.

Loads a SmolLM2-135M-shaped random model (built by transformers, as in bench_generate.py), prefills 32 tokens, then
decodes 64 through the KV cache; best of 3 runs per kernel. Prints one JSON object as its last line.

    python benchmarks/bench_decode_kernels.py [--quick]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_generate import make_model  # noqa: E402

from nomoat.models.checkpoint import load_model  # noqa: E402
from nomoat.models.kv_cache import KVCache  # noqa: E402
from nomoat.models.packed import pack_model  # noqa: E402
from nomoat.models.quantize import quantize_model  # noqa: E402


def decode_tok_s(model: torch.nn.Module, steps: int, runs: int) -> float:
    """Best decode tokens/s over `runs` runs of `steps` greedy steps after a 32-token prefill."""
    best = 0.0
    for _ in range(runs):
        cache = KVCache(model.config, 1, 256, torch.float32, "cpu")
        with torch.inference_mode():
            out = model(torch.randint(0, 49152, (1, 32)), position_ids=torch.arange(32)[None], cache=cache)
            tok = out[:, -1].argmax(-1, keepdim=True)
            t = time.perf_counter()
            for i in range(steps):
                pos = torch.tensor([[32 + i]])
                tok = model(tok, position_ids=pos, cache=cache, kv_len=33 + i)[:, -1].argmax(-1, keepdim=True)
            best = max(best, steps / (time.perf_counter() - t))
    return best


def main() -> None:
    quick = "--quick" in sys.argv
    torch.set_num_threads(2)
    steps, runs = (32, 2) if quick else (64, 3)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "smollm2-135m"
        make_model("smollm2-135m", path)
        plain = load_model(path, "float32", "cpu")
        results["fp32_linear"] = decode_tok_s(plain, steps, runs)
        pack_model(plain)
        results["fp32_packed"] = decode_tok_s(plain, steps, runs)
        del plain
        q = quantize_model(load_model(path, "float32", "cpu"), "int8")
        results["int8"] = decode_tok_s(q, steps, runs)
    for k, v in results.items():
        print(f"{k:12s} {v:6.1f} tok/s", file=sys.stderr)
    ratios = {
        "packed_decode_speed_vs_linear": round(results["fp32_packed"] / results["fp32_linear"], 3),
        "int8_decode_speed_vs_packed_fp32": round(results["int8"] / results["fp32_packed"], 3),
        "int8_decode_speed_vs_linear_fp32": round(results["int8"] / results["fp32_linear"], 3),
    }
    print(json.dumps({"benchmark": "decode_kernels", "machine": "cpu, torch threads 2",
                      "results": [{"kernel": k, "decode_tok_s": v} for k, v in results.items()], "ratios": ratios}))


if __name__ == "__main__":
    main()
