"""Real model sizes on a laptop CPU: load memory per format, and QLoRA training memory and speed against PEFT.

Random-weight models of the Llama-3.2-1B, Llama-3.2-3B and Llama-3.1-8B shapes, written in bf16 as the Hub ships
them (`--layers N` cuts every shape to N layers for a reduced run; the JSON says so). Each measurement runs in a
fresh subprocess, so its peak RSS (/proc VmHWM) is its own:

- load: nomoat's `load_model` in bf16, `--quantize int8` and `int4` (each layer quantized as it is read). Peak RSS
  growth during the load (over the RSS after a warm-up load of a tiny model, which pays the one-time code and
  library pages) against the bytes of the loaded model's tensors; target <= 1.15x. The 8B shape loads cut to
  4 layers (its bf16 weights alone are 16 GB).
- qlora: nomoat QLoRA (NF4 base loaded straight into NF4, frozen products in bf16 where the CPU has it, LoRA r16
  alpha 32 on all linear layers in fp32, AdamW) against transformers + PEFT LoRA over a bf16 model (the same LoRA),
  sequence 512, batch 1, random tokens, plain torch loops; tokens/s after warm-up steps and the process's peak RSS.
  Targets: peak RSS at 1B <= 3 GB, 3B <= 6 GB, 8B <= 12 GB; tokens/s >= 2x PEFT's at 1B. The 3B and 8B shapes are
  measured cut to 2 and 4 layers and extrapolated per layer (both measurements are in the JSON). nomoat runs as
  `nomoat train --quantize-base nf4 --dtype bfloat16` does: embeddings, norms and head in bf16 under bf16 autocast.
  `--malloc-check` adds nomoat with `NOMOAT_MALLOC_TUNING=0`, `--checkpointing-check` nomoat with activation
  checkpointing (`--grad-checkpointing`: each layer recomputed in the backward pass); each run reports its RSS after
  every step.
- decode: nomoat's engine on the bf16 model (what `dtype="auto"` loads on a CPU with AVX-512-BF16) against llama.cpp
  (llama-cpp-python) on an f16 GGUF of the same weights written by llama.cpp's own converter
  (`llamacpp_converter.py`), each in fresh processes, interleaved (nomoat, llama.cpp, nomoat, ...; `--decode-rounds`),
  best of the rounds: batch-1 greedy decode tok/s after a 32-token prompt (`--decode-tokens` new tokens: 2,048, or
  128 with `--quick`), prefill tok/s of a 512-token prompt, and nomoat's peak RSS while decoding (peak reset once the
  engine is built; counted from the RSS after torch and nomoat are imported) against the loaded model plus its KV
  cache (sized for 2,048 + 64 positions). Targets: decode >= 1.0x, prefill >= 0.8x, RSS <= 1.3x. nomoat runs under
  OMP_WAIT_POLICY=PASSIVE (its setting), llama.cpp under ACTIVE (spinning) and PASSIVE, and the ratios take the
  peer's faster result of the two for each speed.

    python benchmarks/bench_sizes.py [--quick] [--layers N] [--steps N] [--warmup N] [--shapes 1b,3b,8b] [--no-peft]
    python benchmarks/bench_sizes.py --quick --skip load,qlora   # decode against llama.cpp only
    python benchmarks/bench_sizes.py --shapes 3b,8b --skip load,decode --no-peft   # QLoRA memory at 3B and 8B only

`--quick` runs the 1B shape only. Prints one JSON object as its last line (see DESIGN.md, Benchmarks).
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # before torch loads OpenMP
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from machine_info import describe, ratio  # noqa: E402

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
GB = 1e9
SHAPES: dict[str, dict[str, Any]] = {
    "1b": dict(hidden=2048, inter=8192, layers=16, heads=32, kv=8, vocab=128256, tied=True),
    "3b": dict(hidden=3072, inter=8192, layers=28, heads=24, kv=8, vocab=128256, tied=True),
    "8b": dict(hidden=4096, inter=14336, layers=32, heads=32, kv=8, vocab=128256, tied=False),
}
QLORA_TARGET_GB = {"1b": 3.0, "3b": 6.0, "8b": 12.0}
# The 8B shape trains cut to these layer counts; the full model is extrapolated per layer.
CUT_8B = (2, 4)
# QLoRA rows measured on cut models (two layer counts, extrapolated per layer) so that no run passes ~5 GB here.
QLORA_CUTS = {"3b": (2, 4), "8b": CUT_8B}
RANK, ALPHA, LR, SEQ = 16, 32, 2e-4, 512


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_model(path: Path, shape: dict[str, Any], layers: int, seed: int = 0) -> Path:
    """A random Llama checkpoint in bf16 (config.json + one model.safetensors), written once (cached by stamp)."""
    import torch
    from safetensors.torch import save_file

    stamp = json.dumps({**shape, "layers": layers, "seed": seed}, sort_keys=True)
    if (path / "stamp.json").is_file() and (path / "stamp.json").read_text() == stamp:
        return path
    path.mkdir(parents=True, exist_ok=True)
    h, i, nh, kv, v = shape["hidden"], shape["inter"], shape["heads"], shape["kv"], shape["vocab"]
    hd = h // nh
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=h, intermediate_size=i,
               num_hidden_layers=layers, num_attention_heads=nh, num_key_value_heads=kv, vocab_size=v, head_dim=hd,
               max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, hidden_act="silu",
               tie_word_embeddings=shape["tied"], torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2)  # fmt: skip
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).mul_(0.02).to(torch.bfloat16)  # noqa: E731 (one fp32 copy at a time)
    ones = lambda: torch.ones(h, dtype=torch.bfloat16)  # noqa: E731
    t = {"model.embed_tokens.weight": r(v, h), "model.norm.weight": ones()}
    if not shape["tied"]:
        t["lm_head.weight"] = r(v, h)
    for n in range(layers):
        p = f"model.layers.{n}."
        t |= {p + "self_attn.q_proj.weight": r(nh * hd, h), p + "self_attn.k_proj.weight": r(kv * hd, h),
              p + "self_attn.v_proj.weight": r(kv * hd, h), p + "self_attn.o_proj.weight": r(h, nh * hd),
              p + "mlp.gate_proj.weight": r(i, h), p + "mlp.up_proj.weight": r(i, h),
              p + "mlp.down_proj.weight": r(h, i), p + "input_layernorm.weight": ones(),
              p + "post_attention_layernorm.weight": ones()}  # fmt: skip
    save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "stamp.json").write_text(stamp)
    return path


# ---- workers (run in their own process) -----------------------------------------------------------------------

STATUS = r"""
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

