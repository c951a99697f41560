"""Quantization quality on a real model: nomoat int8 / int4 against llama.cpp q8_0 / q4_0, perplexity on a fixed text.

Model: the real SmolLM2-135M-Instruct whose Q4_1 GGUF `../shared/real-models/smollm2` prints (skipped, with the
reason in the JSON, where the script or the file is missing). Its weights are dequantized once into an F32 GGUF
(same metadata and vocabulary, every tensor F32): that file is the full-precision reference of both engines.
llama.cpp quantizes it with its own quantizer (`llama_model_quantize`) to q8_0, q4_0 (llama.cpp's default mix: its
tied embedding/output matrix stays 8-bit, as nomoat's int4 keeps its head int8) and q4_0 "pure" (every matrix
4-bit: what a 4-bit head costs); nomoat loads the same F32 file as fp32, `quantize="int8"` and `quantize="int4"`.

Text: benchmarks/data/alice_ch1_2.txt, chapters I-II of Lewis Carroll's "Alice's Adventures in Wonderland" (1865,
public domain; Project Gutenberg eBook #11, Millennium Fulcrum Edition 3.0, without the Project Gutenberg header).
It is tokenized once by nomoat's tokenizer (no special tokens) and both engines score those same ids, in the same
windows: `window` tokens, advancing by `stride`; each window scores only the tokens the previous one did not (the
first window all but its first token), so every token after the first is scored once, with at least
`window - stride` tokens of context except at the start. Perplexity is `exp(sum of NLL / tokens scored)`.

For every quantized variant the JSON also gives, against its own engine's full-precision logits on the same window
(the two are run window by window, interleaved): the mean KL divergence per token and how often the most likely
next token agrees, which stay informative where the perplexity change is within noise (8-bit).

Ratios (lower is better, <= 1 meets issue's bar): `int8_ppl_increase_vs_q8_0` = (nomoat int8 ppl / nomoat fp32 ppl
- 1) / (llama.cpp q8_0 ppl / llama.cpp F32 ppl - 1), likewise `int4_ppl_increase_vs_q4_0` (and `_vs_q4_0_pure`),
and `*_kld_vs_*` on the KL divergences. `fp32_ppl_vs_llamacpp_f32` checks that both engines score the reference
alike (about 1.0; llama.cpp keeps its KV cache in f16 by default, as run here). `*_ppl_increase_minus_*` is the
difference of the two increases (nomoat's minus llama.cpp's, as a fraction) and `..._stderr` its standard error from
the tokens' paired NLL differences: at 8 bits the increases are a fraction of a percent and a gap within two
standard errors is the text's noise (KL divergence is the measure that separates the quantizers there).

Threads: 2 for both (`OMP_WAIT_POLICY=PASSIVE` unless set). One engine's models are loaded at a time; the peak RSS,
about 5 GB, is llama.cpp's four contexts, each keeping every position's logits.

    python benchmarks/bench_quality.py [--quick] [--window 512] [--stride 256] [--tokens N]

`--quick` scores the first 2,048 tokens (under 5 minutes on 2 cores); the full run scores the whole text.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # before torch and llama.cpp load OpenMP: no spinning threads fighting over 2 cores
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import ctypes  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent
TEXT = ROOT / "data" / "alice_ch1_2.txt"
THREADS = 2

# A scorer maps (window token ids, n) to the log-probabilities (n, vocab) that predict the window's last n tokens.
Scorer = Callable[[Sequence[int], int], torch.Tensor]


def peak_rss_gb() -> float | None:
    """This process's peak resident memory so far (VmHWM), in GB; None where /proc is absent."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM")) / 1e9
    except (OSError, StopIteration):
        return None


def log(msg: str) -> None:
    print(f"[bench_quality] {msg} (peak RSS so far {peak_rss_gb() or 0:.2f} GB)", file=sys.stderr, flush=True)


# ---- the metric --------------------------------------------------------------------------------------------------


