"""Weight-only quantization: decode speed, weight bytes and perplexity of fp32, int8 and int4, in one run.

1. Decode: a random llama shaped like SmolLM2-135M (vocab 49152, hidden 576, intermediate 1536, 30 layers, 9/3 heads,
   tied) is built with transformers, saved, and loaded by nomoat in fp32, then quantized to int8 and to int4.
   Each decodes at batch 1 with the KV cache: a 32-token prefill, then single-token steps (greedy); tokens/s is one
   over the median step time, and the run-to-run spread is reported (this 2-core VM is noisy).
2. Linear stack: the 210 matrices of those 30 layers timed alone at one token (fp32 `F.linear`, the quantized
   modules, and ATen's `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` with fp32 activations), the evidence
   for the kernel choices in `nomoat/models/quantize.py`.
3. Perplexity: random weights have no meaningful perplexity, so a tiny character-level llama is trained for 200
   steps on the fixed text below (`train_tiny_lm`, shared with tests/inference/test_quantize.py) and evaluated on
   held-out text in fp32, int8 and int4.

Threads: 2 (`torch.set_num_threads(2)`). `OMP_WAIT_POLICY=PASSIVE` is set before torch loads unless already set: with
OpenMP's default spinning, ops with little work per thread (attention at decode) stall for milliseconds on this VM.
Prints one JSON object as its last line.

    python benchmarks/bench_quantize.py [--quick]
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # before torch loads OpenMP; not when tests/inference/test_quantize.py imports the recipe
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from nomoat.config.model import ModelConfig  # noqa: E402
from nomoat.models.quantize import QuantizedLinear, quantize_model, weight_bytes  # noqa: E402
from nomoat.models.transformer import Transformer  # noqa: E402

# ---- a tiny model with real structure: character-level llama on a fixed text -----------------------------------

TEXT = """\
The river town woke early. Before the sun cleared the hills, the baker had lit his ovens and the ferryman had
untied his boat. The market opened at seven, when the first carts rolled over the old stone bridge. Farmers brought
apples, pears and onions; the fishmonger brought trout from the cold upper river; the cheesemaker brought round
wheels wrapped in cloth. People came to buy bread, to trade news, and to complain about the weather, which was
always too wet in spring and too dry in summer.

On market days the square was loud. Children ran between the stalls, dogs waited by the butcher, and the old women
sat on the steps of the church and watched everything. The mayor walked from one end of the square to the other,
shaking hands and promising to repair the bridge. He had promised the same thing every year for ten years, and the
bridge had not been repaired, but everyone still shook his hand.

In the afternoon the square grew quiet. The farmers counted their coins and loaded their carts. The baker sold the
last loaves at half price. The ferryman carried tired travellers across the river, one boat at a time, and told
each of them the same story about the great flood, when the water rose over the bridge and the whole town moved
up the hill for a week. Nobody believed that the water had really reached the church, but nobody said so.

In the evening the lamps were lit along the river. The inn filled with people who wanted soup, bread and a warm
fire. The innkeeper knew every guest by name and every horse by its colour. He poured cider for the farmers, tea
for the teachers, and water for the mayor, who said that he never drank on market days. When the bells rang ten,
the inn emptied, the lamps went out one by one, and the town slept until the baker lit his ovens again.

In winter the river froze near the banks and the ferry stopped. The children skated on the shallow water by the
mill, and the miller shouted at them to keep away from the wheel. The market moved into the long hall beside the
church, where it was dark and smelled of wet wool and apples. The farmers sold potatoes, cabbages and jars of
honey, and the baker sold spiced bread that he made only in the cold months. People walked home early, before
the paths grew icy, and sat by their fires telling the old stories again.