def tensor_bytes(model):
    seen, n = set(), 0
    for v in model.state_dict().values():
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            n += v.numel() * v.element_size()
    return n
"""

LOAD_WORKER = STATUS + r"""
import json, sys, time, torch
from nomoat.models.checkpoint import load_model
torch.set_num_threads(int(sys.argv[4]))
big, small, mode = sys.argv[1], sys.argv[2], sys.argv[3]
q = None if mode == "bf16" else mode
warm = load_model(small, "bfloat16", "cpu", quantize=q)
del warm
base = status("VmRSS")
reset_peak()
t = time.perf_counter()
model = load_model(big, "bfloat16", "cpu", quantize=q)
seconds = time.perf_counter() - t
peak, after, size = status("VmHWM") - base, status("VmRSS") - base, tensor_bytes(model)
print(json.dumps({"mode": mode, "seconds": round(seconds, 2), "loaded_bytes": size, "rss_base": base,
                  "rss_growth_peak": peak, "rss_growth_after": after, "peak_vs_loaded": round(peak / size, 3),
                  "after_vs_loaded": round(after / size, 3)}))
"""

TRAIN_WORKER = STATUS + r"""
import json, sys, time, torch
import torch.nn.functional as F
engine, path, steps, warmup, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
RANK, ALPHA, LR, SEQ = 16, 32, 2e-4, 512
torch.set_num_threads(threads)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
t0 = time.perf_counter()
autocast = torch.autocast("cpu", dtype=torch.bfloat16)
if engine.startswith("nomoat"):
    from nomoat.config import LoRAConfig
    from nomoat.lora import inject_lora, trainable_parameters
    from nomoat.lora.nf4 import NF4Linear, load_model_nf4
    from nomoat.train.allocator import tune_cpu_allocator
    from nomoat.train.loss import causal_lm_loss_sum

    tuned = tune_cpu_allocator()  # as the training loop does (NOMOAT_MALLOC_TUNING=0 turns it off)
    # As `nomoat train --quantize-base nf4 --dtype bfloat16`: NF4 linears, the rest bf16, bf16 autocast.
    model = load_model_nf4(path, "bfloat16", "cpu")
    model.gradient_checkpointing = engine == "nomoat-checkpointed"
    rss_loaded = status("VmRSS")
    by_dtype = {}
    for t in list(model.parameters()) + list(model.buffers()):
        by_dtype[str(t.dtype)] = by_dtype.get(str(t.dtype), 0) + t.numel() * t.element_size()
    compute = str(next(m for m in model.modules() if isinstance(m, NF4Linear)).compute_dtype)
    inject_lora(model, LoRAConfig(r=RANK, alpha=ALPHA, dropout=0.0, target_modules=TARGETS))
    for p in model.parameters():  # adapters train in fp32 over the bf16 rest, as the recipe does
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    model.train()
    params = list(trainable_parameters(model).values())

    def loss_of(ids):
        with autocast:
            hidden = model(ids, return_hidden=True)
            s, n = causal_lm_loss_sum(model, hidden, ids, 256)  # the recipe's default loss_chunk
        return s / n
    extra = {"malloc_tuning": tuned, "grad_checkpointing": model.gradient_checkpointing,
             "nf4_compute_dtype": compute, "unquantized_dtype": "bfloat16",
             "adapter_dtype": str(params[0].dtype), "base_bytes_by_dtype": by_dtype, "rss_after_load": rss_loaded}
