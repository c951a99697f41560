"""Serving many adapters at once: `nomoat serve` under concurrent OpenAI clients, against one-adapter-at-a-time serving.

A random SmolLM2-135M-shaped model (bench_train's cached folder and word tokenizer) and 32 random LoRA adapters
(r=16, alpha 32, all seven linear layers of every block, written in PEFT format) are served by one `nomoat serve`
process. 32 client threads (the official `openai` client) each send `--rounds` completion requests one after another
(32-token prompts, greedy, `--max-tokens` new tokens; the end-of-sequence token is outside the model's vocabulary, so
every request generates exactly that many). Scenarios:

- single: every client uses the same adapter;
- distinct8 / distinct32: client i uses adapter i % 8 / adapter i: 8 or 32 different adapters in one running batch;
- one_at_a_time (the peer): the distinct32 requests served one adapter at a time, as servers that merge or swap
  adapters per batch do (PEFT-based servers batch only requests of the adapter currently applied). Each client has
  one request pending at a time, so every adapter's batch holds one request; the swap itself is not charged (which
  flatters the peer). It runs through the same server, so HTTP and engine costs are the same on both sides.

- single_bf16 / distinct32_bf16: single and distinct32 again on a second server whose adapters are the same 32
  saved with bf16 factors (as PEFT saves the adapters of bf16 models); its default `--adapter-dtype auto` keeps
  them in bf16, half the bytes a step with many distinct adapters reads. The fp32 scenarios above keep fp32 factors
  (auto never rounds an fp32 file on an fp32 model). Each server's log says the dtype its bank holds, reported as
  `adapter_dtype` in every row.

Reported: generated tokens/s over the scenario's wall time, and p50/p99 request latency (for one_at_a_time: from the
moment every client has its request ready, as the clients would see it). The throughput scenarios (single, distinct8,
distinct32, and the two bf16 ones) run `--repeats` times each, interleaved, and report their median tokens/s (every
run in `tokens_per_s_runs`): one run of a few seconds moves by 10% on a shared machine (five repeats by default: with
three, one slow repeat of either scenario moved the ratios of one invocation by several hundredths), and a scenario
always run first or last would carry the machine's drift into the ratios. A last scenario, ttft64, opens 64 streaming
clients at once (each on its own adapter of the 32, `stream=True`) and reports the median and p99 time to the first
streamed token. Every scenario (and the warm-up) sends prompts of its own: the server's prefix cache keeps prompt
prefixes per adapter selection, and a scenario that found its prompts cached by an earlier one would prefill less.
The server runs with its default number of running rows (chosen from memory) unless `--max-running` is given.

    python benchmarks/bench_serve.py [--quick]

Prints one JSON object as its last line (see DESIGN.md, Benchmarks).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHAPE = "smollm2-135m"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def log(msg: str) -> None:
    print(f"[bench_serve] {msg}", file=sys.stderr, flush=True)


def ensure_model(cache: Path) -> Path:
    """bench_train's cached model, seen through a folder whose end-of-sequence token the model can never emit."""
    sys.path.insert(0, str(HERE))
    from bench_train import ensure_model as ensure_train_model

    base = ensure_train_model(SHAPE, cache)
    folder = cache / f"serve-{SHAPE}"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        link = folder / name
        if not link.exists():
            link.symlink_to(base / name)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg["eos_token"] = "<bench_eos>"  # added past the vocabulary: generation always runs to max_tokens
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    return folder


