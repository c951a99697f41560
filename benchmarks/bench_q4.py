"""4-bit decode against llama.cpp's q4_0 on the same GGUF file, at the Llama-3.2-1B shape (random weights).

One q4_0 GGUF of a random Llama-3.2-1B-shaped model (hidden 2048, 16 layers, 32 / 8 heads, vocabulary 128,256, tied
head) is written once (cached): every matrix, the embedding included, in Q4_0 blocks made by the `gguf` package's
quantizer (bit for bit llama.cpp's reference one; a "pure" q4_0 file). Long-lived processes then load it:
- nomoat with default options (the Q4 blocks kept as int4 layers, the rest in the default dtype),
- nomoat with `dtype="float32", quantize="int4"` (the same blocks; fp32 embeddings, norms and attention),
- llama.cpp (llama-cpp-python), 2 threads, its OpenMP threads spinning as by default (`llamacpp`) and with
  `OMP_WAIT_POLICY=PASSIVE` (`llamacpp_passive`: much faster on a busy machine, slower on a quiet one);
and decode runs alternate between them (A, B, C, D, A, B ...): batch 1, greedy, after a 32-token prompt; the best
run of each counts, and the ratios take llama.cpp's faster variant. Prefill: a 128-token prompt (`--prefill`), best
of two runs. nomoat runs with `OMP_WAIT_POLICY=PASSIVE` (what its server sets).

    python benchmarks/bench_q4.py [--quick] [--layers N] [--new 64] [--runs 4] [--prefill 128]

`--quick`: 3 runs of 32 new tokens. Prints one JSON object as its last line; ratios are nomoat / llama.cpp
(higher is faster); a nomoat result's `stack` says whether its decode steps ran in the one-call decode stack.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
SHAPE = dict(hidden=2048, inter=8192, layers=16, heads=32, kv=8, vocab=128256)
ENGINES = ("nomoat_default", "nomoat_fp32", "llamacpp", "llamacpp_passive")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_gguf(path: Path, layers: int, seed: int = 0) -> Path:
    """A random Llama-3.2-1B-shaped model as a pure q4_0 GGUF (cached by name)."""
    if path.is_file():
        return path
    import gguf
    import numpy as np

    s = SHAPE
    rng = np.random.default_rng(seed)
    hd = s["hidden"] // s["heads"]
    w = gguf.GGUFWriter(str(path.with_suffix(".part")), "llama")
    w.add_context_length(8192)
    w.add_embedding_length(s["hidden"])
    w.add_feed_forward_length(s["inter"])
    w.add_block_count(layers)
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv"])
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(500000.0)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    tokens = [f"t{i}" for i in range(s["vocab"])]
    tokens[3:6] = ["a", "b", "ab"]  # llama.cpp wants at least one merge
    w.add_token_list(tokens)
    w.add_token_types([1] * s["vocab"])
    w.add_token_merges(["a b"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def q4(rows: int, cols: int, std: float) -> np.ndarray:
        out = []
        for a in range(0, rows, 4096):  # a piece at a time: the fp32 matrix never exists whole
            piece = rng.standard_normal((min(4096, rows - a), cols), dtype=np.float32) * std
            out.append(gguf.quants.quantize(piece, gguf.GGMLQuantizationType.Q4_0))
        return np.concatenate(out)

    def add(name: str, data: np.ndarray, kind: Any) -> None:
        w.add_tensor(name, data, raw_dtype=kind)

    Q4, F32 = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.F32
    h, kvd = s["hidden"], s["kv"] * hd
    add("token_embd.weight", q4(s["vocab"], h, 0.02), Q4)
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", np.ones(h, np.float32), F32)
        add(f"blk.{i}.ffn_norm.weight", np.ones(h, np.float32), F32)
        for name, rows, cols in (("attn_q", h, h), ("attn_k", kvd, h), ("attn_v", kvd, h), ("attn_output", h, h),
                                 ("ffn_gate", s["inter"], h), ("ffn_up", s["inter"], h), ("ffn_down", h, s["inter"])):
            add(f"blk.{i}.{name}.weight", q4(rows, cols, 0.02), Q4)
    add("output_norm.weight", np.ones(h, np.float32), F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    path.with_suffix(".part").rename(path)
    return path


# ---- the children: one engine each, timing runs on request ---------------------------------------------------------


def child(kind: str, path: str) -> None:
    """Load one engine, then answer `decode N` / `prefill N` lines on stdin with one JSON line each."""
    import torch

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 1000, (32,), generator=g).tolist()
    long_prompt = torch.randint(3, 1000, (512,), generator=g).tolist()
    t0 = time.perf_counter()
    info: dict[str, Any] = {}
    if kind.startswith("llamacpp"):
        decode, prefill = _llamacpp(path, prompt, long_prompt)
    else:
        decode, prefill = _nomoat(path, kind, prompt, long_prompt, info)
    print(json.dumps({"ready": True, "load_s": round(time.perf_counter() - t0, 2), **info}), flush=True)
    for line in sys.stdin:
        what, n = line.split()
        value = decode(int(n)) if what == "decode" else prefill(int(n))
        print(json.dumps({what: value}), flush=True)


def _nomoat(path: str, kind: str, prompt: list[int], long_prompt: list[int], info: dict[str, Any]) -> tuple[Any, Any]:
    """The engine's decode and prefill timers; `info` gets whether its decode steps run in the one-call stack."""
    import torch

    sys.path.insert(0, str(SRC))
    from bench_generate import NullTokenizer  # benchmarks/ is the script's folder

    from nomoat.generate.engine import Engine
    from nomoat.generate.sampling import SamplingParams
    from nomoat.models.checkpoint import load_model

    if kind == "nomoat_default":
        model = load_model(path, device="cpu")
    else:
        model = load_model(path, dtype=torch.float32, device="cpu", quantize="int4")
    engine = Engine(model, NullTokenizer(), max_running=1, max_seq_len=1024, prefix_cache_bytes=0)
    engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True))  # warm-up
    info["stack"] = engine.decode.plan is not None and engine.decode.stack_steps >= 7  # every decode step of it

    def decode(n: int) -> float:
        return engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)
                               ).decode_tokens_per_s  # fmt: skip

    def prefill(n: int) -> float:
        t = time.perf_counter()
        engine.generate(long_prompt[:n], SamplingParams(temperature=0, max_new_tokens=1, ignore_eos=True))
        return n / (time.perf_counter() - t)

    return decode, prefill


