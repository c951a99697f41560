"""Loading a checkpoint: peak resident memory and time, nomoat against transformers, in one run.

Each load runs in a fresh subprocess that samples its own RSS every millisecond; "rss_growth" is the peak RSS during
the load minus the RSS just before it (after importing torch and the library, and torch's one-time meta-device
setup that both loaders need), compared to the model's size in the target dtype. Prints one JSON object as its
last line (see DESIGN.md, Benchmarks).

    python benchmarks/bench_load.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, threading, time, psutil, torch
torch.set_num_threads(2)
which, path, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
if which == "nomoat":
    from nomoat.models.checkpoint import load_model
    load = lambda: load_model(path, dtype=dtype, device="cpu")
else:
    import transformers
    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
# Both loaders build the model on the meta device; torch imports its meta-kernel machinery (~70 MB of Python
# modules) on the first meta op. That is a one-time process cost, not a cost of the load: pay it before measuring.
torch.empty(8, 8, device="meta").normal_()
proc = psutil.Process()
before = proc.memory_info().rss
peak = [before]
done = [False]
def watch():
    while not done[0]:
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.001)
t = threading.Thread(target=watch, daemon=True); t.start()
t0 = time.perf_counter()
model = load()
seconds = time.perf_counter() - t0
done[0] = True; t.join()
peak[0] = max(peak[0], proc.memory_info().rss)
# transformers maps same-dtype safetensors lazily: its pages are read on first use. One forward makes the two
# comparable as "memory held by a model ready to run".
ids = torch.arange(8)[None]
with torch.no_grad():
    model(ids) if which == "nomoat" else model(input_ids=ids)
after_forward = proc.memory_info().rss
size = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
print(json.dumps({"peer": which, "dtype": sys.argv[3], "seconds": seconds, "rss_before": before,
                  "rss_peak": peak[0], "rss_growth": peak[0] - before, "model_bytes": size,
                  "growth_vs_model": (peak[0] - before) / size,
                  "rss_growth_after_forward": after_forward - before}))
"""


def make_model(path: Path, layers: int) -> None:
    """A random SmolLM2-135M-shaped llama (tied, 9/3 heads) saved in fp32 by transformers."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
        num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=8192,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)


def run(which: str, path: Path, dtype: str) -> dict:
    """Load once in a fresh process; return its measurements."""
    out = subprocess.run([sys.executable, "-c", CHILD, which, str(path), dtype], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 10-layer model instead of SmolLM2's 30 layers")
    args = ap.parse_args()
    try:
        import transformers  # noqa: F401

        peers = ["nomoat", "transformers"]
    except ImportError:
        peers = ["nomoat"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        make_model(path, 10 if args.quick else 30)
        for dtype in ("float32", "bfloat16"):
            for which in peers:
                r = run(which, path, dtype)
                results.append(r)
                print(f"{which:12s} {dtype:9s} load {r['seconds']:.2f}s  RSS growth {r['rss_growth'] / 2**20:.0f} MiB"
                      f" = {r['growth_vs_model']:.2f}x model ({r['model_bytes'] / 2**20:.0f} MiB);"
                      f" after one forward {r['rss_growth_after_forward'] / 2**20:.0f} MiB", file=sys.stderr)
    ratios = {}
    for dtype in ("float32", "bfloat16"):
        ours = next(r for r in results if r["peer"] == "nomoat" and r["dtype"] == dtype)
        ratios[f"load_rss_growth_vs_model_size_{dtype}"] = round(ours["growth_vs_model"], 3)
        peer = next((r for r in results if r["peer"] == "transformers" and r["dtype"] == dtype), None)
        if peer:
            ratios[f"load_peak_rss_growth_vs_transformers_{dtype}"] = round(ours["rss_growth"] / peer["rss_growth"], 3)
            ratios[f"load_speed_vs_transformers_{dtype}"] = round(peer["seconds"] / ours["seconds"], 3)
            ratios[f"ready_rss_vs_transformers_{dtype}"] = round(
                ours["rss_growth_after_forward"] / peer["rss_growth_after_forward"], 3
            )
    machine = f"{platform.machine()} {os.cpu_count()} cores, torch threads 2"
    print(json.dumps({"benchmark": "load", "machine": machine, "results": results, "ratios": ratios,
                      "peers_absent": [] if len(peers) == 2 else ["transformers"]}))


if __name__ == "__main__":
    main()
