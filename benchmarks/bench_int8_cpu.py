"""Batch-1 decode cost on one thread: nomoat `--quantize int8` against llama.cpp q8_0, in CPU time per step.

On a shared machine, wall-clock tokens/s swings with the neighbours' load (and llama.cpp's spinning threads collapse
under it), so this measures what one thread spends per decoded token: `time.process_time()` over a greedy batch-1
decode after a 32-token prompt, in fresh child processes, nomoat and llama.cpp interleaved, best of `--rounds`.
nomoat runs its engine (what `nomoat generate --quantize int8` runs; the per-step cost is a run of `--steps + 1` new
tokens less a run of one, so prefill is left out), llama.cpp its `eval` of one token at a time with `n_threads=1`.
The model is the random SmolLM2-135M shape of bench_generate.py; its q8_0 GGUF is written as bench_generate.py
writes it (llama.cpp's converter, else nomoat's exporter). Both children run under `OMP_WAIT_POLICY=PASSIVE`.

    python benchmarks/bench_int8_cpu.py [--rounds 3] [--steps 64] [--shape smollm2-135m]

Prints one JSON object as its last line: each engine's best CPU ms per step (and its wall ms, for reference) and
`decode_int8_vs_llamacpp_q8_0_cpu` (llama.cpp's CPU time over nomoat's: above 1, nomoat spends less per token).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_generate import SHAPES, NullTokenizer, make_gguf, make_model  # noqa: E402

PROMPT = torch.randint(3, 1000, (32,), generator=torch.Generator().manual_seed(0)).tolist()


def nomoat_step(path: Path, steps: int) -> dict:
    """nomoat int8 through its engine, one thread: CPU and wall ms per decode step (best of two runs)."""
    from nomoat.generate.engine import Engine
    from nomoat.generate.sampling import SamplingParams
    from nomoat.models.checkpoint import load_model
    from nomoat.models.quantize import quantize_model

    model = quantize_model(load_model(path, dtype=torch.float32, device="cpu"), "int8")
    engine = Engine(model, NullTokenizer(), max_running=1, max_seq_len=1024, prefix_cache_bytes=0)

    def run(n: int) -> tuple[float, float]:
        c, t = time.process_time(), time.perf_counter()
        engine.generate(PROMPT, SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True))
        return time.process_time() - c, time.perf_counter() - t

    run(8)  # warm-up
    best = None
    for _ in range(2):
        (c1, w1), (c, w) = run(1), run(steps + 1)
        cur = ((c - c1) / steps * 1e3, (w - w1) / steps * 1e3)
        best = cur if best is None or cur[0] < best[0] else best
    return {"cpu_ms": best[0], "wall_ms": best[1]}


def llamacpp_step(gguf: Path, steps: int) -> dict:
    """llama.cpp on one thread, greedy by argmax over its logits: CPU and wall ms per decode step (best of two)."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(str(gguf), n_threads=1, n_threads_batch=1, n_ctx=1024, n_batch=512, verbose=False)

    def run(n: int) -> tuple[float, float]:
        llm.reset()
        llm.eval(PROMPT)
        c, t = time.process_time(), time.perf_counter()
        for _ in range(n):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        return (time.process_time() - c) / n * 1e3, (time.perf_counter() - t) / n * 1e3

    run(8)  # warm-up
    cpu, wall = min(run(steps) for _ in range(2))
    return {"cpu_ms": cpu, "wall_ms": wall}


def child(kind: str, path: Path, steps: int) -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    cmd = [sys.executable, __file__, "--child", kind, str(path), str(steps)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (one child per engine each)")
    ap.add_argument("--steps", type=int, default=64, help="decode steps timed per run")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)  # KIND PATH STEPS
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.child:
        kind, path, steps = args.child
        print(json.dumps((nomoat_step if kind == "nomoat" else llamacpp_step)(Path(path), int(steps))))
        return
    runs: dict[str, list[dict]] = {"nomoat-int8": [], "llama.cpp-q8_0": []}
    with tempfile.TemporaryDirectory() as tmp:
        path, gguf = Path(tmp) / args.shape, Path(tmp) / f"{args.shape}-q8_0.gguf"
        make_model(args.shape, path)
        source = make_gguf(path, gguf, "q8_0")
        for i in range(args.rounds):
            runs["nomoat-int8"].append(child("nomoat", path, args.steps))
            runs["llama.cpp-q8_0"].append(child("llamacpp", gguf, args.steps))
            print(f"round {i + 1}: nomoat {runs['nomoat-int8'][-1]['cpu_ms']:.2f} ms, llama.cpp "
                  f"{runs['llama.cpp-q8_0'][-1]['cpu_ms']:.2f} ms CPU per step", file=sys.stderr)  # fmt: skip
    best = {k: {m: min(r[m] for r in v) for m in ("cpu_ms", "wall_ms")} for k, v in runs.items()}
    ratio = best["llama.cpp-q8_0"]["cpu_ms"] / best["nomoat-int8"]["cpu_ms"]
    print(json.dumps({"benchmark": "int8-cpu", "shape": args.shape, "steps": args.steps, "gguf": source,
                      "best": best, "runs": runs,
                      "ratios": {f"{args.shape}_decode_int8_vs_llamacpp_q8_0_cpu": round(ratio, 3)}}))  # fmt: skip


if __name__ == "__main__":
    main()
