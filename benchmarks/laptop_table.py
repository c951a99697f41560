"""The "what a 16 GB laptop can do" tables of docs/laptop.md, computed from the models' shapes.

Llama-3.2-1B, Llama-3.2-3B and Llama-3.1-8B (their config shapes, shared with benchmarks/bench_sizes.py). Every
number is derived here, not typed:

- weights: the bytes nomoat's own memory check counts for each format (`nomoat.models.load_plan.estimate_bytes`
  with the int8 / int4 quantizers and QLoRA's NF4 quantizer): linear layers in the format, the embedding (and a
  tied head's quantized copy) as nomoat keeps them;
- KV cache: `load_plan.kv_cache_bytes` (2 x layers x kv heads x head dim per token) in the activation dtype;
- runtime: `RUNTIME_GB` for Python, PyTorch, the tokenizer and the engine's work buffers;
- chat: one conversation of `CHAT_CONTEXT` tokens; serve: `SERVE_ROWS` requests of `SERVE_CONTEXT` tokens at once;
- fine-tune: LoRA r16 on all seven linear layers, sequence 512, batch 1, AdamW (fp32 adapter weights, gradients and
  two moments: 16 bytes per adapter parameter), activations kept for backward (no recomputation) per layer
  `T x (4 hidden + q + 2 kv + 3 intermediate)` elements in the compute dtype, plus fp32 logits and their gradient.

A configuration fits when its total is within `FREE_GB`, what a 16 GB laptop leaves free with an OS, a desktop and
a browser running. Measured cells come from a bench_sizes JSON (`--measured`): the peak RSS of loading each format
and of QLoRA training (rest bf16, as bench_sizes runs it); cells bench_sizes does not measure read "-".

    python benchmarks/laptop_table.py                                    # print the tables (markdown)
    python benchmarks/laptop_table.py --measured sizes.json --quality quality.json --write docs/laptop.md

`--quality` adds the perplexity table of a benchmarks/bench_quality.py run (between the doc's quality markers).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sizes import SHAPES  # noqa: E402

from nomoat.config.model import ModelConfig  # noqa: E402
from nomoat.lora.nf4 import NF4Quantizer  # noqa: E402
from nomoat.models.load_plan import IntQuantizer, LinearQuantizer, estimate_bytes, kv_cache_bytes  # noqa: E402

GB = 1e9
FREE_GB = 11.0
RUNTIME_GB = 0.6
CHAT_CONTEXT = 8192
SERVE_ROWS, SERVE_CONTEXT = 8, 4096
LORA_RANK, TRAIN_SEQ = 16, 512
MODELS = {"Llama-3.2-1B": "1b", "Llama-3.2-3B": "3b", "Llama-3.1-8B": "8b"}
# Inference formats: (name, dtype of what is not quantized and of activations / KV cache, quantizer).
FORMATS: list[tuple[str, torch.dtype, LinearQuantizer | None]] = [
    ("fp32", torch.float32, None),
    ("bf16", torch.bfloat16, None),
    ("int8", torch.bfloat16, IntQuantizer("int8")),
    ("int4", torch.bfloat16, IntQuantizer("int4")),
]
# Fine-tuning bases: (name, dtype of what is not quantized, compute dtype, quantizer).
TRAIN_BASES: list[tuple[str, torch.dtype, torch.dtype, LinearQuantizer | None]] = [
    ("LoRA, bf16 base", torch.bfloat16, torch.bfloat16, None),
    ("QLoRA, nf4 base, rest fp32", torch.float32, torch.bfloat16, NF4Quantizer()),
    ("QLoRA, nf4 base, rest bf16", torch.bfloat16, torch.bfloat16, NF4Quantizer()),
]
TRAIN_MODE = {"LoRA, bf16 base": None, "QLoRA, nf4 base, rest fp32": None, "QLoRA, nf4 base, rest bf16": "qlora"}
PREFERENCE = ["bf16", "int8", "int4"]  # the first that fits is the recommendation (fp32 gains nothing in quality)
LOAD_MEASURED = {"bf16", "int8", "int4"}  # the formats bench_sizes loads
BEGIN, END = "<!-- laptop_table:begin -->", "<!-- laptop_table:end -->"
QUALITY_LABELS = {"nomoat_fp32": "nomoat fp32", "nomoat_int8": "nomoat int8", "nomoat_int4": "nomoat int4",
                  "llamacpp_f32": "llama.cpp F32", "llamacpp_q8_0": "llama.cpp q8_0", "llamacpp_q4_0": "llama.cpp q4_0",
                  "llamacpp_q4_0_pure": "llama.cpp q4_0 pure"}  # fmt: skip
QUALITY_BEGIN, QUALITY_END = "<!-- quality:begin -->", "<!-- quality:end -->"


def config(shape: dict[str, Any]) -> ModelConfig:
    return ModelConfig(family="llama", vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                       intermediate_size=shape["inter"], num_layers=shape["layers"], num_heads=shape["heads"],
                       num_kv_heads=shape["kv"], tie_word_embeddings=shape["tied"])  # fmt: skip


def tensor_shapes(cfg: ModelConfig) -> list[tuple[str, list[int]]]:
    """`(name, shape)` of every tensor of a Llama checkpoint with these sizes (Hugging Face names)."""
    h, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    out = [("model.embed_tokens.weight", [cfg.vocab_size, h]), ("model.norm.weight", [h])]
    for n in range(cfg.num_layers):
        p = f"model.layers.{n}."
        out += [(p + "self_attn.q_proj.weight", [q, h]), (p + "self_attn.k_proj.weight", [kv, h]),
                (p + "self_attn.v_proj.weight", [kv, h]), (p + "self_attn.o_proj.weight", [h, q]),
                (p + "mlp.gate_proj.weight", [i, h]), (p + "mlp.up_proj.weight", [i, h]),
                (p + "mlp.down_proj.weight", [h, i]), (p + "input_layernorm.weight", [h]),
                (p + "post_attention_layernorm.weight", [h])]  # fmt: skip
    if not cfg.tie_word_embeddings:
        out.append(("lm_head.weight", [cfg.vocab_size, h]))
    return out


def lora_params(cfg: ModelConfig, rank: int) -> int:
    """Adapter parameters of LoRA rank `rank` on q, k, v, o, gate, up and down: `rank x (in + out)` each."""
    h, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    per_layer = (h + q) * 2 + (h + kv) * 2 + (h + i) * 3
    return rank * per_layer * cfg.num_layers


def activation_bytes(cfg: ModelConfig, seq: int, dtype: torch.dtype) -> int:
    """Activations kept for the backward pass at batch 1 (no recomputation), plus fp32 logits and their gradient."""
    h, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    per_layer = seq * (4 * h + q + 2 * kv + 3 * i) * dtype.itemsize
    return per_layer * cfg.num_layers + 2 * seq * cfg.vocab_size * 4


def inference_rows() -> list[dict[str, Any]]:
    rows = []
    for model, key in MODELS.items():
        cfg = config(SHAPES[key])
        shapes = tensor_shapes(cfg)
        for fmt, dtype, quantizer in FORMATS:
            weights = estimate_bytes(shapes, dtype, quantizer, cfg.tie_word_embeddings)
            kv_1k = kv_cache_bytes(cfg, 1024, dtype)
            chat = weights + kv_cache_bytes(cfg, CHAT_CONTEXT, dtype) + RUNTIME_GB * GB
            serve = weights + kv_cache_bytes(cfg, SERVE_CONTEXT, dtype, SERVE_ROWS) + RUNTIME_GB * GB
            rows.append({"model": model, "shape": key, "format": fmt, "weights_gb": weights / GB,
                         "kv_per_1k_tokens_gb": kv_1k / GB, "chat_gb": chat / GB, "serve_gb": serve / GB})  # fmt: skip
    return rows


def train_rows() -> list[dict[str, Any]]:
    rows = []
    for model, key in MODELS.items():
        cfg = config(SHAPES[key])
        shapes = tensor_shapes(cfg)
        adapter = lora_params(cfg, LORA_RANK) * 16
        for name, dtype, compute, quantizer in TRAIN_BASES:
            base = estimate_bytes(shapes, dtype, quantizer, cfg.tie_word_embeddings)
            act = activation_bytes(cfg, TRAIN_SEQ, compute)
            total = base + adapter + act + RUNTIME_GB * GB
            rows.append({"model": model, "shape": key, "method": name, "base_gb": base / GB,
                         "adapter_and_optimizer_gb": adapter / GB, "activations_gb": act / GB,
                         "total_gb": total / GB})  # fmt: skip
    return rows


def measured_cells(path: Path | None) -> dict[tuple[str, str], float]:
    """`{(shape, "load_<mode>" | "qlora"): peak RSS in GB}` from a bench_sizes JSON (its last line), if given."""
    if path is None:
        return {}
    data = json.loads(path.read_text().strip().splitlines()[-1])
    out: dict[tuple[str, str], float] = {}
    for entry in data.get("results", []):
        shape = entry.get("shape")
        if entry.get("layers") != SHAPES.get(shape, {}).get("layers"):
            continue  # a model cut to fewer layers (`--layers`) is not the real size
        if entry.get("part") == "load":
            for r in entry.get("results", []):
                out[(shape, f"load_{r['mode']}")] = (r["rss_base"] + r["rss_growth_peak"]) / GB
        if entry.get("part") == "qlora" and "peak_rss" in entry.get("engines", {}).get("nomoat", {}):
            out[(shape, "qlora")] = entry["engines"]["nomoat"]["peak_rss"] / GB
    return out


def _gb(x: float) -> str:
    return f"{x:.1f}"


def _fits(x: float) -> str:
    return "yes" if x <= FREE_GB else "no"


def render(measured: dict[tuple[str, str], float]) -> str:
    inf, train = inference_rows(), train_rows()
    out = [f"### Summary: the best format that fits {FREE_GB:.0f} GB (computed)", "",
           "| model | chat | serve | fine-tune |", "|---|---|---|---|"]  # fmt: skip
    for model in MODELS:
        pick = {}
        for use in ("chat_gb", "serve_gb"):
            ok = [r["format"] for r in inf if r["model"] == model and r["format"] in PREFERENCE and
                  r[use] <= FREE_GB]  # fmt: skip
            best = min(ok, key=PREFERENCE.index) if ok else None
            total = next((r[use] for r in inf if r["model"] == model and r["format"] == best), 0.0)
            pick[use] = f"{best} ({_gb(total)} GB)" if best else "does not fit"
        ok_train = [r for r in train if r["model"] == model and r["total_gb"] <= FREE_GB]
        pick["train"] = f"{ok_train[0]['method']} ({_gb(ok_train[0]['total_gb'])} GB)" if ok_train else "does not fit"
        out.append(f"| {model} | {pick['chat_gb']} | {pick['serve_gb']} | {pick['train']} |")
    out += ["", f"### Chat and serve (chat: one {CHAT_CONTEXT}-token conversation; serve: {SERVE_ROWS} requests of "
            f"{SERVE_CONTEXT} tokens at once)", "",
            "| model | format | weights GB | KV cache GB per 1k tokens | chat GB | serve GB | fits chat / serve | "
            "measured: peak RSS loading, GB |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in inf:
        m = measured.get((r["shape"], f"load_{r['format']}"))
        cell = _gb(m) if m is not None else ("not measured (bench_sizes)" if r["format"] in LOAD_MEASURED else "-")
        out.append(f"| {r['model']} | {r['format']} | {_gb(r['weights_gb'])} | {r['kv_per_1k_tokens_gb']:.3f} | "
                   f"{_gb(r['chat_gb'])} | {_gb(r['serve_gb'])} | {_fits(r['chat_gb'])} / {_fits(r['serve_gb'])} | "
                   f"{cell} |")  # fmt: skip
    out += ["", f"### Fine-tune (LoRA r{LORA_RANK} on all linear layers, sequence {TRAIN_SEQ}, batch 1, AdamW)", "",
            "| model | method | base GB | adapter + optimizer GB | activations GB | total GB | fits | "
            "measured: peak RSS, GB |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in train:
        mode = TRAIN_MODE[r["method"]]
        m = measured.get((r["shape"], mode)) if mode else None
        cell = _gb(m) if m is not None else ("not measured (bench_sizes)" if mode else "-")
        out.append(
            f"| {r['model']} | {r['method']} | {_gb(r['base_gb'])} | {_gb(r['adapter_and_optimizer_gb'])} | "
            f"{_gb(r['activations_gb'])} | {_gb(r['total_gb'])} | {_fits(r['total_gb'])} | {cell} |"
        )
    return "\n".join(out) + "\n"


def render_quality(data: dict[str, Any]) -> str:
    """The perplexity table of a bench_quality JSON (its last line), with its ratios."""
    if data.get("skipped"):
        return f"Not measured: {data['skipped']}\n"
    out = [f"{data['text_tokens']} tokens of `{data['text']}`, windows of {data['window']} (stride {data['stride']}); "
           f"{data['machine']}.", "",
           "| engine, format | perplexity | increase over its full precision | KL divergence (nats/token) | "
           "top-1 agreement |", "|---|---|---|---|---|"]  # fmt: skip
    for r in data["results"]:
        inc = r.get("ppl_increase")
        kld, top1 = r.get("kld"), r.get("top1_agreement")
        out.append(f"| {QUALITY_LABELS.get(r['model'], r['model'])} | {r['perplexity']:.4f} | "
                   f"{'-' if inc is None else f'{100 * inc:+.2f}%'} | {'-' if kld is None else f'{kld:.5f}'} | "
                   f"{'-' if top1 is None else f'{100 * top1:.1f}%'} |")  # fmt: skip
    out += [
        "",
        "nomoat / llama.cpp (below 1: nomoat loses less; `fp32_ppl_vs_llamacpp_f32` near 1: both engines score "
        "the reference alike):",
        "",
    ]
    out += [f"- `{k}`: {v}" for k, v in data.get("ratios", {}).items()]
    return "\n".join(out) + "\n"


def write_between_markers(doc: Path, text: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace what lies between `begin` and `end` in `doc` by `text`."""
    content = doc.read_text()
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{begin}\n{text}{end}{tail}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measured", type=Path, help="a bench_sizes JSON output (its last line is read)")
    ap.add_argument("--quality", type=Path, help="a bench_quality JSON output: its perplexity table too")
    ap.add_argument("--write", type=Path, help=f"replace the part of this file between {BEGIN} and {END}")
    ap.add_argument("--json", action="store_true", help="print the computed rows as JSON instead")
    a = ap.parse_args()
    if a.json:
        print(json.dumps({"free_gb": FREE_GB, "runtime_gb": RUNTIME_GB, "inference": inference_rows(),
                          "fine_tune": train_rows()}))  # fmt: skip
        return
    text = render(measured_cells(a.measured))
    quality = render_quality(json.loads(a.quality.read_text().strip().splitlines()[-1])) if a.quality else None
    if a.write:
        write_between_markers(a.write, text)
        if quality is not None:
            write_between_markers(a.write, quality, QUALITY_BEGIN, QUALITY_END)
    else:
        print(text + (f"\n{quality}" if quality else ""), end="")


if __name__ == "__main__":
    main()
