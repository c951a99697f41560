"""bf16 compute picked at run time for a bf16 checkpoint on a CPU with bf16 products: the decision, a QLoRA run
over it (bf16 rest, NF4 linears, fp32 adapters; no full-precision base) and its exact resume."""

from __future__ import annotations

import json
import math
import platform

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import load_file, save_file

from nomoat.config.train import TrainConfig
from nomoat.kernels.build import cpu_flags
from nomoat.lora import LoRALinear, NF4Linear
from nomoat.train.loss import causal_lm_loss_sum
from nomoat.train.precision import bf16_autocast, cpu_trains_bf16, half_checkpoint
from nomoat.train.sft import SFTRecipe

from train_utils import make_chat_model, write_chat_data

QUIET = Console(quiet=True)
CPU = torch.device("cpu")


def _to_bf16(folder):
    """Re-save a model folder's weights in bf16, as the Hub ships them."""
    for f in folder.glob("*.safetensors"):
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(f).items()}, str(f), metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["torch_dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    fp32 = make_chat_model(root / "fp32")
    bf16 = _to_bf16(make_chat_model(root / "bf16"))
    return fp32, bf16, write_chat_data(root / "chat.jsonl", n=24)


def test_auto_follows_the_cpu_and_the_checkpoint(folders, monkeypatch):
    fp32, bf16, _ = folders
    assert half_checkpoint(bf16) and not half_checkpoint(fp32) and not half_checkpoint(None)
    assert not half_checkpoint(fp32.parent / "missing")
    monkeypatch.setenv("NOMOAT_CPU_BF16", "1")
    assert cpu_trains_bf16()
    assert bf16_autocast("auto", CPU, bf16) and not bf16_autocast("auto", CPU, fp32)
    assert not bf16_autocast("float32", CPU, bf16) and bf16_autocast("bfloat16", CPU, fp32)
    monkeypatch.setenv("NOMOAT_CPU_BF16", "0")
    assert not cpu_trains_bf16() and not bf16_autocast("auto", CPU, bf16) and bf16_autocast("bf16", CPU, bf16)
    monkeypatch.delenv("NOMOAT_CPU_BF16")
    assert cpu_trains_bf16() == bool(cpu_flags() & {"avx512_bf16", "amx_bf16"}) or platform.machine() != "x86_64"


def _cfg(folders, tmp_path, name, **kw) -> TrainConfig:
    _, model, data = folders
    base = dict(model=str(model), data=[str(data)], output_dir=str(tmp_path / "runs"), name=name, seq_len=64,
                batch_size=2, lr=3e-3, warmup_steps=0, max_steps=6, packing=False, schedule="constant",
                quantize_base="nf4", lora={"r": 4, "alpha": 8, "dropout": 0.0})  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def test_auto_qlora_over_a_bf16_checkpoint_keeps_no_full_precision_base(folders, tmp_path, monkeypatch):
    monkeypatch.setenv("NOMOAT_CPU_BF16", "1")
    recipe = SFTRecipe(_cfg(folders, tmp_path, "q"), console=QUIET, progress=False)
    recipe.setup()
    assert recipe.autocast
    model = recipe.model
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert layers and all(isinstance(m.qbase, NF4Linear) and m.weight is None for m in layers)
    for m in layers:
        q = m.qbase
        n = q.in_features * q.out_features
        assert q.qweight.dtype == torch.uint8 and q.qweight.untyped_storage().nbytes() == n // 2
        assert q.absmax.dtype == torch.float32 and q.absmax.numel() == n // q.block_size
        assert q.compute_dtype == torch.bfloat16
    trainable = {id(p) for p in recipe.params.values()}
    assert trainable and all(p.dtype == torch.float32 for p in recipe.params.values())
    # Everything else floating point is bf16 (embeddings, norms, head): no fp32 copy of any base weight.
    for name, p in model.named_parameters():
        if id(p) not in trainable:
            assert p.dtype == torch.bfloat16, name
    losses = [recipe.train_step()["loss"] for _ in range(6)]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


def test_auto_qlora_resume_is_exact(folders, tmp_path, monkeypatch):
    monkeypatch.setenv("NOMOAT_CPU_BF16", "1")
    whole = SFTRecipe(_cfg(folders, tmp_path, "whole"), console=QUIET, progress=False).run()
    SFTRecipe(_cfg(folders, tmp_path, "cut", max_steps=3), console=QUIET, progress=False).run()
    rest = SFTRecipe(_cfg(folders, tmp_path, "cut", resume=True), console=QUIET, progress=False).run()
    assert len(whole.losses) == 6 and len(rest.losses) == 3
    assert rest.losses == whole.losses[3:]


def test_fused_head_under_autocast_matches_the_plain_loss():
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 50, bias=False).to(torch.bfloat16)

    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm_head = head

        def logits(self, h):
            return self.lm_head(h)

    hidden = torch.randn(2, 9, 32, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :3] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, n = causal_lm_loss_sum(M(), hidden, labels)
    total.backward()
    h2 = hidden.detach().clone().requires_grad_(True)
    keep = labels[:, 1:] != -100
    logits = F.linear(h2[:, :-1][keep].bfloat16(), head.weight).float()
    ref = F.cross_entropy(logits, labels[:, 1:][keep], reduction="sum")
    ref.backward()
    assert n == int(keep.sum())
    torch.testing.assert_close(total, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hidden.grad, h2.grad, rtol=2e-2, atol=2e-3)