def windows(n_tokens: int, window: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """`(start, end, scored)` of each window: tokens `[start, end)` are fed, the last `scored` of them are scored.

    Every token but the first is scored exactly once; a window scores the tokens its predecessor did not reach.
    """
    if not 0 < stride < window:
        raise ValueError(f"need 0 < stride < window, got stride {stride}, window {window}")
    done = 1  # the first token has no prediction
    start = 0
    while done < n_tokens:
        end = min(start + window, n_tokens)
        yield start, end, end - done
        done = end
        start += stride


def score_windows(
    scorers: dict[str, Scorer], ids: Sequence[int], window: int, stride: int, references: dict[str, str] | None = None
) -> dict[str, dict[str, float]]:
    """NLL of each scorer over `ids` in shared windows, and KL divergence / top-1 agreement against a reference.

    Args:
        scorers: `{name: scorer}`, run one after another on each window (interleaved across models).
        ids: The token ids of the text.
        window: Tokens fed per window.
        stride: Tokens the window advances by.
        references: `{name: reference name}`: compare `name`'s distributions with the reference's on each window.

    Returns:
        Per name: `perplexity`, `nll` (mean per token), `tokens`, `token_nll` (a float64 tensor: each scored
        token's NLL, in text order), and for compared names `kld` (mean per token, nats) and `top1_agreement`.
    """
    references = references or {}
    sums = {name: {"nll": 0.0, "kld": 0.0, "top1": 0.0} for name in scorers}
    token_nll: dict[str, list[torch.Tensor]] = {name: [] for name in scorers}
    tokens = 0
    for start, end, n in windows(len(ids), window, stride):
        chunk = list(ids[start:end])
        targets = torch.tensor(chunk[-n:])  # (n,)
        lps = {name: scorer(chunk, n) for name, scorer in scorers.items()}  # each (n, V)
        for name, lp in lps.items():
            token_nll[name].append(-lp.double().gather(-1, targets[:, None]).squeeze(1))
            sums[name]["nll"] += float(token_nll[name][-1].sum())
            ref = lps.get(references.get(name, ""))
            if ref is not None:
                ref64, lp64 = ref.double(), lp.double()
                sums[name]["kld"] += float((ref64.exp() * (ref64 - lp64)).sum())
                sums[name]["top1"] += float((ref.argmax(-1) == lp.argmax(-1)).sum())
        tokens += n
    out: dict[str, dict[str, float]] = {}
    for name, s in sums.items():
        nll = s["nll"] / tokens
        out[name] = {"perplexity": math.exp(nll), "nll": nll, "tokens": tokens, "token_nll": torch.cat(token_nll[name])}
        if name in references:
            out[name].update(kld=s["kld"] / tokens, top1_agreement=s["top1"] / tokens)
    return out


def perplexity(scorer: Scorer, ids: Sequence[int], window: int, stride: int) -> float:
    """`exp(mean NLL)` of one scorer over `ids` in sliding windows (see `windows`)."""
    return score_windows({"model": scorer}, ids, window, stride)["model"]["perplexity"]


def nomoat_scorer(model: torch.nn.Module) -> Scorer:
    """Scorer over a nomoat `Transformer` (fp32 logits, only at the scored positions)."""

    @torch.inference_mode()
    def score(chunk: Sequence[int], n: int) -> torch.Tensor:
        ids = torch.tensor([list(chunk)], device=model.device)  # (1, T)
        hidden = model(ids, return_hidden=True)  # (1, T, D)
        logits = model.logits(hidden[0, len(chunk) - n - 1 : len(chunk) - 1]).float()  # (n, V)
        return torch.log_softmax(logits, dim=-1).cpu()

    return score


def llamacpp_scorer(path: Path, window: int) -> Scorer:
    """Scorer over a GGUF file run by llama-cpp-python, every position's logits kept (`logits_all`)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=window, n_batch=window, n_ubatch=window, logits_all=True,
                          n_threads=THREADS, n_threads_batch=THREADS, verbose=False)  # fmt: skip

    def score(chunk: Sequence[int], n: int) -> torch.Tensor:
        llm.reset()  # the next eval drops the KV cache from position 0
        llm.eval(list(chunk))
        logits = torch.from_numpy(llm.scores[len(chunk) - n - 1 : len(chunk) - 1].copy())  # (n, V)
        return torch.log_softmax(logits.float(), dim=-1)

    score.llm = llm  # type: ignore[attr-defined]  # kept alive with the scorer
    return score


# ---- the files ---------------------------------------------------------------------------------------------------


def real_model() -> tuple[Path | None, str | None]:
    """The real SmolLM2 GGUF that `../shared/real-models/smollm2` prints (a worktree's: its main checkout's), or
    (None, why not)."""
    project = ROOT.parent
    candidates = [project.parent / "shared" / "real-models" / "smollm2"]
    common = subprocess.run(["git", "rev-parse", "--git-common-dir"], cwd=project, capture_output=True, text=True)
    if common.returncode == 0:
        candidates.append((project / common.stdout.strip()).resolve().parent.parent / "shared" / "real-models" /
                          "smollm2")  # fmt: skip
    script = next((c for c in candidates if c.is_file()), None)
    if script is None:
        return None, f"no script at {candidates[0]}"
    try:
        r = subprocess.run([str(script)], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{script} failed: {e}"
    path = Path(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 and r.stdout.strip() else None
    if path is None or not path.is_file():
        return None, f"{script} gave no model (exit {r.returncode}): {(r.stderr or r.stdout).strip()[-300:]}"
    return path, None


def dequantize_gguf(src: Path, out: Path) -> Path:
    """`src` with every tensor dequantized to F32 (metadata and vocabulary copied): the reference file."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    tmp = out.with_suffix(".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by the writer itself
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        value = int(gguf.LlamaFileType.ALL_F32) if field.name == gguf.Keys.General.FILE_TYPE else field.contents()
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    shapes = [tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors]  # numpy order: (rows, columns)
    for t, shape in zip(reader.tensors, shapes):
        writer.add_tensor_info(t.name, shape, np.dtype(np.float32), 4 * math.prod(shape), gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t, shape in zip(reader.tensors, shapes):  # one tensor in memory at a time
        writer.write_tensor_data(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape))
    writer.close()
    tmp.replace(out)
    return out


def llamacpp_quantize(src: Path, out: Path, ftype: str, pure: bool = False) -> Path:
    """`src` quantized by llama.cpp's own quantizer to `ftype` (`q8_0`, `q4_0`); `pure`: every matrix that type."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[ftype]
    params.nthread = THREADS
    params.pure = pure
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {src} -> {ftype} failed ({rc})")
    return out


def text_ids(tokenizer: Any, limit: int | None) -> list[int]:
    ids = tokenizer.encode(TEXT.read_text(encoding="utf-8"), add_special_tokens=False)
    return ids[:limit] if limit else ids


# ---- the run -----------------------------------------------------------------------------------------------------

NOMOAT = {"nomoat_fp32": None, "nomoat_int8": "int8", "nomoat_int4": "int4"}
LLAMACPP = {"llamacpp_f32": None, "llamacpp_q8_0": ("q8_0", False), "llamacpp_q4_0": ("q4_0", False),
            "llamacpp_q4_0_pure": ("q4_0", True)}  # fmt: skip
REFERENCES = {"nomoat_int8": "nomoat_fp32", "nomoat_int4": "nomoat_fp32", "llamacpp_q8_0": "llamacpp_f32",
              "llamacpp_q4_0": "llamacpp_f32", "llamacpp_q4_0_pure": "llamacpp_f32"}  # fmt: skip
PAIRS = {"int8": ("nomoat_int8", "llamacpp_q8_0"), "int4": ("nomoat_int4", "llamacpp_q4_0"),
         "int4_pure": ("nomoat_int4", "llamacpp_q4_0_pure")}  # fmt: skip


def nomoat_models(f32: Path) -> tuple[dict[str, Scorer], Any]:
    """nomoat's scorers (fp32, int8, int4) over the reference file, and its tokenizer."""
    import nomoat

    scorers: dict[str, Scorer] = {}
    tokenizer = None
    for name, mode in NOMOAT.items():
        log(f"load {name}")
        model, tokenizer = nomoat.load(str(f32), dtype="float32", device="cpu", quantize=mode)
        scorers[name] = nomoat_scorer(model)
    return scorers, tokenizer


def llamacpp_models(f32: Path, work: Path, window: int, info: dict[str, Any]) -> dict[str, Scorer]:
    """llama.cpp's scorers: the reference file and its q8_0 / q4_0 / q4_0-pure quantizations (sizes into `info`)."""
    files = {"llamacpp_f32": f32}
    for name, spec in LLAMACPP.items():
        if spec is not None:
            log(f"llama.cpp quantize {name}")
            files[name] = llamacpp_quantize(f32, work / f"{name}.gguf", *spec)
    for name, path in files.items():
        info[f"{name}_file_bytes"] = path.stat().st_size
    return {name: llamacpp_scorer(path, window) for name, path in files.items()}


def _increase(stats: dict[str, dict[str, float]], name: str) -> float | None:
    ref = REFERENCES.get(name)
    if name not in stats or ref not in stats:
        return None
    return stats[name]["perplexity"] / stats[ref]["perplexity"] - 1


def increase_gap(stats: dict[str, dict[str, Any]], ours: str, peer: str) -> tuple[float, float]:
    """(ours's perplexity increase - peer's, its standard error), from the tokens' paired NLL differences.

    Each engine's increase is `exp(mean(d)) - 1` with `d` its variant's per-token NLL minus its reference's; both
    engines score the same tokens, so `e = d_ours - d_peer` pairs them token by token, and the gap's standard error
    is `std(e) / sqrt(n)` (delta method, scaled by the increases' common `exp(mean)`, about 1). A gap within two
    standard errors is the text's sampling noise, not a difference between the quantizers.
    """
    d_ours = stats[ours]["token_nll"] - stats[REFERENCES[ours]]["token_nll"]
    d_peer = stats[peer]["token_nll"] - stats[REFERENCES[peer]]["token_nll"]
    e = d_ours - d_peer
    gap = math.exp(float(d_ours.mean())) - math.exp(float(d_peer.mean()))
    return gap, float(e.std()) / math.sqrt(len(e)) * math.exp(float(d_peer.mean()))


def ratios_of(stats: dict[str, dict[str, float]]) -> dict[str, float | None]:
    """nomoat / llama.cpp ratios of the perplexity increase and of the KL divergence, per precision."""
    out: dict[str, float | None] = {}
    for key, (ours, peer) in PAIRS.items():
        a, b = _increase(stats, ours), _increase(stats, peer)
        # A peer increase <= 0 (8-bit can land within noise) makes the ratio meaningless: reported as None.
        out[f"{key}_ppl_increase_vs_{peer.removeprefix('llamacpp_')}"] = (
            round(a / b, 3) if a is not None and b is not None and b > 0 else None
        )
        if ours in stats and peer in stats:
            out[f"{key}_kld_vs_{peer.removeprefix('llamacpp_')}"] = round(stats[ours]["kld"] / stats[peer]["kld"], 3)
    for key, (ours, peer) in PAIRS.items():  # is the difference of the two increases more than noise?
        if all("token_nll" in stats.get(x, {}) for x in (ours, peer, REFERENCES[ours], REFERENCES[peer])):
            gap, se = increase_gap(stats, ours, peer)
            out[f"{key}_ppl_increase_minus_{peer.removeprefix('llamacpp_')}"] = round(gap, 5)
            out[f"{key}_ppl_increase_minus_{peer.removeprefix('llamacpp_')}_stderr"] = round(se, 5)
    if "nomoat_fp32" in stats and "llamacpp_f32" in stats:
        out["fp32_ppl_vs_llamacpp_f32"] = round(stats["nomoat_fp32"]["perplexity"] /
                                                stats["llamacpp_f32"]["perplexity"], 5)  # fmt: skip
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                   if x.startswith("model name"))  # fmt: skip
    except (OSError, StopIteration):
        pass
    return f"{platform.machine()} {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, threads {THREADS}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="score the first 2,048 tokens only")
    ap.add_argument("--window", type=int, default=512, help="tokens fed per window")
    ap.add_argument("--stride", type=int, default=256, help="tokens each window advances by")
    ap.add_argument("--tokens", type=int, default=0, help="score only the first N tokens of the text")
    ap.add_argument("--model", type=Path, help="a llama-architecture GGUF instead of the real SmolLM2")
    ap.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "nomoat-bench" / "quality",
                    help="where the F32 reference and llama.cpp's quantized GGUFs are written (rewritten each run)")
    a = ap.parse_args()
    torch.set_num_threads(THREADS)
    head = {"benchmark": "quality", "machine": machine(), "text": TEXT.name, "window": a.window, "stride": a.stride}
    gguf_path, why = (a.model, None) if a.model else real_model()
    if gguf_path is None:
        log(f"skipped: {why}")
        print(json.dumps({**head, "skipped": why, "results": [], "ratios": {}}))
        return
    try:
        import llama_cpp  # noqa: F401

        peer, peer_note = True, None
    except ImportError:
        peer, peer_note = False, "llama-cpp-python is not installed (pip install -e .[bench]): llama.cpp absent"
    a.work_dir.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {}
    t = time.perf_counter()
    f32 = dequantize_gguf(gguf_path, a.work_dir / "f32.gguf")
    info["dequantize_s"] = round(time.perf_counter() - t, 1)
    # One engine at a time (its quantized models beside its reference, window by window): about 1.5 GB at most.
    scorers, tokenizer = nomoat_models(f32)
    ids = text_ids(tokenizer, a.tokens or (2048 if a.quick else None))
    refs = {k: v for k, v in REFERENCES.items() if k.startswith("nomoat")}
    log(f"scoring {len(ids)} tokens in windows of {a.window}, stride {a.stride}: nomoat")
    t = time.perf_counter()
    stats = score_windows(scorers, ids, a.window, a.stride, refs)
    info["nomoat_score_s"] = round(time.perf_counter() - t, 1)
    del scorers
    gc.collect()
    if peer:
        scorers = llamacpp_models(f32, a.work_dir, a.window, info)
        refs = {k: v for k, v in REFERENCES.items() if k.startswith("llamacpp")}
        log("scoring: llama.cpp")
        t = time.perf_counter()
        stats.update(score_windows(scorers, ids, a.window, a.stride, refs))
        info["llamacpp_score_s"] = round(time.perf_counter() - t, 1)
    results = [{"model": name, **{k: round(v, 6) if isinstance(v, float) else v for k, v in s.items()
                                  if k != "token_nll"},
                "ppl_increase": None if _increase(stats, name) is None else round(_increase(stats, name), 5)}
               for name, s in stats.items()]  # fmt: skip
    info["peak_rss_gb"] = peak_rss_gb()
    print(json.dumps({**head, "model": str(gguf_path), "text_tokens": len(ids), "peer": peer_note, "setup": info,
                      "results": results, "ratios": ratios_of(stats)}))  # fmt: skip


if __name__ == "__main__":
    main()