In spring the snow melted and the river rose. The ferryman painted his boat, the farmers planted their fields,
and the mayor made a speech about the bridge. The swallows came back to the barns, the cherry trees flowered in
the churchyard, and the market filled again with carts, voices and the smell of fresh bread.
"""
HELD_OUT = """\
In summer the town was slow and warm. The farmers brought strawberries and new potatoes to the market, and the
baker opened his doors to let the heat out of the bakery. The children swam in the river below the mill, and the
ferryman slept in his boat in the afternoon. In the evening the people sat outside the inn and talked about the
harvest, the weather and the bridge, which the mayor had promised to repair before the autumn rains.
"""
VOCAB = 64  # printable characters present in the texts, padded to a multiple of the int4 group size


def char_vocab() -> dict[str, int]:
    """Character -> id for TEXT and HELD_OUT (id 0 is reserved for unknown characters)."""
    chars = sorted(set(TEXT) | set(HELD_OUT))
    assert len(chars) < VOCAB, len(chars)
    return {c: i + 1 for i, c in enumerate(chars)}


def encode(text: str) -> torch.Tensor:
    """Ids (1-D int64) of a text under `char_vocab`."""
    vocab = char_vocab()
    return torch.tensor([vocab.get(c, 0) for c in text], dtype=torch.long)


def tiny_config() -> ModelConfig:
    """The tiny llama: 64 chars, hidden 128, 2 layers of 4 query / 2 kv heads, MLP 256, untied head."""
    return ModelConfig(
        family="llama", vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
        num_kv_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope={"full_attention": {"rope_type": "default", "rope_theta": 10000.0}},
    )  # fmt: skip


def train_tiny_lm(steps: int = 200, seq: int = 32, batch: int = 16, seed: int = 0) -> Transformer:
    """Train the tiny llama on TEXT (next-character prediction, AdamW); deterministic for a given seed."""
    torch.manual_seed(seed)
    model = Transformer(tiny_config())
    model.init_weights(std=0.02, seed=seed)
    data = encode(TEXT)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        window = torch.stack([data[s : s + seq + 1] for s in starts.tolist()])
        logits = model(window[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), window[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def perplexity(model: Transformer, ids: torch.Tensor, window: int = 128) -> float:
    """exp(mean next-token NLL) over consecutive non-overlapping windows of `ids`."""
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window + 1]
        if len(chunk) < 2:
            break
        logits = model(chunk[None, :-1]).float()
        total += F.cross_entropy(logits[0], chunk[1:], reduction="sum").item()
        count += len(chunk) - 1
    return math.exp(total / count)


def perplexities(steps: int = 200) -> dict[str, float]:
    """Held-out perplexity of the trained tiny model in fp32, int8 and int4 (group 32)."""
    base = train_tiny_lm(steps)
    ids = encode(HELD_OUT)
    out = {"fp32": perplexity(base, ids), "train_fp32": perplexity(base, encode(TEXT[:1500]))}
    for mode in ("int8", "int4"):
        out[mode] = perplexity(quantize_model(copy.deepcopy(base), mode), ids)
    return out


# ---- decode speed on a SmolLM2-135M-shaped model -----------------------------------------------------------------


def make_smol(path: Path) -> None:
    """A random SmolLM2-135M-shaped llama (tied, 9/3 heads) saved in fp32 by transformers."""
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=8192,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)


@torch.inference_mode()
def decode_run(model: Transformer, prompt_len: int = 32, steps: int = 128) -> dict[str, float]:
    """One batch-1 greedy decode with the KV cache; returns prefill ms and per-step statistics."""
    from nomoat.models.kv_cache import KVCache

    cache = KVCache(model.config, 1, 256, torch.float32, "cpu")
    ids = torch.arange(3, 3 + prompt_len)[None]
    t0 = time.perf_counter()
    logits = model(ids, position_ids=torch.arange(prompt_len)[None], cache=cache)
    prefill = time.perf_counter() - t0
    tok = logits[:, -1].argmax(-1, keepdim=True)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        logits = model(tok, position_ids=torch.tensor([[prompt_len + i]]), cache=cache)
        tok = logits[:, -1].argmax(-1, keepdim=True)
        times.append(time.perf_counter() - t0)
    return {"prefill_ms": prefill * 1e3, "tok_s_median": 1 / statistics.median(times), "tok_s_mean": steps / sum(times)}


def decode_results(path: Path, runs: int, steps: int) -> list[dict]:
    """Decode tokens/s and weight bytes of fp32, int8 and int4 versions of the saved model."""
    from nomoat.models.checkpoint import load_model

    out = []
    for mode in ("fp32", "int8", "int4"):
        model = load_model(path, dtype=torch.float32, device="cpu")
        if mode != "fp32":
            quantize_model(model, mode)
        decode_run(model, steps=8)  # warm-up: scratch buffers, index caches, allocator
        per_run = [decode_run(model, steps=steps) for _ in range(runs)]
        speeds = [r["tok_s_median"] for r in per_run]
        out.append({
            "what": "decode", "model": "SmolLM2-135M shape, random weights", "mode": mode, "batch": 1,
            "prompt_tokens": 32, "decode_steps": steps, "runs": runs,
            "decode_tok_s": statistics.median(speeds), "decode_tok_s_runs": [round(s, 2) for s in speeds],
            "prefill_ms": statistics.median(r["prefill_ms"] for r in per_run),
            "weight_bytes": weight_bytes(model),
        })  # fmt: skip
        del model
    return out


@torch.inference_mode()
def linear_stack(repeats: int) -> list[dict]:
    """The 30 layers' 210 matrices at one token: ms per pass for each kernel (cold weights, as in decode)."""
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    torch.manual_seed(0)
    linears = [torch.nn.Linear(k, n, bias=False) for _ in range(30) for n, k in shapes]
    xs = {576: torch.randn(1, 576), 1536: torch.randn(1, 1536)}

    def timed(fn) -> float:
        fn()
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best * 1e3

    rows = {"fp32 F.linear": timed(lambda: [lin(xs[lin.in_features]) for lin in linears])}
    for mode in ("int8", "int4"):
        qs = [QuantizedLinear.from_linear(lin, mode) for lin in linears]
        rows[f"nomoat {mode} (fbgemm bag)"] = timed(lambda qs=qs: [q(xs[q.in_features]) for q in qs])
    aten8 = [(lin.weight.abs().amax(1) / 127,) for lin in linears]
    aten8 = [(torch.round(lin.weight / s[:, None]).to(torch.int8), s) for lin, (s,) in zip(linears, aten8)]
    rows["aten _weight_int8pack_mm fp32"] = timed(
        lambda: [torch.ops.aten._weight_int8pack_mm(xs[q.shape[1]], q, s) for q, s in aten8]
    )
    packed4 = []
    for lin in linears:
        n, k = lin.weight.shape
        g = lin.weight.view(n, k // 32, 32)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        s = ((hi - lo) / 15).clamp(min=1e-8)
        q = torch.round((g - lo) / s).clamp(0, 15).to(torch.int32).view(n, k)
        sz = torch.stack([s.view(n, -1), (lo + 8 * s).view(n, -1)], -1).transpose(0, 1).contiguous()
        packed4.append((torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), sz, k))
    rows["aten _weight_int4pack_mm_for_cpu fp32"] = timed(
        lambda: [torch.ops.aten._weight_int4pack_mm_for_cpu(xs[k], p, 32, sz) for p, sz, k in packed4]
    )
    base = rows["fp32 F.linear"]
    return [
        {"what": "linear_stack_1_token", "kernel": name, "ms": round(ms, 2), "speed_vs_fp32": round(base / ms, 2)}
        for name, ms in rows.items()
    ]