def bf16_copies(cache: Path, adapters: list[Path]) -> list[Path]:
    """The adapters with their factors rounded to bf16, as PEFT saves the adapters of a bf16 model (cached)."""
    import torch
    from safetensors.torch import load_file, save_file

    out = []
    for folder in adapters:
        half = cache / f"{folder.parent.name}-bf16" / folder.name
        out.append(half)
        if (half / "adapter_model.safetensors").is_file():
            continue
        half.mkdir(parents=True, exist_ok=True)
        tensors = load_file(folder / "adapter_model.safetensors")
        save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, half / "adapter_model.safetensors")
        (half / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    return out


def ensure_adapters(cache: Path, model: Path, n: int, rank: int = 16) -> list[Path]:
    """`n` random PEFT-format LoRA adapters over every linear layer (cached)."""
    import torch
    from safetensors.torch import save_file

    cfg = json.loads((model / "config.json").read_text())
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h), "gate_proj": (h, inter),
              "up_proj": (h, inter), "down_proj": (inter, h)}  # fmt: skip
    out = []
    for i in range(n):
        folder = cache / f"serve-adapters-r{rank}" / f"a{i}"
        out.append(folder)
        if (folder / "adapter_model.safetensors").is_file():
            continue
        log(f"writing random adapter {folder} (once)")
        folder.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(i)
        tensors = {}
        for layer in range(layers):
            for module, (fan_in, fan_out) in shapes.items():
                part = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                key = f"base_model.model.model.layers.{layer}.{part}.{module}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) / fan_in**0.5
                tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.01
        save_file(tensors, folder / "adapter_model.safetensors")
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
                  "lora_dropout": 0.0, "target_modules": TARGETS, "bias": "none", "base_model_name_or_path": str(model),
                  "use_dora": False, "use_rslora": False, "modules_to_save": None}  # fmt: skip
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return out