def _llamacpp(path: str, prompt: list[int], long_prompt: list[int]) -> tuple[Any, Any]:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(path, n_threads=2, n_threads_batch=2, n_ctx=1024, n_batch=512, logits_all=False, verbose=False)

    def decode(n: int) -> float:
        llm.reset()
        llm.eval(prompt)
        t = time.perf_counter()
        for _ in range(n):  # greedy, as nomoat's runs
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        return n / (time.perf_counter() - t)

    def prefill(n: int) -> float:
        llm.reset()
        t = time.perf_counter()
        llm.eval(long_prompt[:n])
        return n / (time.perf_counter() - t)

    decode(8)  # warm-up
    return decode, prefill


class Child:
    """A child process running `child(kind, path)`."""

    def __init__(self, kind: str, path: Path) -> None:
        env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("OMP_WAIT_POLICY", None)
        if kind != "llamacpp":
            env["OMP_WAIT_POLICY"] = "PASSIVE"  # nomoat's setting; llama.cpp's second variant
        self.kind = kind
        self.proc = subprocess.Popen([sys.executable, __file__, "--child", kind, str(path)], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"{self.kind} child exited ({self.proc.wait()})")

    def ask(self, what: str, n: int) -> float:
        self.proc.stdin.write(f"{what} {n}\n")
        self.proc.stdin.flush()
        return float(self._read()[what])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 runs of 32 new tokens")
    ap.add_argument("--layers", type=int, default=SHAPE["layers"], help="cut the model to N layers")
    ap.add_argument("--new", type=int, default=64, help="new tokens per decode run")
    ap.add_argument("--runs", type=int, default=4, help="decode runs per engine (alternating)")
    ap.add_argument("--prefill", type=int, default=128, help="prompt tokens of the prefill runs")
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ", ".join(ENGINES))
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "nomoat-bench" / "q4")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(*a.child)
        return
    if a.quick:
        a.runs, a.new = 3, 32
    a.cache_dir.mkdir(parents=True, exist_ok=True)
    path = write_gguf(a.cache_dir / f"llama-1b-L{a.layers}-q4_0.gguf", a.layers)
    kinds = [k for k in a.engines.split(",") if k]
    children = {}
    for kind in kinds:
        log(f"loading {kind}")
        children[kind] = Child(kind, path)
    decode: dict[str, list[float]] = {k: [] for k in kinds}
    prefill: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(a.runs):
        for kind, c in children.items():
            decode[kind].append(round(c.ask("decode", a.new), 2))
        log(f"run {r}: " + ", ".join(f"{k} {v[-1]}" for k, v in decode.items()))
    for _ in range(2):
        for kind, c in children.items():
            prefill[kind].append(round(c.ask("prefill", a.prefill), 2))
    for c in children.values():
        c.close()
    best = {k: max(v) for k, v in decode.items()}
    best_prefill = {k: max(v) for k, v in prefill.items()}
    ratios = {}
    peers = [k for k in kinds if k.startswith("llamacpp")]
    if peers:
        peer, peer_prefill = max(best[k] for k in peers), max(best_prefill[k] for k in peers)
        for k in kinds:
            if k not in peers:
                ratios[f"{k}_decode_tok_s_vs_llamacpp_q4_0"] = round(best[k] / peer, 3)
                ratios[f"{k}_prefill_{a.prefill}_tok_s_vs_llamacpp_q4_0"] = round(best_prefill[k] / peer_prefill, 3)
    results = [{"engine": k, "load_s": children[k].info.get("load_s"), "stack": children[k].info.get("stack"),
                "decode_tok_s": best[k],
                "decode_runs": decode[k], "prefill_tok_s": best_prefill[k], "prefill_runs": prefill[k]}
               for k in kinds]  # fmt: skip
    machine = f"{platform.machine()} {platform.processor()}, {os.cpu_count()} cores"
    print(json.dumps({"benchmark": "q4", "machine": machine, "layers": a.layers, "new_tokens": a.new,
                      "results": results, "ratios": ratios}))  # fmt: skip


if __name__ == "__main__":
    main()