else:
    import transformers
    from peft import LoraConfig, get_peft_model
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_of(ids):
        return model(input_ids=ids, labels=ids).loss
    extra = {"base_dtype": "bfloat16", "adapter_dtype": str(params[0].dtype)}
opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
setup_s, rss_setup = time.perf_counter() - t0, status("VmRSS")
g = torch.Generator().manual_seed(0)
vocab = model.config.vocab_size
times, cpu, losses, rss_steps = [], [], [], []
for i in range(warmup + steps):
    ids = torch.randint(3, vocab, (1, SEQ), generator=g)
    t, c = time.perf_counter(), time.process_time()
    loss = loss_of(ids)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses.append(float(loss.detach()))
    times.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
    rss_steps.append(status("VmRSS"))
    print(f"  {engine} step {i + 1}: {times[-1]:.2f} s, loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
measured = times[warmup:]
print(json.dumps({"engine": engine, "setup_s": round(setup_s, 2), "rss_after_setup": rss_setup,
                  "peak_rss": status("VmHWM"), "rss_after_steps": rss_steps, "step_s": [round(x, 3) for x in measured],
                  "step_cpu_s": [round(x, 3) for x in cpu[warmup:]],
                  "tokens_per_s": round(SEQ * len(measured) / sum(measured), 2), "losses": losses, **extra}))
"""


def run(code: str, args: list[str], env: dict[str, str] | None = None) -> dict[str, Any] | None:
    """Run a worker in a fresh Python; its last stdout line is its JSON (None, with the error logged, on failure)."""
    full_env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=full_env)
    if res.returncode != 0:
        log(f"worker failed ({res.returncode}):\n{res.stderr[-3000:]}")
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---- the measurements -------------------------------------------------------------------------------------------


def measure_load(folder: Path, tiny: Path, threads: int) -> list[dict[str, Any]]:
    out = []
    for mode in ("bf16", "int8", "int4"):
        r = run(LOAD_WORKER, [str(folder), str(tiny), mode, str(threads)])
        if r is not None:
            log(f"  load {mode}: peak {r['peak_vs_loaded']}x of {r['loaded_bytes'] / GB:.2f} GB in {r['seconds']} s")
            out.append(r)
    return out


def measure_train(folder: Path, a: argparse.Namespace) -> dict[str, Any]:
    """QLoRA training per engine; `nomoat-untuned` is nomoat with `NOMOAT_MALLOC_TUNING=0` (glibc's defaults),
    `nomoat-checkpointed` nomoat with activation checkpointing."""
    engines = ["nomoat"] + ([] if a.no_peft else ["peft"]) + (["nomoat-untuned"] if a.malloc_check else [])
    engines += ["nomoat-checkpointed"] if a.checkpointing_check else []
    out: dict[str, Any] = {}
    for engine in engines:
        if engine == "peft" and not _has("peft"):
            out[engine] = {"absent": "peft is not installed (pip install -e .[bench])"}
            continue
        env = {"NOMOAT_MALLOC_TUNING": "0"} if engine == "nomoat-untuned" else None
        out[engine] = run(TRAIN_WORKER, [engine, str(folder), str(a.steps), str(a.warmup), str(a.threads)], env)
        r = out[engine]
        if r is not None:
            log(f"  {engine}: {r['tokens_per_s']} tok/s, peak RSS {r['peak_rss'] / GB:.2f} GB, after the last step "
                f"{r['rss_after_steps'][-1] / GB:.2f} GB")
    return out


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def extrapolate(small: dict[str, Any], big: dict[str, Any], n_small: int, n_big: int, n: int) -> dict[str, Any]:
    """Peak RSS and seconds per step at `n` layers, linear in the layer count through two measured cuts."""
    per = lambda key: (big[key] - small[key]) / (n_big - n_small)  # noqa: E731
    small_step = sum(small["step_s"]) / len(small["step_s"])
    big_step = sum(big["step_s"]) / len(big["step_s"])
    step = small_step + (big_step - small_step) / (n_big - n_small) * (n - n_small)
    return {"layers": n, "peak_rss": int(small["peak_rss"] + per("peak_rss") * (n - n_small)),
            "tokens_per_s": round(SEQ / step, 2), "extrapolated_from_layers": [n_small, n_big]}  # fmt: skip


DECODE_CTX, PREFILL = 2048 + 64, 512

DECODE_WORKER = STATUS + r"""
import json, resource, sys, time, torch
cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])  # user + system seconds, all threads
engine, path, new, prefill, ctx, threads = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
torch.set_num_threads(threads)
g = torch.Generator().manual_seed(0)
prompt = torch.randint(3, 1000, (32,), generator=g).tolist()
long_prompt = torch.randint(3, 1000, (prefill,), generator=g).tolist()
if engine == "nomoat":
    from nomoat.generate.engine import Engine
    from nomoat.generate.sampling import SamplingParams
    from nomoat.models.checkpoint import load_model

    class Tok:  # what the engine needs of a tokenizer, for token ids only
        eos_token_ids = []

        def stream_decoder(self, skip_special_tokens=False):
            class D:
                def add(self, t): return ""
                def flush(self): return ""
            return D()

    base = status("VmRSS")
    model = load_model(path, "bfloat16", "cpu")
    loaded = tensor_bytes(model)
    eng = Engine(model, Tok(), max_running=1, max_seq_len=ctx, prefix_cache_bytes=0)
    kv = sum(t.numel() * t.element_size() for t in eng.cache.k + eng.cache.v)
    greedy = lambda n: SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)
    eng.generate(prompt, greedy(8))  # warm-up
    t = time.perf_counter()
    eng.generate(long_prompt, greedy(1))
    prefill_tok_s = prefill / (time.perf_counter() - t)
    reset_peak()
    c = cpu()
    out = eng.generate(prompt, greedy(new))
    c = cpu() - c
    peak = status("VmHWM") - base
    res = {"decode_tok_s": out.decode_tokens_per_s, "prefill_tok_s": prefill_tok_s, "loaded_bytes": loaded,
           "decode_cpu_s_per_token": c / new,
           "kv_cache_bytes": kv, "rss_base": base, "decode_peak_rss_growth": peak,
           "decode_peak_rss_vs_model_plus_kv": round(peak / (loaded + kv), 3),
           "stack_steps": eng.decode.stack_steps, "dtype": str(model.dtype)}
else:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=ctx, n_batch=512, verbose=False)
    llm.eval(prompt[:8])  # warm-up
    llm.reset()
    t = time.perf_counter()
    llm.eval(long_prompt)
    prefill_tok_s = prefill / (time.perf_counter() - t)
    llm.reset()
    llm.eval(prompt)
    t, c = time.perf_counter(), cpu()
    for _ in range(new):  # greedy by argmax over its logits, as nomoat's run
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    res = {"decode_tok_s": new / (time.perf_counter() - t), "prefill_tok_s": prefill_tok_s,
           "decode_cpu_s_per_token": (cpu() - c) / new,
           "peak_rss": status("VmHWM")}
print(json.dumps({"engine": engine, **res}))
"""


def _llamacpp_gguf(folder: Path, outtype: str) -> tuple[Path | None, str]:
    """`folder` as a GGUF of `outtype` for the llama.cpp peer (cached beside the folder), and what wrote it: llama.cpp's
    converter, or nomoat's exporter where the converter cannot run (`llamacpp_converter.make_gguf`); (None, why)
    where llama-cpp-python is not installed."""
    if not _has("llama_cpp"):
        return None, "absent: llama-cpp-python is not installed (pip install -e .[bench])"
    sys.path.insert(0, str(HERE))
    from llamacpp_converter import make_gguf

    out = folder.with_name(f"{folder.name}-{outtype}.gguf")
    source = folder.with_name(f"{out.name}.source")
    if not out.is_file() or out.stat().st_mtime < (folder / "stamp.json").stat().st_mtime or not source.is_file():
        source.write_text(make_gguf(folder, out, outtype))
    return out, source.read_text()


def decode_vs_llamacpp(folder: Path, shape: str, a: argparse.Namespace) -> dict[str, Any]:
    """Decode and 512-token prefill tokens/s of nomoat bf16 against llama.cpp f16 on the same weights, interleaved
    in fresh processes (best of `--decode-rounds` each), and nomoat's peak RSS while decoding (module docstring).

    Returns `{"bf16_vs_f16": x, "prefill_512_vs_llamacpp": x, "peak_rss_vs_model_plus_kv": x, "results":
    [...]}`; `main` turns the ratios into `decode_*` entries of the JSON.
    """
    gguf, source = _llamacpp_gguf(folder, "f16")
    new = a.decode_tokens or (128 if a.quick else 2048)
    runs: dict[str, list[dict[str, Any]]] = {"nomoat": [], "llama.cpp-f16": [], "llama.cpp-f16-passive": []}
    for i in range(a.decode_rounds):
        for name in runs:
            if name == "nomoat":
                r = run(DECODE_WORKER, ["nomoat", str(folder), str(new), str(PREFILL), str(DECODE_CTX), str(a.threads)])
            elif gguf is not None:
                env = {"OMP_WAIT_POLICY": "PASSIVE" if name.endswith("-passive") else "ACTIVE"}
                r = run(DECODE_WORKER, ["llamacpp", str(gguf), str(new), str(PREFILL), str(DECODE_CTX),
                                        str(a.threads)], env)  # fmt: skip
            else:
                continue
            if r is not None:
                log(f"  round {i + 1} {name}: decode {r['decode_tok_s']:.2f} tok/s, prefill {r['prefill_tok_s']:.1f}")
                runs[name].append(r)
    best = {name: {k: max((r[k] for r in rs), default=None) for k in ("decode_tok_s", "prefill_tok_s")}
            for name, rs in runs.items()}  # fmt: skip
    ours = best["nomoat"]
    peer = {k: max((best[n][k] for n in best if n != "nomoat" and best[n][k]), default=None) for k in ours}
    out: dict[str, Any] = {"new_tokens": new, "prefill_tokens": PREFILL, "kv_positions": DECODE_CTX,
                           "llama_cpp_gguf": source, "best": best, "results": runs}  # fmt: skip
    out["bf16_vs_f16"] = ratio(ours["decode_tok_s"], peer["decode_tok_s"])
    out["prefill_512_vs_llamacpp"] = ratio(ours["prefill_tok_s"], peer["prefill_tok_s"])
    if runs["nomoat"]:
        out["peak_rss_vs_model_plus_kv"] = max(r["decode_peak_rss_vs_model_plus_kv"] for r in runs["nomoat"])
    return out


def qlora_entry(shape: str, folder_for: Any, a: argparse.Namespace) -> dict[str, Any]:
    """QLoRA measurements of one shape; 3B and 8B through two cuts and a per-layer extrapolation."""
    spec = SHAPES[shape]
    if shape not in QLORA_CUTS or a.layers:
        n = a.layers or spec["layers"]
        return {"layers": n, "engines": measure_train(folder_for(shape, n), a)}
    lo_n, hi_n = QLORA_CUTS[shape]
    cuts = {n: measure_train(folder_for(shape, n), a) for n in (lo_n, hi_n)}
    entry: dict[str, Any] = {"layers": spec["layers"], "cuts": cuts, "engines": {}}
    for engine in cuts[lo_n]:
        lo, hi = cuts[lo_n].get(engine), cuts[hi_n].get(engine)
        if lo and hi and "step_s" in lo and "step_s" in hi:
            entry["engines"][engine] = {**extrapolate(lo, hi, lo_n, hi_n, spec["layers"]), "engine": engine}
    return entry


def qlora_memory_ratios(shape: str, entry: dict[str, Any]) -> dict[str, float]:
    """Steady-state RSS (after the last step) of the measured runs, with and without the allocator tuning."""
    out: dict[str, float] = {}
    for engine, key in (("nomoat", "malloc_tuned"), ("nomoat-untuned", "malloc_untuned"),
                        ("nomoat-checkpointed", "checkpointed")):  # fmt: skip
        r = entry["engines"].get(engine) or {}
        if r.get("rss_after_steps"):
            out[f"{shape}_qlora_steady_rss_gb_{key}"] = round(r["rss_after_steps"][-1] / GB, 2)
        if r.get("peak_rss"):
            out[f"{shape}_qlora_peak_rss_gb_{key}"] = round(r["peak_rss"] / GB, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the 1B shape only")
    ap.add_argument("--shapes", default="1b,3b,8b", help="comma-separated shapes among 1b, 3b, 8b")
    ap.add_argument("--layers", type=int, default=0, help="cut every shape to this many layers (a reduced run)")
    ap.add_argument("--steps", type=int, default=4, help="measured training steps")
    ap.add_argument("--warmup", type=int, default=2, help="training steps before measuring")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-peft", action="store_true", help="skip the transformers + PEFT peer")
    ap.add_argument("--malloc-check", action="store_true",
                    help="also train nomoat with NOMOAT_MALLOC_TUNING=0 (the allocator's effect on memory)")
    ap.add_argument("--checkpointing-check", action="store_true",
                    help="also train nomoat with activation checkpointing (memory against recomputation)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: load, qlora, decode")
    ap.add_argument("--decode-tokens", type=int, default=0, help="new tokens per decode run (0: 2048, quick 128)")
    ap.add_argument("--decode-rounds", type=int, default=2, help="interleaved nomoat / llama.cpp decode rounds")
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "nomoat-bench" / "sizes")
    a = ap.parse_args()
    shapes = ["1b"] if a.quick else [s.strip() for s in a.shapes.split(",") if s.strip()]
    skip = set(a.skip.split(","))
    folder_for = lambda shape, n: write_model(a.cache_dir / f"{shape}-L{n}", SHAPES[shape], n)  # noqa: E731
    tiny = write_model(a.cache_dir / "tiny", dict(hidden=128, inter=256, heads=4, kv=2, vocab=1000, tied=True), 1)
    results: list[dict[str, Any]] = []
    ratios: dict[str, float | None] = {}
    targets: dict[str, bool] = {}
    for shape in shapes:
        # The full 8B does not fit this machine in bf16: its load is measured on the larger cut.
        n = a.layers or (CUT_8B[1] if shape == "8b" else SHAPES[shape]["layers"])
        if "load" not in skip:
            log(f"{shape} ({n} layers): load")
            loads = measure_load(folder_for(shape, n), tiny, a.threads)
            results.append({"shape": shape, "layers": n, "part": "load", "results": loads})
            for r in loads:
                ratios[f"{shape}_load_{r['mode']}_peak_rss_vs_loaded_size"] = r["peak_vs_loaded"]
                targets[f"{shape}_load_{r['mode']}_peak_at_most_1.15x"] = r["peak_vs_loaded"] <= 1.15
        if "qlora" not in skip:
            log(f"{shape}: QLoRA nf4 r{RANK}, seq {SEQ}, batch 1")
            entry = qlora_entry(shape, folder_for, a)
            results.append({"shape": shape, "part": "qlora", **entry})
            ours, peer = entry["engines"].get("nomoat"), entry["engines"].get("peft")
            ratios.update(qlora_memory_ratios(shape, entry))
            if ours:
                ratios[f"{shape}_qlora_peak_rss_gb"] = round(ours["peak_rss"] / GB, 2)
                if not a.layers:
                    targets[f"{shape}_qlora_peak_rss_at_most_{QLORA_TARGET_GB[shape]}gb"] = (
                        ours["peak_rss"] / GB <= QLORA_TARGET_GB[shape])
            if ours and peer and "tokens_per_s" in peer:
                ratios[f"{shape}_qlora_train_tokens_per_s_vs_peft_bf16"] = ratio(ours["tokens_per_s"],
                                                                                  peer["tokens_per_s"])
                ratios[f"{shape}_qlora_peak_rss_vs_peft_bf16"] = ratio(ours["peak_rss"], peer["peak_rss"])
        if "decode" not in skip:
            dec = decode_vs_llamacpp(folder_for(shape, n), shape, a)
            results.append({"shape": shape, "part": "decode", **dec})
            ends = ("_vs_f16", "_vs_q8_0", "_vs_q4_0", "_vs_llamacpp", "_vs_model_plus_kv")
            ratios.update({f"{shape}_decode_{k}": v for k, v in dec.items() if k.endswith(ends)})
            for key, goal, higher in (("bf16_vs_f16", 1.0, True), ("prefill_512_vs_llamacpp", 0.8, True),
                                      ("peak_rss_vs_model_plus_kv", 1.3, False)):  # fmt: skip
                if dec.get(key) is not None and not a.layers:
                    targets[f"{shape}_decode_{key}_{'at_least' if higher else 'at_most'}_{goal}x"] = (
                        dec[key] >= goal if higher else dec[key] <= goal)
    if "1b_qlora_train_tokens_per_s_vs_peft_bf16" in ratios and not a.layers:
        targets["1b_qlora_tokens_per_s_at_least_2x_peft"] = (ratios["1b_qlora_train_tokens_per_s_vs_peft_bf16"]
                                                              or 0) >= 2.0
    print(json.dumps({"benchmark": "sizes", "machine": describe(a.threads),
                      "reduced": f"every shape cut to {a.layers} layers" if a.layers else None,
                      "results": results, "ratios": ratios, "targets": targets}))


if __name__ == "__main__":
    main()