def machine() -> dict:
    """What the numbers were measured on."""
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "python": platform.python_version(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer decode steps and runs")
    args = parser.parse_args()
    torch.set_num_threads(2)
    runs, steps, repeats = (3, 64, 2) if args.quick else (5, 128, 5)

    ppl = perplexities()
    results: list[dict] = [
        {"what": "perplexity", "model": "tiny char llama, 200 training steps", "mode": mode, "perplexity": ppl[mode],
         "rel_change_vs_fp32": ppl[mode] / ppl["fp32"] - 1}
        for mode in ("fp32", "int8", "int4")
    ]  # fmt: skip
    results += linear_stack(repeats)
    with tempfile.TemporaryDirectory() as tmp:
        make_smol(Path(tmp))
        decode = decode_results(Path(tmp), runs, steps)
    results += decode
    by_mode = {r["mode"]: r for r in decode}
    fp32 = by_mode["fp32"]
    ratios = {
        "int8_decode_speed_vs_fp32": by_mode["int8"]["decode_tok_s"] / fp32["decode_tok_s"],
        "int4_decode_speed_vs_fp32": by_mode["int4"]["decode_tok_s"] / fp32["decode_tok_s"],
        "int8_weight_bytes_vs_fp32": by_mode["int8"]["weight_bytes"] / fp32["weight_bytes"],
        "int4_weight_bytes_vs_fp32": by_mode["int4"]["weight_bytes"] / fp32["weight_bytes"],
        "int8_perplexity_rel_change": ppl["int8"] / ppl["fp32"] - 1,
        "int4_perplexity_rel_change": ppl["int4"] / ppl["fp32"] - 1,
    }
    print(json.dumps({
        "benchmark": "quantize", "machine": machine(), "quick": args.quick, "results": results,
        "ratios": {k: round(v, 6) for k, v in ratios.items()},
    }))  # fmt: skip


if __name__ == "__main__":
    main()
