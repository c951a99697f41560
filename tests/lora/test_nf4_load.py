"""A QLoRA base loaded straight into NF4, and the frozen product in bf16 compute.

References: `quantize_model_nf4` over a model loaded in full precision (codes must be bit-identical); for bf16
compute, the same arithmetic written with plain torch ops (bf16 input and dequantized bf16 weight into `F.linear`),
and the fp32-compute QLoRA run (the already tested path) for a short training run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nomoat.config import LoRAConfig
from nomoat.lora import LoRALinear, NF4Linear, inject_lora, quantize_model_nf4, trainable_parameters
from nomoat.lora.nf4 import load_model_nf4, nf4_compute_dtype
from nomoat.models import load_plan
from nomoat.models.checkpoint import load_model
from random_checkpoint import write_random_llama

from hf_models import make_hf_model, padded_batch

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.mark.parametrize("family", ["llama3", "llama_tied_mqa", "phi3"])
def test_loaded_in_nf4_equals_quantize_model_nf4(family, tmp_path, monkeypatch):
    make_hf_model(family, tmp_path)
    reference = quantize_model_nf4(load_model(tmp_path, "float32", "cpu"))
    monkeypatch.setattr(load_plan, "PIECE_BYTES", 4 * 64 * 64)  # several pieces per layer
    ours = load_model_nf4(tmp_path, "float32", "cpu")
    ref_state, state = reference.state_dict(), ours.state_dict()
    assert state.keys() == ref_state.keys()
    for k, v in ref_state.items():
        assert torch.equal(state[k], v), k
    assert all(m.compute_dtype is None for m in ours.modules() if isinstance(m, NF4Linear))  # fp32 checkpoint
    assert ours.lm_head.weight.dtype == torch.float32  # the head stays full precision, as in QLoRA


def _bf16_folder(tmp_path: Path) -> Path:
    make_hf_model("llama3", tmp_path / "fp32")
    model = load_model(tmp_path / "fp32", "bfloat16", "cpu")
    from nomoat.models.checkpoint import save_model

    save_model(model, tmp_path / "bf16")
    return tmp_path / "bf16"


@pytest.mark.parametrize("fast", ["1", "0"])
def test_compute_dtype_follows_auto(fast, tmp_path, monkeypatch):
    monkeypatch.setenv("NOMOAT_CPU_BF16", fast)
    folder = _bf16_folder(tmp_path)
    want = torch.bfloat16 if fast == "1" else None
    assert nf4_compute_dtype({"torch_dtype": "bfloat16"}) == want
    assert nf4_compute_dtype({"torch_dtype": "float32"}) is None
    model = load_model_nf4(folder, "float32", "cpu")
    assert {m.compute_dtype for m in model.modules() if isinstance(m, NF4Linear)} == {want}
    monkeypatch.setenv("NOMOAT_NF4_COMPUTE", "float32")
    assert nf4_compute_dtype({"torch_dtype": "bfloat16"}) is None


def test_bf16_compute_layer_matches_plain_ops():
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 96, bias=True)
    q = NF4Linear.from_linear(lin)
    q.compute_dtype = torch.bfloat16
    x = torch.randn(5, 128)
    w = q.dequantize(torch.bfloat16)
    expected = F.linear(x.bfloat16(), w, q.bias.bfloat16()).float()
    y = q(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, expected, atol=0, rtol=0)


def test_bf16_compute_qlora_layer_gradients_match_plain_ops():
    torch.manual_seed(0)
    cfg = LoRAConfig(r=4, alpha=8)
    base = NF4Linear.from_linear(torch.nn.Linear(128, 64))
    base.compute_dtype = torch.bfloat16
    layer = LoRALinear.from_quantized(base, cfg)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(6, 128, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    # The same computation with plain ops: bf16 base product (output back in fp32), fp32 adapter.
    x2 = x.detach().clone().requires_grad_(True)
    a = layer.lora_A.weight.detach().clone().requires_grad_(True)
    b = layer.lora_B.weight.detach().clone().requires_grad_(True)
    w = base.dequantize(torch.bfloat16)
    ref = F.linear(x2.bfloat16(), w).float() + layer.bias + layer.scaling * (x2 @ a.t()) @ b.t()
    ref.backward(g)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer.lora_A.weight.grad, a.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.lora_B.weight.grad, b.grad, atol=1e-5, rtol=1e-5)


def _train(model, steps: int = 6) -> list[float]:
    ids, mask = padded_batch()
    inject_lora(model, LoRAConfig(r=8, alpha=16, target_modules="all-linear"))
    for m in model.modules():
        if isinstance(m, LoRALinear):
            with torch.no_grad():
                m.lora_B.weight.normal_(std=0.01)  # start away from zero, so both factors get gradients
    model.train()
    params = list(trainable_parameters(model).values())
    assert params and all(p.dtype == torch.float32 for p in params)
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    torch.manual_seed(0)
    for _ in range(steps):
        logits = model(ids, attention_mask=mask)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                               reduction="none")[mask[:, 1:].reshape(-1).bool()].mean()  # fmt: skip
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_bf16_compute_qlora_trains_like_fp32_compute(tmp_path):
    make_hf_model("llama3", tmp_path)
    torch.manual_seed(0)
    fp32 = _train(load_model_nf4(tmp_path, "float32", "cpu", compute_dtype=None))
    torch.manual_seed(0)
    bf16 = _train(load_model_nf4(tmp_path, "float32", "cpu", compute_dtype=torch.bfloat16))
    assert fp32[-1] < fp32[0] and bf16[-1] < bf16[0]
    for a, b in zip(fp32, bf16):  # bf16 products: about 3 significant digits per weight
        assert abs(a - b) <= 2e-2 * abs(a), (fp32, bf16)


CHILD = r"""
import json, sys
from nomoat.train.allocator import tune_cpu_allocator
from nomoat.lora.nf4 import load_model_nf4

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

tuned = tune_cpu_allocator()
del_me = load_model_nf4(sys.argv[2], "bfloat16", "cpu")
del del_me
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
model = load_model_nf4(sys.argv[1], "bfloat16", "cpu")
seen, n = set(), 0
for v in model.state_dict().values():
    if v.data_ptr() not in seen:
        seen.add(v.data_ptr())
        n += v.numel() * v.element_size()
print(json.dumps({"tuned": tuned, "peak": status("VmHWM") - base, "after": status("VmRSS") - base, "loaded": n}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure peak RSS")
@pytest.mark.parametrize("tuning", ["1", "0"])
def test_nf4_load_peak_rss_with_and_without_malloc_tuning(tuning, tmp_path):
    write_random_llama(tmp_path / "big", 1024, 4096, 3, 32000, heads=16, kv=4, tied=False)
    write_random_llama(tmp_path / "small", 128, 256, 1, 1000, heads=4)
    env = {**os.environ, "PYTHONPATH": str(SRC), "NOMOAT_MALLOC_TUNING": tuning}
    res = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "big"), str(tmp_path / "small")],
                         capture_output=True, text=True, env=env, timeout=600, check=True)  # fmt: skip
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["tuned"] == (tuning == "1" and sys.platform.startswith("linux"))
    # The base is never materialised in full precision: the peak is the NF4 model plus the quantizer's pieces.
    assert r["peak"] <= 1.15 * r["loaded"] + 8 * load_plan.PIECE_BYTES, r
    assert r["after"] <= 1.05 * r["loaded"], r  # the tuned allocator keeps nothing the load freed
