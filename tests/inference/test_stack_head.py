"""The decode stack's output head (`Plan.head`): the final norm and the head's panels in the step's own
call give the logits of the separate norm and head, for fp32 and int8 heads, any number of rows, with a bias, and
where every unit runs twice; a bf16 model's head (its own bf16 weight, a tied head the embedding) likewise, within
bf16's precision; models the fused head does not take keep the separate path."""

from __future__ import annotations

import pytest
import torch
import transformers

from nomoat.inference import PanelLinear, prepare
from nomoat.inference.bf16_linear import Bf16Linear
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
    if mode == "bf16":
        return load_model(tmp_path, "bfloat16", "cpu")
    model = load_model(tmp_path, "float32", "cpu")
    if mode == "int8":
        return quantize_model(model, "int8")
    pack_model(model)
    return model


def _steps(dm, rows: int, steps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (steps, rows, V) of greedy decode steps, each step computed with the fused head and then the separate
    norm and head (on the same cache contents: a step writes the same keys and values either way)."""
    g = torch.Generator().manual_seed(rows)
    cache = KVCache(dm.config, rows, 64, dm.net.dtype, "cpu")
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
    """Logit soft-capping (fp32 or bf16): no head in the plan; the hidden states are still there to ask for."""
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
    bf16.config.final_logit_softcap = 30.0
    dm = prepare(bf16)
    assert dm.plan is not None and not dm.plan.head


def _min_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().reshape(-1, a.shape[-1]), b.float().reshape(-1, b.shape[-1])
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item()


@pytest.mark.parametrize("rows", [1, 3, 10])
def test_bf16_head_equals_separate_head(built, tmp_path, rows):
    """A bf16 model's tied head (the embedding itself, read in place; 500 outputs: a last unit of 52 rows) in the
    step's call: the separate norm and head's logits within bf16's precision (the separate path rounds the hidden
    states and the normed rows to bf16 first), the same argmax wherever the separate one is clear, bf16 logits."""
    dm = prepare(_model(tmp_path, "llama_tied_mqa", mode="bf16", vocab_size=500))
    assert dm.plan is not None and dm.plan.head
    head = dm.net.lm_head
    assert type(head) is Bf16Linear and head.bf16_weight.data_ptr() == dm.net.model.embed_tokens.weight.data_ptr()
    calls = []
    head.register_forward_pre_hook(lambda *a: calls.append(1))
    fused, separate = _steps(dm, rows)
    assert fused.dtype == separate.dtype == torch.bfloat16
    assert fused.shape == separate.shape == (4, rows, 500)
    fused, separate = fused.float(), separate.float()
    assert rel(fused, separate) < 2e-2 and _min_cos(fused, separate) > 0.999
    top2 = separate.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 4e-2 * separate.abs().amax(-1)
    assert torch.equal(fused.argmax(-1)[clear], separate.argmax(-1)[clear])
    assert len(calls) == rows + 4


def test_bf16_head_bias_and_every_unit_twice(built, tmp_path):
    """An untied bf16 head with a bias; every thread running every unit again gives the same logits, bit for bit."""
    dm = prepare(_model(tmp_path, "qwen2", mode="bf16", tie_word_embeddings=False))
    old = dm.net.lm_head
    assert type(old) is Bf16Linear
    dm.net.lm_head = Bf16Linear(old.bf16_weight, torch.randn(old.out_features))
    dm.rebuild_plan()
    assert dm.plan.head
    fused, separate = _steps(dm, 2)
    assert rel(fused.float(), separate.float()) < 2e-2 and _min_cos(fused, separate) > 0.999
    saved = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        once, _ = _steps(dm, 2)
        dm.plan.native.set_spin(-1, 0)
        again, _ = _steps(dm, 2)
    finally:
        torch.set_num_threads(saved)
        dm.plan.native.set_spin(20000, 2)
    assert dm.plan.native.helped() > 0 and torch.equal(again, once)
