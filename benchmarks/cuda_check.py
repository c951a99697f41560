"""CUDA checks and timings: the GPU paths of nomoat against transformers and PEFT on the same GPU, in one run.

Tests run on CPU (CI has no GPU); this script is what checks the CUDA paths on a machine that has one:
- parity: logits of every tiny family in fp32 (and bf16) against transformers on the GPU; greedy engine output
  (batched, different prompt lengths) equal to transformers `generate` token for token;
- weight-only int8 / int4 on CUDA: logits against fp32, and the greedy agreement;
- training: the recipe on CUDA in fp32 against a plain transformers+PEFT loop on the GPU (first 10 losses), bf16
  autocast against fp32, QLoRA (int8, int4, nf4 base) learning;
- timings on a SmolLM2-135M-shaped random model: decode tokens/s at batch 1 and 8 (fp32, bf16, int8, int4, with
  and without `torch.compile`) against transformers `generate`, and LoRA training tokens/s and peak GPU memory
  against transformers+PEFT (fp32 and bf16 autocast), sequence 512, batch 2.

    python benchmarks/cuda_check.py [--quick]     # needs a CUDA GPU; run with PYTHONPATH=src:tests if not installed

Prints one JSON object as its last line (see DESIGN.md, Benchmarks).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench_generate import NullTokenizer as _Tok  # noqa: E402  (benchmarks/ is the script's folder)

RESULTS: list[dict[str, Any]] = []


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_mib() -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else float("nan")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def record(kind: str, **kw: Any) -> None:
    RESULTS.append({"check": kind, **kw})
    log(json.dumps({"check": kind, **kw}))


def check_parity(root: Path, dev: str) -> None:
    """Logits against transformers on the GPU, fp32 and bf16, per family; greedy engine vs `generate`."""
    import transformers

    from nomoat.generate.engine import Engine
    from nomoat.generate.sampling import SamplingParams
    from nomoat.models.checkpoint import load_model

    from hf_models import ALL, make_hf_model

    g = torch.Generator().manual_seed(0)
    for fam in ALL:
        path = root / fam
        make_hf_model(fam, path)
        ids = torch.randint(3, 500, (2, 24), generator=g).to(dev)
        for dtype in (torch.float32, torch.bfloat16):
            hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(dev).eval()
            ours = load_model(path, dtype=dtype, device=dev)
            with torch.no_grad():
                ref = hf(ids).logits.float()
                got = ours(ids).float()
            diff = (ref - got).abs().max().item()
            record("logits", family=fam, dtype=str(dtype).removeprefix("torch."), max_abs_diff=diff,
                   ref_abs_max=ref.abs().max().item())  # fmt: skip
            if dtype != torch.float32:
                continue
            # Greedy generation: three prompts of different lengths batched in the engine vs each alone in HF.
            engine = Engine(ours, _Tok(), max_running=4, max_seq_len=128, prefix_cache_bytes=0)
            prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (5, 11, 17)]
            params = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
            handles = [engine.submit(p, params) for p in prompts]
            equal = 0
            for p, h in zip(prompts, handles):
                got_ids = h.result().token_ids
                with torch.no_grad():
                    out = hf.generate(torch.tensor([p], device=dev), max_new_tokens=16, min_new_tokens=16,
                                      do_sample=False, pad_token_id=0, eos_token_id=None)  # fmt: skip
                equal += int(out[0, len(p) :].tolist() == list(got_ids))
            record("greedy_vs_transformers_generate", family=fam, prompts=len(prompts), equal=equal)


def check_quantize(root: Path, dev: str) -> None:
    """int8 / int4 weight-only quantization on CUDA: logits error against fp32 and greedy agreement."""
    from nomoat.models.checkpoint import load_model
    from nomoat.models.quantize import quantize_model

    from hf_models import make_hf_model

    path = root / "q"
    make_hf_model("llama3", path, intermediate_size=256, hidden_size=128)
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(1)).to(dev)
    base = load_model(path, dtype=torch.float32, device=dev)
    with torch.no_grad():
        ref = base(ids)
    for mode in ("int8", "int4"):
        m = load_model(path, dtype=torch.float32, device=dev)
        quantize_model(m, mode)
        with torch.no_grad():
            got = m(ids)
        rel = ((got - ref).norm() / ref.norm()).item()
        agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
        record("quantized_logits", mode=mode, device=dev, rel_error=rel, argmax_agreement=agree)


def check_training(root: Path, dev: str) -> None:
    """The recipe on CUDA: fp32 losses vs a transformers+PEFT loop on the same GPU; bf16 autocast; QLoRA."""
    import peft
    import transformers
    from rich.console import Console

    from nomoat.config.train import TrainConfig
    from nomoat.lora import save_adapter
    from nomoat.train.sft import SFTRecipe

    from train_utils import make_chat_model, write_chat_data

    model_dir = make_chat_model(root / "chat")
    data = write_chat_data(root / "chat.jsonl", n=24)
    quiet = Console(quiet=True)

    def cfg(**kw: Any) -> TrainConfig:
        base = dict(model=str(model_dir), data=[str(data)], output_dir=str(root / "runs"), name="t", seq_len=64,
                    batch_size=2, lr=1e-3, warmup_steps=0, max_steps=10, packing=False, device=dev,
                    lora={"r": 4, "alpha": 8, "dropout": 0.0})  # fmt: skip
        base.update(kw)
        return TrainConfig(**base)

    # fp32 parity against the reference loop on the same GPU.
    c = cfg(dtype="float32")
    recipe = SFTRecipe(c, console=quiet, progress=False)
    recipe.setup()
    start = recipe.stream.state_dict()
    batches = [recipe._next_batch() for _ in range(c.max_steps)]
    recipe.stream.load_state_dict(start)
    recipe._batches = None
    adapter_dir = root / "init_adapter"
    save_adapter(recipe.model, adapter_dir, c.lora, base_model_name_or_path=c.model)
    ours = [float(recipe.train_step()["loss"]) for _ in range(c.max_steps)]
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                           attn_implementation="eager").to(dev)  # fmt: skip
    model = peft.PeftModel.from_pretrained(hf, adapter_dir, is_trainable=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=c.lr, betas=c.betas, eps=c.eps, weight_decay=c.weight_decay)
    sched = transformers.get_cosine_schedule_with_warmup(opt, 0, c.max_steps)
    ref = []
    for b in batches:
        b = {k: v.to(dev) for k, v in b.items() if isinstance(v, torch.Tensor)}
        n = int((b["labels"][:, 1:] != -100).sum())
        out = model(input_ids=b["input_ids"], attention_mask=(b["segment_ids"] != 0).long(),
                    position_ids=b["position_ids"])  # fmt: skip
        logits = out.logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1),
                               ignore_index=-100, reduction="sum") / n  # fmt: skip
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
        ref.append(float(loss.detach()))
    rel = max(abs(a - b) / abs(b) for a, b in zip(ours, ref))
    record("train_fp32_vs_peft", device=dev, steps=len(ours), max_rel_diff=rel, ours=ours[:3], peft=ref[:3])

    # bf16 autocast (the CUDA default) against fp32, and QLoRA bases: all must learn.
    last32 = None
    for name, kw in (("fp32", dict(dtype="float32")), ("bf16_auto", dict(dtype="auto")),
                     ("qlora_int8", dict(dtype="float32", quantize_base="int8")),
                     ("qlora_int4", dict(dtype="float32", quantize_base="int4")),
                     ("qlora_nf4", dict(dtype="float32", quantize_base="nf4")),
                     ("qlora_nf4_bf16", dict(dtype="auto", quantize_base="nf4"))):  # fmt: skip
        _reset_peak()
        r = SFTRecipe(cfg(max_steps=60, lr=3e-3, name=name, **kw), console=quiet, progress=False)
        r.setup()
        losses = [float(r.train_step()["loss"]) for _ in range(60)]
        last32 = losses[-1] if last32 is None else last32
        record("train_variant", variant=name, device=dev, autocast=r.autocast, first_loss=losses[0],
               last_loss=losses[-1], first_vs_fp32=abs(losses[0] - ours[0]) / ours[0],
               last_vs_fp32=abs(losses[-1] - last32) / last32,
               peak_gpu_mib=_peak_mib(),
               learns=losses[-1] < 0.8 * losses[0])  # fmt: skip


SMOL = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=4096, bos_token_id=1,
            eos_token_id=2)  # fmt: skip


def bench_decode(root: Path, dev: str, new: int, engines: set[str]) -> None:
    """Decode tokens/s at batch 1 and batch 8 on a SmolLM2-135M-shaped model: nomoat variants vs transformers."""
    import transformers

    from nomoat.generate.engine import Engine
    from nomoat.generate.sampling import SamplingParams
    from nomoat.models.checkpoint import load_model
    from nomoat.models.quantize import quantize_model

    path = root / "smol"
    if not path.is_dir():
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**SMOL)).save_pretrained(path)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 1000, (32,), generator=g).tolist()
    prompts8 = [torch.randint(3, 1000, (32,), generator=g).tolist() for _ in range(8)]

    def run_engine(label: str, dtype: torch.dtype, quant: str | None, compile_: bool) -> None:
        m = load_model(path, dtype=dtype, device=dev)
        if quant:
            quantize_model(m, quant)
        t0 = time.perf_counter()
        e = Engine(m, _Tok(), max_running=8, max_seq_len=512, prefix_cache_bytes=0, compile=compile_)
        warm = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
        for _ in range(2):  # warm-up, and compile: batch 1 and then any batch size (one recompile, for B > 1)
            e.generate(prompt, warm)
            [h.result() for h in [e.submit(p, warm) for p in prompts8]]
        warm_s = time.perf_counter() - t0
        out = e.generate(prompt, SamplingParams(temperature=0, max_new_tokens=new, ignore_eos=True))
        p8 = SamplingParams(temperature=0, max_new_tokens=new, ignore_eos=True)
        _sync()
        t = time.perf_counter()
        n = sum(h.result().completion_tokens for h in [e.submit(p, p8) for p in prompts8])
        b8 = n / (time.perf_counter() - t)
        record("decode", engine=label, device=dev, batch1_tok_s=out.decode_tokens_per_s, batch8_tok_s=b8,
               warmup_s=warm_s)  # fmt: skip

    for dtype in (torch.float32, torch.bfloat16):
        if engines and f"transformers-{str(dtype).removeprefix('torch.')}" not in engines:
            continue
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(dev).eval()
        kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
        x = torch.tensor([prompt], device=dev)
        with torch.inference_mode():
            hf.generate(x, max_new_tokens=8, min_new_tokens=8, **kw)
            _sync()
            t = time.perf_counter()
            hf.generate(x, max_new_tokens=1, min_new_tokens=1, **kw)
            _sync()
            pre = time.perf_counter() - t
            t = time.perf_counter()
            hf.generate(x, max_new_tokens=new, min_new_tokens=new, **kw)
            _sync()
            b1 = (new - 1) / (time.perf_counter() - t - pre)
            x8 = torch.tensor(prompts8, device=dev)
            t = time.perf_counter()
            hf.generate(x8, max_new_tokens=new, min_new_tokens=new, **kw)
            _sync()
            b8 = 8 * new / (time.perf_counter() - t)
        record("decode", engine=f"transformers-{str(dtype).removeprefix('torch.')}", device=dev, batch1_tok_s=b1,
               batch8_tok_s=b8)  # fmt: skip
        del hf
    variants = (("nomoat-fp32", torch.float32, None, False),
                ("nomoat-bf16", torch.bfloat16, None, False),
                ("nomoat-int8", torch.bfloat16, "int8", False),
                ("nomoat-int4", torch.bfloat16, "int4", False),
                ("nomoat-fp32-compile", torch.float32, None, True),
                ("nomoat-bf16-compile", torch.bfloat16, None, True))  # fmt: skip
    for label, dtype, quant, comp in variants:
        if engines and label not in engines:
            continue
        try:
            run_engine(label, dtype, quant, comp)
        except Exception as e:  # a failing variant is reported, the others still run
            record("decode", engine=label, device=dev, error=f"{type(e).__name__}: {e}"[:500])


def bench_train(root: Path, dev: str, steps: int) -> None:
    """LoRA r16 all-linear training, seq 512, batch 2, SmolLM2 shape: nomoat vs transformers+PEFT on the GPU."""
    import peft
    import transformers
    from rich.console import Console

    from nomoat.config.train import TrainConfig
    from nomoat.train.sft import SFTRecipe

    from train_utils import make_chat_model, write_chat_data

    path = make_chat_model(root / "smol_chat", family="llama_tied_mqa")  # tokenizer + template; replace weights
    cfg_hf = transformers.LlamaConfig(**{**SMOL, "vocab_size": 512})
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg_hf).save_pretrained(path)
    data = write_chat_data(root / "long.jsonl", n=400, max_words=300)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for dtype in ("float32", "bfloat16"):
        _reset_peak()
        c = TrainConfig(model=str(path), data=[str(data)], format="messages", seq_len=512, batch_size=2,
                        max_steps=steps + 3, lr=1e-4, schedule="constant", warmup_steps=0, packing=True,
                        save_every=0, output_dir=str(root / "bench_runs"), name=f"b-{dtype}", device=dev, dtype=dtype,
                        lora={"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": targets})  # fmt: skip
        r = SFTRecipe(c, console=Console(quiet=True), progress=False)
        r.setup()
        for _ in range(3):
            r.train_step()
        _sync()
        t, n = time.perf_counter(), 0
        for _ in range(steps):
            n += int(r.train_step()["tokens"])
        _sync()
        record("train_speed", engine=f"nomoat-{dtype}", device=dev, tokens_per_s=n / (time.perf_counter() - t),
               peak_gpu_mib=_peak_mib())  # fmt: skip
        del r
        # The peer on the same rows: padded batches of two examples (its usual form), same real-token count basis.
        _reset_peak()
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev)
        model = peft.get_peft_model(hf, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets,
                                                        task_type="CAUSAL_LM"))  # fmt: skip
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
        g = torch.Generator().manual_seed(0)
        lens = torch.randint(200, 512, (2 * (steps + 3),), generator=g).tolist()
        n, t = 0, 0.0
        for i in range(steps + 3):
            if i == 3:
                _sync()
                t = time.perf_counter()
            ln = lens[2 * i : 2 * i + 2]
            ids = torch.randint(3, 500, (2, max(ln)), generator=g)
            mask = torch.zeros_like(ids)
            for j, k in enumerate(ln):
                mask[j, :k] = 1
            labels = ids.masked_fill(mask == 0, -100)
            ids, mask, labels = ids.to(dev), mask.to(dev), labels.to(dev)
            ctx = torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=dtype == "bfloat16")
            with ctx:
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= 3:
                n += sum(ln)
        _sync()
        record("train_speed", engine=f"peft-{dtype}", device=dev, tokens_per_s=n / (time.perf_counter() - t),
               peak_gpu_mib=_peak_mib())  # fmt: skip
        del model, hf, opt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer decode tokens and training steps")
    ap.add_argument("--only", default="parity,quantize,training,decode,train_speed", help="comma-separated parts")
    ap.add_argument("--device", default="cuda", help="cuda (cpu only to try the script itself)")
    ap.add_argument("--decode-engines", default="", help="comma-separated decode variants (default: all)")
    a = ap.parse_args()
    engines = set(filter(None, a.decode_engines.split(",")))
    if not torch.cuda.is_available() and a.device == "cuda":
        print(json.dumps({"benchmark": "cuda_check", "error": "no CUDA device"}))
        return
    dev = a.device
    parts = set(a.only.split(","))
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        for name, fn in (("parity", lambda: check_parity(root, dev)), ("quantize", lambda: check_quantize(root, dev)),
                         ("training", lambda: check_training(root, dev)),
                         ("decode", lambda: bench_decode(root, dev, 64 if a.quick else 128, engines)),
                         ("train_speed", lambda: bench_train(root, dev, 5 if a.quick else 20))):  # fmt: skip
            if name not in parts:
                continue
            t = time.perf_counter()
            try:
                fn()
            except Exception as e:  # report and go on with the other parts
                import traceback

                traceback.print_exc()
                record("part_failed", part=name, error=f"{type(e).__name__}: {e}"[:800])
            log(f"{name}: {time.perf_counter() - t:.1f} s")
    speed = {r["engine"]: r for r in RESULTS if r["check"] == "train_speed"}
    dec = {r["engine"]: r for r in RESULTS if r["check"] == "decode" and "error" not in r}
    ratios: dict[str, float] = {}
    for dt in ("float32", "bfloat16"):
        if f"nomoat-{dt}" in speed and f"peft-{dt}" in speed:
            ratios[f"train_tokens_per_s_vs_peft_{dt}"] = (
                speed[f"nomoat-{dt}"]["tokens_per_s"] / speed[f"peft-{dt}"]["tokens_per_s"]
            )
            ratios[f"train_peak_gpu_mem_vs_peft_{dt}"] = (
                speed[f"nomoat-{dt}"]["peak_gpu_mib"] / speed[f"peft-{dt}"]["peak_gpu_mib"]
            )
    for ours, peer in (("nomoat-fp32", "transformers-float32"), ("nomoat-bf16", "transformers-bfloat16"),
                       ("nomoat-bf16-compile", "transformers-bfloat16")):  # fmt: skip
        if ours in dec and peer in dec:
            ratios[f"decode_b1_{ours}_vs_{peer}"] = dec[ours]["batch1_tok_s"] / dec[peer]["batch1_tok_s"]
            ratios[f"decode_b8_{ours}_vs_{peer}"] = dec[ours]["batch8_tok_s"] / dec[peer]["batch8_tok_s"]
    ratios = {k: round(v, 3) for k, v in ratios.items() if math.isfinite(v)}
    print(
        json.dumps(
            {
                "benchmark": "cuda_check",
                "machine": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu",
                "torch": torch.__version__,
                "results": RESULTS,
                "ratios": ratios,
            }
        )
    )


if __name__ == "__main__":
    main()
