"""The decode stack with an adapter bank in bf16: equal to the stack over fp32 factors of the same (bf16-rounded)
values and to the bank's own layer loop. (Against the unrounded factors, per layer: tests/lora/test_bank_bf16.py;
over whole greedy decodes a rounding can flip a token, so logits are compared on equal values only.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from nomoat import kernels
from nomoat.inference import DecodeConfig, prepare
from nomoat.lora.bank import AdapterBank, group_rows
from nomoat.models.checkpoint import load_model
from nomoat.models.kv_cache import KVCache

from hf_models import hf_config, save_word_tokenizer
from stack_helpers import rel
from train_utils import random_adapter


def _rewrite(folder: Path, out: Path, fn) -> Path:  # noqa: ANN001
    out.mkdir()
    (out / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    save_file({k: fn(v) for k, v in tensors.items()}, out / "adapter_model.safetensors")
    return out


def _logits(dm, bank, selections, steps: int = 3) -> torch.Tensor:  # noqa: ANN001
    """Prefill each row's prompt, then decode `steps` greedy steps for all rows at once; the decode steps' logits."""
    rows = len(selections)
    cache = KVCache(dm.config, rows, 64, torch.float32, "cpu")
    plan = group_rows(selections, torch.device("cpu"))
    toks, lengths, out = [], [], []
    with torch.inference_mode():
        for i in range(rows):
            p = [(5 * i + j) % 200 + 3 for j in range(2 + i % 3)]
            with bank.plan(group_rows([selections[i]], torch.device("cpu"))):
                logits = dm(torch.tensor([p]), torch.arange(len(p))[None], cache, rows=slice(i, i + 1))
            toks.append(int(logits[0, -1].argmax()))
            lengths.append(len(p))
        for _ in range(steps):
            with bank.plan(plan):
                logits = dm(torch.tensor(toks)[:, None], torch.tensor(lengths)[:, None], cache, rows=slice(0, rows))
            out.append(logits[:, -1])
            toks = logits[:, -1].argmax(-1).tolist()
            lengths = [n + 1 for n in lengths]
    return torch.stack(out)


@pytest.mark.parametrize("rows", [1, 7, 33])
def test_bf16_bank_in_the_stack(rows, tmp_path):
    assert kernels.available(), "nomoat's kernels did not build: see the log for the compiler error"
    torch.manual_seed(0)
    cfg = hf_config("llama3", hidden_size=128, num_attention_heads=2, num_key_value_heads=1, intermediate_size=256)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "model")
    save_word_tokenizer(tmp_path / "model")
    names = [f"a{i}" for i in range(5)]
    plain, rounded = {}, {}
    for i, name in enumerate(names):
        targets = None if i != 3 else ["q_proj", "down_proj"]
        extra = {} if targets is None else {"target_modules": targets}
        plain[name] = random_adapter(tmp_path / "model", tmp_path / name, 60 + i, r=[4, 8, 16, 2, 6][i],
                                     alpha=[8, 8, 16, 4, 3][i], **extra)  # fmt: skip
        rounded[name] = _rewrite(plain[name], tmp_path / f"{name}-r", lambda t: t.to(torch.bfloat16).float())
    selections = [((names[i % 5], 1.0),) if i % 4 else ((names[i % 5], 0.7), (names[(i + 2) % 5], -0.5))
                  for i in range(rows)]  # fmt: skip
    if rows > 3:
        selections[2] = ()
    model = load_model(tmp_path / "model", "float32", "cpu")
    out = {}
    for key, dtype, folders, stack in (("bf16", "bfloat16", plain, True), ("bf16_loop", "bfloat16", plain, False),
                                       ("rounded", "auto", rounded, True), ("plain", "float32", plain, True)):
        dm = prepare(model, DecodeConfig(stack=stack))
        bank = AdapterBank(dm.net, adapter_dtype=dtype)
        for name in names:
            bank.add(name, folders[name])
        dm.rebuild_plan()
        assert (dm.plan is not None) == stack
        out[key] = _logits(dm, bank, selections)
        assert dm.stack_steps >= (3 if stack else 0)
    assert rel(out["bf16"], out["rounded"]) < 1e-5  # the same values, fp32 sums either way
    assert rel(out["bf16"], out["bf16_loop"]) < 1e-5
    assert rel(out["rounded"], out["plain"]) > 0  # the rounded files differ from the plain ones
