"""What the decode-stack tests share: tiny random transformers models saved to a folder, greedy decoding of a batch
of prompts through a `DecodeModel`, a thread count and spin setting for a while, and the stack against the layer loop
with an adapter bank."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import torch
import transformers

from nomoat.inference import DecodeConfig, DecodeModel, prepare
from nomoat.lora.bank import AdapterBank, group_rows
from nomoat.models.kv_cache import KVCache

from hf_models import hf_config, save_word_tokenizer


def make_model(family: str, overrides: dict, path: Path, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random tiny transformers model of `family` (hf_models' config with `overrides`; norms and biases randomised
    too) saved in `dtype` to `path` with a word tokenizer; returns it (in `dtype`, eval, eager attention)."""
    torch.manual_seed(seed)
    cfg = hf_config(family, **overrides)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n or "bias" in n:
                p.add_(torch.randn_like(p) * 0.1)
    hf = hf.to(dtype).eval()
    hf.save_pretrained(path)
    save_word_tokenizer(path)
    return hf


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference relative to the largest magnitude of the reference `b`."""
    return ((a - b).abs().max() / b.abs().max()).item()


def fixed_prompts(n: int) -> list[list[int]]:
    """`n` prompts of 2 to 6 tokens, the same on every call."""
    return [[(11 * i + 7 * j) % 250 + 3 for j in range(2 + i % 5)] for i in range(n)]


def decode_logits(
    dm: DecodeModel,
    prompts: list[list[int]],
    steps: int,
    row0: int = 0,
    during_decode: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    cache_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Prefill each prompt into its own cache row (row0 + i), then decode `steps` greedy tokens for all rows at once
    (rows at different positions, each step inside `during_decode()`); returns the logits (steps, B, V) of the
    decode steps in fp32."""
    B = len(prompts)
    cache = KVCache(dm.config, row0 + B, max(64, max(map(len, prompts)) + steps + 1), cache_dtype, "cpu")
    out = []
    with torch.inference_mode():
        toks = []
        for i, p in enumerate(prompts):  # prefill: the layer loop (the stack for a 1-token prompt)
            logits = dm(torch.tensor([p]), torch.arange(len(p))[None], cache, rows=slice(row0 + i, row0 + i + 1))
            toks.append(int(logits[0, -1].argmax()))
        lengths = [len(p) for p in prompts]
        for _ in range(steps):
            ids = torch.tensor(toks)[:, None]
            pos = torch.tensor(lengths)[:, None]
            with during_decode():
                logits = dm(ids, pos, cache, rows=slice(row0, row0 + B))[:, -1]
            out.append(logits.float())
            toks = logits.argmax(-1).tolist()
            lengths = [n + 1 for n in lengths]
    return torch.stack(out)


@contextlib.contextmanager
def threads_and_spin(dm: DecodeModel, threads: int, spin: int) -> Iterator[None]:
    """Inside: `threads` torch threads and, where `dm` has a stack plan, its spin setting `spin` (-1: every unit runs
    again once complete, a test mode); the thread count and the default spin (20000, 2) are restored after."""
    native = None if dm.plan is None else dm.plan.native
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if native is not None:
            native.set_spin(spin, 0 if spin <= 0 else 2)
        yield
    finally:
        torch.set_num_threads(saved)
        if native is not None:
            native.set_spin(20000, 2)


def bank_logits(model, folders: dict[str, Path], selections, prompts: list[list[int]], steps: int,  # noqa: ANN001
                threads: int | None = None, spin: int = 20000) -> dict[bool, torch.Tensor]:  # fmt: skip
    """`decode_logits` of rows with adapter `selections` over a bank of the adapters in `folders`: {True: through the
    stack, False: through the layer loop with the bank's own LoRA path} (with `threads_and_spin(threads, spin)` where
    `threads` is given). Asserts that each took its path throughout."""
    out = {}
    for stack in (True, False):
        dm = prepare(model, DecodeConfig(stack=stack))
        bank = AdapterBank(dm.net)
        for name, folder in folders.items():
            bank.add(name, folder)
        dm.rebuild_plan()
        assert (dm.plan is not None) == stack
        plan = group_rows(selections, torch.device("cpu"))
        with contextlib.nullcontext() if threads is None else threads_and_spin(dm, threads, spin):
            out[stack] = decode_logits(dm, prompts, steps, during_decode=lambda b=bank, p=plan: b.plan(p))
        assert dm.stack_steps == (steps if stack else 0)
    return out
