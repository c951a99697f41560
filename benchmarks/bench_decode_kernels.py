"""Decode speed by linear-layer kernel, in one run: torch's paths against nomoat's compiled kernels.

Loads a SmolLM2-135M-shaped random model (or `--shape qwen2.5-0.5b`; built by transformers, as in
bench_generate.py), prefills 32 tokens per row, then decodes 64 through the KV cache (`--batch` rows at once,
default 1); best of 3 runs per variant, variants interleaved (the machine may be shared):
- `fp32_linear`: plain `F.linear` (MKL) and torch attention, no compiled kernels;
- `fp32_onednn`: weights packed for oneDNN, torch attention (what nomoat ran before the kernels);
- `fp32_kernels`: the decode model (`nomoat.inference.prepare`) layer by layer: fp32 panel kernels per linear layer,
  torch attention (`DecodeConfig(stack=False)`);
- `fp32_stack`: the same with the decode stack (`inference/stack.py`: all layers in one compiled call);
- `int8_fbgemm`: weight-only int8 through fbgemm's embedding-bag kernels, torch attention;
- `int8_kernels` / `int8_stack`: weight-only int8 through nomoat's kernels, layer by layer / the decode stack.
Also times the matmuls alone (every matrix at one row, fp32 and int8) as GB/s of weights read. `--kernels-only`
measures only the four kernel variants (and no matmuls), for a quicker stack A/B.
`OMP_WAIT_POLICY=PASSIVE` is set unless already set (as bench_generate.py). Prints one JSON object as its last line.

    python benchmarks/bench_decode_kernels.py [--quick] [--kernels-only] [--shape S] [--batch B]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_generate import SHAPES, make_model  # noqa: E402

from nomoat import kernels  # noqa: E402
from nomoat.inference import DecodeConfig, prepare  # noqa: E402
from nomoat.kernels import build  # noqa: E402
from nomoat.models.checkpoint import load_model  # noqa: E402
from nomoat.models.kv_cache import KVCache  # noqa: E402
from nomoat.models.packed import pack_model  # noqa: E402
from nomoat.models.quantize import quantize_int8, quantize_model  # noqa: E402


@contextlib.contextmanager
def torch_paths() -> Iterator[None]:
    """Run as if the kernels had not built (every layer and attention take their torch fallback)."""
    saved = dict(build._state)
    build._state["ok"] = False
    try:
        yield
    finally:
        build._state.clear()
        build._state.update(saved)


def decode_tok_s(model: Any, steps: int, runs: int, batch: int = 1) -> float:
    """Best decode tokens/s (all rows) over `runs` runs of `steps` greedy steps after a 32-token prefill per row."""
    best = 0.0
    vocab = model.config.vocab_size
    for _ in range(runs):
        cache = KVCache(model.config, batch, 256, torch.float32, "cpu")
        with torch.inference_mode():
            out = model(torch.randint(0, vocab, (batch, 32)), position_ids=torch.arange(32)[None].expand(batch, 32),
                        cache=cache)  # fmt: skip
            tok = out[:, -1].argmax(-1, keepdim=True)
            t = time.perf_counter()
            for i in range(steps):
                pos = torch.full((batch, 1), 32 + i)
                tok = model(tok, position_ids=pos, cache=cache, kv_len=33 + i)[:, -1].argmax(-1, keepdim=True)
            best = max(best, batch * steps / (time.perf_counter() - t))
    return best


def matmul_gbs(plain: torch.nn.Module, runs: int) -> dict[str, float]:
    """GB/s of weights read by one row through every linear layer: F.linear, oneDNN, nomoat fp32 and int8 kernels."""
    ws = [m.weight.detach() for m in plain.modules() if isinstance(m, torch.nn.Linear)]
    fp32_bytes = sum(w.numel() * 4 for w in ws)
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), None) for w in ws]
    xs = {w.shape[1]: torch.randn(1, w.shape[1]) for w in ws}
    calls = {
        "linear": lambda i, w: F.linear(xs[w.shape[1]], w),
        "onednn": lambda i, w: torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], onednn[i], None, "none", [], ""),
    }
    if kernels.available():
        panels = [kernels.pack_fp32(w) for w in ws]
        qp, sc = zip(*(kernels.pack_int8(*quantize_int8(w)) for w in ws))  # GGUF Q8_0 blocks
        calls["kernels_fp32"] = lambda i, w: kernels.linear_fp32(xs[w.shape[1]], panels[i], w.shape[0])
        calls["kernels_int8"] = lambda i, w: kernels.linear_int8(xs[w.shape[1]], qp[i], sc[i], w.shape[0])
    best = dict.fromkeys(calls, 0.0)
    for _ in range(runs):
        for name, call in calls.items():
            t = time.perf_counter()
            for i, w in enumerate(ws):
                call(i, w)
            nbytes = fp32_bytes / 4 if name == "kernels_int8" else fp32_bytes
            best[name] = max(best[name], nbytes / (time.perf_counter() - t) / 1e9)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="32 steps, best of 2 (default 64, best of 3)")
    ap.add_argument("--kernels-only", action="store_true", help="only nomoat's kernel variants (stack on and off)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m", help="model shape (random weights)")
    ap.add_argument("--batch", type=int, default=1, help="rows decoded together (default 1)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    steps, runs = (32, 2) if args.quick else (64, 3)
    if not kernels.available():
        print("nomoat's kernels did not build: only torch's paths are measured", file=sys.stderr)
    results: dict[str, float] = {}
    gbs: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / args.shape
        make_model(args.shape, path)
        variants: dict[str, tuple[torch.nn.Module, Any]] = {}
        if not args.kernels_only:
            plain = load_model(path, "float32", "cpu")
            gbs = matmul_gbs(plain, 5)
            with torch_paths():
                onednn = load_model(path, "float32", "cpu")
                pack_model(onednn)
                fbgemm = quantize_model(load_model(path, "float32", "cpu"), "int8")
            variants = {"fp32_linear": (plain, torch_paths), "fp32_onednn": (onednn, torch_paths),
                        "int8_fbgemm": (fbgemm, torch_paths)}  # fmt: skip
        if kernels.available():
            packed = load_model(path, "float32", "cpu")
            pack_model(packed)
            int8 = quantize_model(load_model(path, "float32", "cpu"), "int8")
            layers, stack = DecodeConfig(stack=False), DecodeConfig(stack=True)
            variants |= {"fp32_kernels": (prepare(packed, layers), contextlib.nullcontext),
                         "fp32_stack": (prepare(packed, stack), contextlib.nullcontext),
                         "int8_kernels": (prepare(int8, layers), contextlib.nullcontext),
                         "int8_stack": (prepare(int8, stack), contextlib.nullcontext)}  # fmt: skip
        stack_used: dict[str, int] = {}  # decode steps that went through the one-call stack, per variant
        for _ in range(runs):  # interleaved, best of `runs`
            for name, (model, context) in variants.items():
                used = getattr(model, "stack_steps", 0)
                with context():
                    results[name] = max(results.get(name, 0.0), decode_tok_s(model, steps, 1, args.batch))
                after = getattr(model, "stack_steps", 0)
                stack_used[name] = stack_used.get(name, 0) + after - used
    for k, v in results.items():
        print(f"{k:14s} {v:6.1f} tok/s", file=sys.stderr)
    for k, v in gbs.items():
        print(f"matmuls {k:14s} {v:5.1f} GB/s of weights at one row", file=sys.stderr)
    ratios = {}
    if "fp32_onednn" in results:
        ratios["onednn_decode_speed_vs_linear"] = round(results["fp32_onednn"] / results["fp32_linear"], 3)
    if "fp32_kernels" in results:
        if "fp32_onednn" in results:
            ratios["kernels_fp32_decode_speed_vs_onednn"] = round(results["fp32_kernels"] / results["fp32_onednn"], 3)
            ratios["kernels_int8_decode_speed_vs_fbgemm"] = round(results["int8_kernels"] / results["int8_fbgemm"], 3)
        ratios["kernels_int8_decode_speed_vs_kernels_fp32"] = round(
            results["int8_kernels"] / results["fp32_kernels"], 3
        )
        ratios["stack_fp32_speed_vs_kernels"] = round(results["fp32_stack"] / results["fp32_kernels"], 3)
        ratios["stack_int8_speed_vs_kernels"] = round(results["int8_stack"] / results["int8_kernels"], 3)
    machine = f"cpu, torch threads 2, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}"
    isa = kernels.isa()
    print(json.dumps({"benchmark": "decode_kernels", "machine": machine, "kernels_isa": isa, "shape": args.shape,
                      "batch": args.batch, "results": [{"kernel": k, "decode_tok_s": v} for k, v in results.items()],
                      "stack_calls": stack_used, "matmul_weight_gbs_at_one_row": gbs, "ratios": ratios}))  # fmt: skip


if __name__ == "__main__":
    main()