def make_prompts(n: int, salt: int) -> list[list[int]]:
    """`n` 32-token prompts of their own for one scenario (`salt`), so that none starts from a prefix another cached."""
    return [[(7919 * (i + 1) + 31 * j + 104729 * salt) % 40000 + 100 for j in range(32)] for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    model: Path, adapters: list[Path], max_running: int | None, log_file: Path
) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "nomoat.cli", "serve", str(model), "--port", str(port), "--max-queue", "1024",
           "--max-loaded-adapters", str(len(adapters)), "--max-seq-len", "512"]  # fmt: skip
    if max_running:
        cmd += ["--max-running", str(max_running)]
    for i, folder in enumerate(adapters):
        cmd += ["--adapter", f"a{i}={folder}"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(cmd, stdout=log_file.open("w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log_file.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                time.sleep(0.5)  # the ready lines follow /health's 200
                return proc, url
        except httpx.TransportError:
            pass
        if time.time() > deadline:
            raise RuntimeError("server did not become ready")
        time.sleep(0.5)


def factor_dtype(log_file: Path) -> str:
    """The dtype the server's adapter bank holds, from its ready line ("adapter factors in bfloat16 ...")."""
    for line in log_file.read_text().splitlines():
        if "adapter factors in " in line:
            return line.split("adapter factors in ", 1)[1].split()[0]
    return "unknown"


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def summary(name: str, tokens: int, wall: float, latencies: list[float], adapters: int) -> dict:
    return {"scenario": name, "adapters_in_flight": adapters, "requests": len(latencies), "tokens": tokens,
            "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 1),
            "p50_latency_s": round(percentile(latencies, 50), 2),
            "p99_latency_s": round(percentile(latencies, 99), 2)}  # fmt: skip


def run_concurrent(client, prompts: list[list[int]], models: list[str], rounds: int, max_tokens: int) -> tuple:
    """Every client thread sends `rounds` requests one after another; returns (tokens, wall, latencies)."""

    def one_client(i: int) -> list[tuple[int, float]]:
        out = []
        for _ in range(rounds):
            t = time.perf_counter()
            r = client.completions.create(model=models[i], prompt=prompts[i], max_tokens=max_tokens, temperature=0)
            out.append((r.usage.completion_tokens, time.perf_counter() - t))
        return out

    start = time.perf_counter()
    with cf.ThreadPoolExecutor(len(models)) as pool:
        results = [x for xs in pool.map(one_client, range(len(models))) for x in xs]
    wall = time.perf_counter() - start
    return sum(t for t, _ in results), wall, [lat for _, lat in results]


def run_ttft(client, prompts: list[list[int]], models: list[str], max_tokens: int) -> tuple:
    """Every client opens one streaming request at the same moment; returns (tokens, wall, times to first token)."""
    barrier = threading.Barrier(len(models))

    def one_client(i: int) -> tuple[int, float]:
        barrier.wait()
        t = time.perf_counter()
        first, tokens = None, 0
        stream = client.completions.create(model=models[i], prompt=prompts[i % len(prompts)], max_tokens=max_tokens,
                                           temperature=0, stream=True)  # fmt: skip
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                first = first if first is not None else time.perf_counter() - t
                tokens += 1
        return tokens, first if first is not None else float("nan")

    start = time.perf_counter()
    with cf.ThreadPoolExecutor(len(models)) as pool:
        results = list(pool.map(one_client, range(len(models))))
    return sum(t for t, _ in results), time.perf_counter() - start, [f for _, f in results]


def run_repeats(client, scenarios: list[tuple[str, list[str]]], repeats: int, rounds: int, max_tokens: int,
                salt0: int) -> list[dict]:  # fmt: skip
    """Every scenario `repeats` times, interleaved (repeat r starts at scenario r, so none always runs first or after
    the same one) and each time on prompts of its own; a scenario's row is its median tokens/s over the repeats
    (all of them in `tokens_per_s_runs`); its tokens, wall time and latencies are those of all its runs."""
    runs: dict[str, list[tuple[int, float, list[float]]]] = {name: [] for name, _ in scenarios}
    for r in range(repeats):
        for k in range(len(scenarios)):
            index = (r + k) % len(scenarios)
            name, models = scenarios[index]
            log(f"{name} (repeat {r + 1}/{repeats}): {len(models)} clients x {rounds} requests x {max_tokens} tokens")
            salt = salt0 + r * len(scenarios) + index
            runs[name].append(run_concurrent(client, make_prompts(len(models), salt), models, rounds, max_tokens))
            tokens, wall, _ = runs[name][-1]
            log(f"{name}: {tokens / wall:.1f} tokens/s")
    rows = []
    for name, models in scenarios:
        speeds = [tokens / wall for tokens, wall, _ in runs[name]]
        latencies = [x for _, _, lat in runs[name] for x in lat]
        row = summary(name, sum(t for t, _, _ in runs[name]), sum(w for _, w, _ in runs[name]), latencies,
                      len(set(models)))  # fmt: skip
        row["tokens_per_s"] = round(percentile(speeds, 50), 1)
        rows.append({**row, "tokens_per_s_runs": [round(x, 1) for x in speeds]})
        log(json.dumps(rows[-1]))
    return rows


def run_one_at_a_time(client, prompts: list[list[int]], models: list[str], rounds: int, max_tokens: int) -> tuple:
    """The same requests, one adapter's batch at a time (one request each: one pending request per client)."""
    tokens, latencies = 0, []
    start = time.perf_counter()
    for _ in range(rounds):
        ready = time.perf_counter()  # every client has its next request ready now
        for i, model in enumerate(models):
            r = client.completions.create(model=model, prompt=prompts[i], max_tokens=max_tokens, temperature=0)
            tokens += r.usage.completion_tokens
            latencies.append(time.perf_counter() - ready)
    return tokens, time.perf_counter() - start, latencies


def machine() -> str:
    import platform

    cpu = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{platform.machine()} {cpu}, {os.cpu_count()} cores, OMP_WAIT_POLICY=PASSIVE, GOMP_SPINCOUNT=100000 "
            "(set by nomoat serve)")


def run_bf16(a: argparse.Namespace, model: Path, adapters: list[Path], rounds: int, max_tokens: int) -> list[dict]:
    """single and distinct32 on a second server over the adapters saved in bf16 (its default --adapter-dtype)."""
    import openai

    half = bf16_copies(a.cache_dir, adapters)
    log_file = a.cache_dir / "bench_serve-server-bf16.log"
    log(f"starting nomoat serve with {len(half)} bf16 adapters (log: {log_file})")
    proc, url = start_server(model, half, a.max_running, log_file)
    dtype = factor_dtype(log_file)
    results = []
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=3600)
        names = [f"a{i}" for i in range(a.clients)]
        run_concurrent(client, make_prompts(a.clients, 0), names, 1, 4)  # warm-up
        scenarios = [("single_bf16", [names[0]] * a.clients), ("distinct32_bf16", names)]
        results += [{**r, "adapter_dtype": dtype} for r in run_repeats(client, scenarios, a.repeats, rounds, max_tokens,
                                                                       salt0=100)]  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(30)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="One round of 32-token completions per run (under 5 minutes).")
    p.add_argument("--clients", type=int, default=32, help="Concurrent clients (and adapters).")
    p.add_argument("--rounds", type=int, default=None, help="Requests per client in each scenario run.")
    p.add_argument("--repeats", type=int, default=5,
                   help="Runs of each throughput scenario, interleaved; each reports its median.")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=None, help="New tokens per request (32 quick, else 64).")
    p.add_argument("--max-running", type=int, default=None, help="Server batch rows (default: the server's own).")
    p.add_argument("--ttft-clients", type=int, default=64, help="Streaming clients of the ttft scenario.")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("NOMOAT_BENCH_CACHE", "~/.cache/nomoat-bench")).expanduser(),
    )
    a = p.parse_args()  # fmt: skip
    rounds = a.rounds or (1 if a.quick else 2)
    max_tokens = a.max_tokens or (32 if a.quick else 64)
    import openai

    model = ensure_model(a.cache_dir)
    adapters = ensure_adapters(a.cache_dir, model, a.clients)
    log_file = a.cache_dir / "bench_serve-server.log"
    log(f"starting nomoat serve with {len(adapters)} adapters (log: {log_file})")
    proc, url = start_server(model, adapters, a.max_running, log_file)
    dtype = factor_dtype(log_file)
    results = []
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=3600)
        names = [f"a{i}" for i in range(a.clients)]
        log("warm-up")
        run_concurrent(client, make_prompts(a.clients, 0), names, 1, 4)
        scenarios = [("single", [names[0]] * a.clients), ("distinct8", [names[i % 8] for i in range(a.clients)]),
                     ("distinct32", names)]  # fmt: skip
        results += run_repeats(client, scenarios, a.repeats, rounds, max_tokens, salt0=10)
        log("one_at_a_time (peer): the distinct32 requests, one adapter's batch at a time")
        tokens, wall, lat = run_one_at_a_time(client, make_prompts(a.clients, 4), names, rounds, max_tokens)
        results.append(summary("one_at_a_time", tokens, wall, lat, 1))
        log(json.dumps(results[-1]))
        n = a.ttft_clients
        log(f"ttft{n}: {n} streaming clients at once, each on adapter i % {len(names)}")
        tokens, wall, ttft = run_ttft(client, make_prompts(n, 5), [names[i % len(names)] for i in range(n)], max_tokens)
        row = summary(f"ttft{n}", tokens, wall, ttft, min(n, len(names)))
        row.update(p50_ttft_s=round(percentile(ttft, 50), 2), p99_ttft_s=round(percentile(ttft, 99), 2))
        results.append(row)
        log(json.dumps(results[-1]))
    finally:
        proc.terminate()
        proc.wait(30)
    for r in results:
        r["adapter_dtype"] = dtype
    results += run_bf16(a, model, adapters, rounds, max_tokens)
    by = {r["scenario"]: r for r in results}
    tps = {k: v["tokens_per_s"] for k, v in by.items()}
    ratios = {
        "distinct32_tokens_per_s_vs_single_adapter": round(tps["distinct32"] / tps["single"], 3),
        "distinct8_tokens_per_s_vs_single_adapter": round(tps["distinct8"] / tps["single"], 3),
        "distinct32_tokens_per_s_vs_one_adapter_at_a_time": round(tps["distinct32"] / tps["one_at_a_time"], 3),
        "distinct32_p50_latency_vs_one_adapter_at_a_time": round(
            by["distinct32"]["p50_latency_s"] / by["one_at_a_time"]["p50_latency_s"], 3),
        "distinct32_bf16_tokens_per_s_vs_single_adapter_bf16": round(tps["distinct32_bf16"] / tps["single_bf16"], 3),
        "distinct32_bf16_tokens_per_s_vs_single_adapter": round(tps["distinct32_bf16"] / tps["single"], 3),
    }  # fmt: skip
    row = next(r for r in results if r["scenario"].startswith("ttft"))
    ttft = {"clients": a.ttft_clients, "p50_s": row["p50_ttft_s"], "p99_s": row["p99_ttft_s"]}
    targets = {"distinct32_vs_single": 0.9, "distinct32_vs_one_at_a_time": 3.0, "ttft_p50_s": 5.0}
    print(json.dumps({"benchmark": "serve_multi_adapter", "machine": machine(), "quick": a.quick, "rounds": rounds,
                      "max_tokens": max_tokens, "targets": targets, "ttft": ttft, "results": results,
                      "ratios": ratios}))  # fmt: skip


if __name__ == "__main__":
    main()
