"""The decode stack's output head (`Plan.head`): the final norm and the head's panels in the step's own
call give the logits of the separate norm and head, for fp32 and int8 heads, any number of rows, with a bias, and
where every unit runs twice; models the fused head does not take keep the separate path."""

from __future__ import annotations

import pytest
import torch
import transformers

from nomoat.inference import PanelLinear, prepare
from nomoat.models.checkpoint import load_model
from nomoat.models.kv_cache import KVCache
from nomoat.models.packed import pack_model
from nomoat.models.quantize import quantize_model

from hf_models import hf_config
from stack_helpers import rel, threads_and_spin


def _model(tmp_path, family="llama3", mode="fp32", **overrides):
    torch.manual_seed(0)
    cfg = hf_config(family, **overrides)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    hf.eval().save_pretrained(tmp_path)
    model = load_model(tmp_path, "float32", "cpu")
    if mode == "int8":
        return quantize_model(model, "int8")
    pack_model(model)
    return model


def _steps(dm, rows: int, steps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (steps, rows, V) of greedy decode steps, each step computed with the fused head and then the separate
    norm and head (on the same cache contents: a step writes the same keys and values either way)."""
    g = torch.Generator().manual_seed(rows)
    cache = KVCache(dm.config, rows, 64, torch.float32, "cpu")
    fused, separate = [], []
    with torch.inference_mode():
        lengths = []
        toks = []
        for r in range(rows):
            p = torch.randint(3, 400, (3 + 2 * r,), generator=g)
            logits = dm(p[None], torch.arange(len(p))[None], cache, rows=slice(r, r + 1))
            toks.append(int(logits[0, -1].argmax()))
            lengths.append(len(p))
        for _ in range(steps):
            ids, pos = torch.tensor(toks)[:, None], torch.tensor(lengths)[:, None]
            dm.plan.head = False
            want = dm(ids, pos, cache, rows=slice(0, rows))[:, -1]
            dm.plan.head = True
            calls = dm.stack_steps
            got = dm(ids, pos, cache, rows=slice(0, rows))[:, -1]
            assert dm.stack_steps == calls + 1
            fused.append(got)
            separate.append(want)
            toks = got.argmax(-1).tolist()
            lengths = [n + 1 for n in lengths]
    return torch.stack(fused), torch.stack(separate)


@pytest.mark.parametrize("mode", ["fp32", "int8"])
@pytest.mark.parametrize("rows", [1, 3, 10])
def test_fused_head_equals_separate_head(built, tmp_path, mode, rows):
    dm = prepare(_model(tmp_path, mode=mode))
    assert dm.plan is not None and dm.plan.head
    head = dm.net.lm_head
    calls = []
    head.register_forward_pre_hook(lambda *a: calls.append(1))  # a hook on the head after the plan: not seen
    fused, separate = _steps(dm, rows)
    assert fused.shape == separate.shape == (4, rows, dm.config.vocab_size)
    assert rel(fused, separate) < 1e-5
    assert len(calls) == rows + 4  # the prefills and the separate steps only: never the fused steps


def test_head_bias_and_every_unit_twice(built, tmp_path):
    """A head with a bias; and in the test mode where every thread runs every unit again (idempotent head units)."""
    dm = prepare(_model(tmp_path, "qwen2", tie_word_embeddings=False))
    old = dm.net.lm_head
    bias = torch.randn(old.out_features)
    dm.net.lm_head = PanelLinear(old.panels, old.out_features, None, bias)
    dm.rebuild_plan()
    assert dm.plan.head
    fused, separate = _steps(dm, 2)
    assert rel(fused, separate) < 1e-5
    with threads_and_spin(dm, 3, -1):
        again, _ = _steps(dm, 2)
    assert rel(again, separate) < 1e-5


def test_models_without_a_fused_head(built, tmp_path):
    """Logit soft-capping, or a bf16 model: no head in the plan; the hidden states are still there to ask for."""
    model = _model(tmp_path)
    model.config.final_logit_softcap = 30.0
    dm = prepare(model)
    assert dm.plan is not None and not dm.plan.head
    model.config.final_logit_softcap = None
    dm = prepare(model)
    cache = KVCache(dm.config, 1, 16, torch.float32, "cpu")
    with torch.inference_mode():
        dm(torch.tensor([[3, 4]]), torch.arange(2)[None], cache, rows=slice(0, 1))
        h = dm(torch.tensor([[5]]), torch.tensor([[2]]), cache, rows=slice(0, 1), return_hidden=True)
    assert h.shape == (1, 1, dm.config.hidden_size)
    bf16 = load_model(tmp_path, "bfloat16", "cpu")
    dm = prepare(bf16)
    assert dm.plan is None or not dm.plan.head
