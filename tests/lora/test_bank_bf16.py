"""Adapter factors kept in bf16 by the bank (`adapter_dtype`): the dtype each adapter gets, and the bank's output
against PEFT's LoRA delta computed independently in float64 from the adapter files.

Tight: against the delta of the bf16-rounded factors (the kernels widen bf16 exactly and sum in fp32). Loose:
against the unrounded factors, where only the rounding of A and B to 8 significant bits (relative error 2^-9 each)
separates the two: the delta's error stays within 2% of its largest value.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from nomoat import kernels
from nomoat.lora import bank as bank_mod
from nomoat.lora.bank import AdapterBank, group_rows, resolve_adapter_dtype
from nomoat.models.checkpoint import load_model

from hf_models import hf_config
from train_utils import random_adapter

LAYERS = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj")
NAMES = ("a0", "a1", "a2", "a3")
RANKS = (4, 8, 2, 16)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A tiny Llama and four adapters of different ranks and scalings, each also saved with bf16 factors."""
    root = tmp_path_factory.mktemp("bf16bank")
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config("llama3", hidden_size=128, intermediate_size=256))
    hf.save_pretrained(root / "model")
    out = {"model": root / "model", "fp32": {}, "bf16": {}}
    for i, (name, r) in enumerate(zip(NAMES, RANKS)):
        folder = random_adapter(root / "model", root / name, 10 + i, r=r, alpha=[8, 3, 4, 64][i],
                                target_modules=["q_proj", "v_proj", "down_proj"] if i != 2 else ["q_proj"])  # fmt: skip
        out["fp32"][name] = folder
        half = root / f"{name}-bf16"
        half.mkdir()
        (half / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
        tensors = load_file(folder / "adapter_model.safetensors")
        save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, half / "adapter_model.safetensors")
        out["bf16"][name] = half
    return out


def _peft_delta(folder: Path, layer: str, x: torch.Tensor, rounded: bool) -> torch.Tensor:
    """PEFT's LoRA term of one adapter file on one layer, float64: (alpha / r) * (x A^T) B^T; 0 if not targeted."""
    import json

    cfg = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    key = f"base_model.model.{layer}"
    if f"{key}.lora_A.weight" not in tensors:
        return torch.zeros((), dtype=torch.float64)
    a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
    if rounded:
        a, b = a.to(torch.bfloat16), b.to(torch.bfloat16)
    return cfg["lora_alpha"] / cfg["r"] * (x.double() @ a.double().t()) @ b.double().t()


def _selections(rows: int) -> list:
    """Each row one adapter, a weighted stack of two, or none (mixed scalings and ranks)."""
    out = []
    for i in range(rows):
        if i % 5 == 3:
            out.append(())
        elif i % 4 == 1:
            out.append(((NAMES[i % 4], 0.6), (NAMES[(i + 1) % 4], -1.3)))
        else:
            out.append(((NAMES[i % 4], 1.0 if i % 3 else 0.5),))
    return out


def test_resolve_adapter_dtype():
    bf, f32 = torch.bfloat16, torch.float32
    assert resolve_adapter_dtype("auto", {f32}, f32) == f32
    assert resolve_adapter_dtype("auto", {bf}, f32) == bf  # a bf16 file: nothing is rounded
    assert resolve_adapter_dtype("auto", {f32}, bf) == bf  # a bf16 model
    assert resolve_adapter_dtype("auto", {bf, f32}, f32) == f32
    assert resolve_adapter_dtype("auto", {f32}, torch.float16) == torch.float16
    assert resolve_adapter_dtype("float32", {bf}, bf) == f32
    assert resolve_adapter_dtype("bfloat16", {f32}, f32) == bf
    with pytest.raises(ValueError, match="adapter dtype"):
        resolve_adapter_dtype("float16", {f32}, f32)
    with pytest.raises(ValueError, match="adapter dtype"):
        AdapterBank(torch.nn.Linear(2, 2), adapter_dtype="half")


@pytest.mark.parametrize("rows", [1, 7, 32, 33])
@pytest.mark.parametrize("path", ["rows_kernel", "grouped_mm", "loop"])
def test_bf16_bank_equals_peft_delta(world, rows, path, monkeypatch):
    if path == "rows_kernel" and not kernels.available():
        pytest.skip("the compiled kernels are not built here")
    monkeypatch.setattr(bank_mod, "ROWS_KERNEL", path == "rows_kernel")
    monkeypatch.setattr(bank_mod, "GROUPED_MM", path != "loop")
    model = load_model(world["model"], "float32", "cpu")
    bank = AdapterBank(model, adapter_dtype="bfloat16")
    for name in NAMES:
        bank.add(name, world["fp32"][name])
    assert bank.factor_dtype == torch.bfloat16
    modules = dict(model.named_modules())
    selections = _selections(rows)
    g = torch.Generator().manual_seed(rows)
    for layer in LAYERS:
        m = modules[layer]
        assert m.a_stack.dtype == m.bt_stack.dtype == torch.bfloat16
        x = torch.randn(rows, 3, m.in_features, generator=g)
        with torch.no_grad(), bank.plan(group_rows(selections, torch.device("cpu"))):
            got = m(x).double() - m.base(x).double()
        for rounded in (True, False):
            want = torch.zeros_like(got)
            for row, sel in enumerate(selections):
                for name, weight in sel:
                    want[row] += weight * _peft_delta(world["fp32"][name], layer, x[row], rounded)
            scale = float(want.abs().max())
            if rounded:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)
            else:
                assert (got - want).abs().max() < 2e-2 * scale


def test_auto_keeps_file_precision(world):
    """auto on an fp32 model: bf16 files stay bf16; an fp32 file beside them turns the bank to fp32 (the bf16 values
    exact), and back to bf16 once it is removed."""
    model = load_model(world["model"], "float32", "cpu")
    bank = AdapterBank(model)
    for name in NAMES[:3]:
        bank.add(name, world["bf16"][name])
    layer = dict(model.named_modules())[LAYERS[0]]
    assert bank.factor_dtype == torch.bfloat16 and layer.a_stack.dtype == torch.bfloat16
    before = {n: tuple(t.clone() for t in bank.tensors[n][LAYERS[0]][:2]) for n in NAMES[:3]}
    bank.add("a3", world["fp32"]["a3"])
    assert bank.factor_dtype == torch.float32 and layer.a_stack.dtype == torch.float32
    a3 = load_file(world["fp32"]["a3"] / "adapter_model.safetensors")
    assert torch.equal(bank.tensors["a3"][LAYERS[0]][0], a3[f"base_model.model.{LAYERS[0]}.lora_A.weight"])
    for n in NAMES[:3]:
        for old, new in zip(before[n], bank.tensors[n][LAYERS[0]][:2]):
            assert new.dtype == torch.float32 and torch.equal(new, old.float())
    bank.remove("a3")
    assert bank.factor_dtype == torch.bfloat16 and layer.a_stack.dtype == torch.bfloat16
    for n in NAMES[:3]:
        for old, new in zip(before[n], bank.tensors[n][LAYERS[0]][:2]):
            assert torch.equal(new, old)
    fp32_bank = AdapterBank(load_model(world["model"], "float32", "cpu"))
    fp32_bank.add("a0", world["fp32"]["a0"])
    assert fp32_bank.factor_dtype == torch.float32  # auto never rounds an fp32 file on an fp32 model
