"""Structured output cost: JSON-schema-constrained decoding against free decoding on the same engine.

Batch of 8 on SmolLM2-135M (the real GGUF from ../shared/real-models/smollm2, or --model PATH): tokens/s of 8
constrained rows (each with its own grammar state) against 8 free rows; time to first token with a schema never seen
(compile included) and with a cached one; the grammar mask's cost per token; constrained decoding with the engine's
fast-forward of grammar-forced tokens off, and the engine steps each variant took. The "peer" of each ratio is free
decoding on the same engine (higher is better for the tokens/s ratios). Variants alternate within each repeat and
the best repeat counts, so a busy machine slows all of them alike.

    python benchmarks/bench_structured.py [--quick] [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "items": {"type": "array", "minItems": 1, "maxItems": 40, "items": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 24}, "qty": {"type": "integer", "minimum": 0,
                                                                                "maximum": 999},
                           "kind": {"enum": ["fruit", "tool", "book", "other"]}, "ok": {"type": "boolean"}},
            "required": ["name", "qty", "kind", "ok"], "additionalProperties": False}},
    },
    "required": ["items"],
    "additionalProperties": False,
}  # fmt: skip
PROMPT = "List the things in a kitchen as JSON with name, qty, kind and ok for each item."


def _model_path(given: str | None) -> str:
    if given:
        return given
    script = Path(__file__).resolve().parents[2] / "shared" / "real-models" / "smollm2"
    if not script.exists():
        script = Path("/work/shared/real-models/smollm2")
    return subprocess.run([str(script)], capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]


def _run_batch(engine, ids, params, hooks) -> tuple[float, int, list, int]:
    """Wall seconds, tokens generated, completions and engine steps of one batch (stepped here, all rows at once)."""
    start = time.perf_counter()
    handles = [engine.submit(ids, params, logits_hook=h) for h in hooks]
    steps = 0
    while engine.step():
        steps += 1
    done = [h.result() for h in handles]
    return time.perf_counter() - start, sum(d.completion_tokens for d in done), done, steps


def main() -> None:
    """Run the benchmark and print one JSON line."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="Fewer tokens and repeats (a few minutes).")
    ap.add_argument("--model", default=None, help="A model folder or GGUF file (default: the real SmolLM2-135M).")
    args = ap.parse_args()
    import nomoat
    from nomoat.generate.constraints import Constraint, Grammars
    from nomoat.generate.engine import Engine
    from nomoat.generate.sampling import SamplingParams

    path = _model_path(args.model)
    model, tok = nomoat.load(path, dtype=torch.float32, device="cpu")
    engine = Engine(model, tok, max_running=8, max_seq_len=512, prefix_cache_bytes=0)  # a small cache: ~0.4 GB
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True)
    max_new, repeats = (48, 2) if args.quick else (128, 3)
    t0 = time.perf_counter()
    grammars = Grammars.of(tok, model.config.vocab_size)
    index_s = time.perf_counter() - t0
    engine.generate(ids, SamplingParams(max_new_tokens=4))  # warm-up
    free_rates, constrained_rates, no_ff_rates, mask_ms, valid = [], [], [], [], 0
    steps: dict[str, int] = {}
    for r in range(repeats):
        params = SamplingParams(temperature=0.8, seed=r, max_new_tokens=max_new, ignore_eos=True)
        wall, n, _, steps["free"] = _run_batch(engine, ids, params, [None] * 8)
        free_rates.append(n / wall)
        for ff in (True, False):
            engine.fast_forward = ff
            rows = [grammars.row(Constraint("json_schema", SCHEMA)) for _ in range(8)]
            params = SamplingParams(temperature=0.8, seed=r, max_new_tokens=max_new)
            wall, n, done, steps["json_schema" if ff else "json_schema_no_fast_forward"] = _run_batch(
                engine, ids, params, rows)
            (constrained_rates if ff else no_ff_rates).append(n / wall)
            mask_ms.append(1e3 * sum(row.mask_seconds for row in rows) / max(sum(row.masks for row in rows), 1))
            for d in done:
                if d.finish_reason == "stop":
                    json.loads(d.text)
                    valid += 1
        engine.fast_forward = True
    ttft = {}
    for label, schema in (("cold", {**SCHEMA, "title": f"fresh-{time.time_ns()}"}), ("cached", SCHEMA)):
        t0 = time.perf_counter()
        hook = grammars.row(Constraint("json_schema", schema))
        done = engine.generate(ids, SamplingParams(max_new_tokens=1), logits_hook=hook)
        ttft[label] = time.perf_counter() - t0
        ttft[label + "_engine"] = done.time_to_first_token_s
    free, constrained, no_ff = max(free_rates), max(constrained_rates), max(no_ff_rates)
    results = [
        {"name": "free_batch8_tokens_per_s", "value": free},
        {"name": "json_schema_batch8_tokens_per_s", "value": constrained},
        {"name": "json_schema_no_fast_forward_batch8_tokens_per_s", "value": no_ff},
        *({"name": f"{k}_engine_steps_last_repeat", "value": v} for k, v in steps.items()),
        {"name": "mask_ms_per_token", "value": min(mask_ms)},
        {"name": "vocabulary_index_s", "value": index_s},
        {"name": "ttft_cold_schema_s", "value": ttft["cold"]},
        {"name": "ttft_cached_schema_s", "value": ttft["cached"]},
        {"name": "constrained_rows_finished_valid", "value": valid, "of": 16 * repeats},
    ]
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "model": os.path.basename(path), "max_new_tokens": max_new}  # fmt: skip
    ratios = {"json_schema_vs_free_tokens_per_s": constrained / free,
              "json_schema_no_fast_forward_vs_free_tokens_per_s": no_ff / free,
              "ttft_cold_vs_cached_schema": ttft["cold"] / ttft["cached"]}  # fmt: skip
    print(json.dumps({"benchmark": "structured", "machine": machine, "results": results, "ratios": ratios}))


if __name__ == "__main__":
    main()
